"""BOIL: MAML whose inner loop adapts only the trunk.

Oh, Yoo, Kim & Yun, "BOIL: Towards Representation Change for Few-shot Learning", ICLR 2021.
"""

from __future__ import annotations

from torch import nn

from mtml.meta._maml import MAML

__all__ = ["boil"]


def boil(
    model: nn.Module,
    /,
    *,
    inner_lr: float = 0.01,
    inner_steps: int = 1,
    test_inner_lr: float | None = None,
    test_inner_steps: int | None = None,
    first_order: bool = False,
    checkpoint_inner: bool = False,
    compiled: bool = False,
) -> MAML:
    """Body Only update in Inner Loop (Oh et al., ICLR 2021): the head stays fixed while the trunk adapts.

    The same algorithm as :class:`~mtml.meta.MAML` with ``adapt="trunk"``: parameters named ``trunk.*`` of a
    :class:`~mtml.nn.MultiTaskModel` (or every layer but the last of an ``nn.Sequential``) adapt per task; the
    head is only updated by the outer loop. See :class:`~mtml.meta.MAML` for the options.
    """
    return MAML(model, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_lr=test_inner_lr,
                test_inner_steps=test_inner_steps, first_order=first_order, adapt="trunk",
                checkpoint_inner=checkpoint_inner, compiled=compiled)
