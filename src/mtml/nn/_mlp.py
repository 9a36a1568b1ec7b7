"""The multilayer perceptron every trunk, head and stem is made of, and the activations configs may name."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mtml.errors import ConfigError

__all__ = ["ACTIVATIONS", "mlp"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "linear": nn.Identity,
}


def mlp(
    in_dim: int,
    hidden: Sequence[int] = (),
    out_dim: int | None = None,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    final_activation: bool = False,
) -> nn.Sequential:
    """``Linear → act → (dropout)`` per hidden width, then an optional ``Linear(out_dim)``.

    With ``out_dim=None`` the network ends on its last hidden layer's activation (a feature extractor).
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation '{activation}' is not known; use one of {', '.join(ACTIVATIONS)}.")
    if in_dim <= 0 or any(h <= 0 for h in hidden) or (out_dim is not None and out_dim <= 0):
        raise ConfigError(f"layer widths must be > 0. Got in={in_dim}, hidden={list(hidden)}, out={out_dim}.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1). Got {dropout}.")
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    if out_dim is not None:
        layers.append(nn.Linear(width, out_dim))
        if final_activation:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
