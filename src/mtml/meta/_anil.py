"""ANIL: MAML whose inner loop adapts only the heads.

Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of
MAML", ICLR 2020.
"""

from __future__ import annotations

from torch import nn

from mtml.meta._maml import MAML

__all__ = ["anil"]


def anil(
    model: nn.Module,
    /,
    *,
    inner_lr: float = 0.01,
    inner_steps: int = 1,
    test_inner_lr: float | None = None,
    test_inner_steps: int | None = None,
    first_order: bool = False,
    checkpoint_inner: bool = False,
    zero_head: bool = False,
    compiled: bool = False,
) -> MAML:
    """Almost No Inner Loop (Raghu et al., ICLR 2020): MAML adapting the head, meta-learning the trunk.

    The same algorithm as :class:`~mtml.meta.MAML` with ``adapt="heads"``: parameters named ``heads.*`` of a
    :class:`~mtml.nn.MultiTaskModel` (or the last layer of an ``nn.Sequential``) adapt per task; the trunk is
    only updated by the outer loop. See :class:`~mtml.meta.MAML` for the options.
    """
    return MAML(model, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_lr=test_inner_lr,
                test_inner_steps=test_inner_steps, first_order=first_order, adapt="heads",
                checkpoint_inner=checkpoint_inner, zero_head=zero_head,
                compiled=compiled)
