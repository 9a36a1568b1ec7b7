"""Switches for the speed paths, so that a benchmark (or a user chasing a numerical doubt) can run without them.

Every speed path computes what the general path computes (``vmap(functional_call)`` and one ``autograd.grad``),
only faster; each one stays in the code only while a whole shipped run measures it worth its lines
(``benchmarks/speed_paths.py``). Inside ``with speed_paths(task_loop=False): ...`` the models read in that
block take the general path instead. The switches live in a :class:`contextvars.ContextVar`, so they are local to
the thread (and asyncio task) that set them and are restored when the block ends; nothing is set at import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace

from mtml.errors import ConfigError

__all__ = ["SpeedPaths", "current_paths", "speed_paths"]


@dataclass(frozen=True)
class SpeedPaths:
    """Which speed paths the meta-learning algorithms and joint training may take (all on by default).

    Attributes:
        mlp_chain: MLP chains run as batched matrix products on stacked per-task weights
            (:mod:`mtml.meta._mlp`); off, they go through ``vmap(functional_call)``.
        hand_gradients: on an MLP chain, every task's inner gradient is back-propagated by hand with the same
            batched products; off, one ``autograd.grad`` of the chain's forward gives them.
        task_loop: image models (inputs ``[tasks, n, C, H, W]``) run one task at a time through their own
            forward (``functional_call`` on each task's parameters, all tasks at once while they share them); off,
            they go through ``vmap(functional_call)``.
        task_backward: with the task loop, :func:`~mtml.meta.meta_step` back-propagates one task at a time
            (:meth:`~mtml.meta.MetaAlgorithm.backward_chunk`), as learn2learn's examples do; off, one backward
            pass for the episode (2–7 % faster on Conv-4; at 16 tasks 3–3.5× the peak resident memory, 4.6–5.1× the
            step's own; docs/backbones.md).
        packed_rows: joint training draws the train rows of many tasks that have rows of their own (one task per
            school or store) as one pack and scores them with one trunk pass, one stacked head product and one
            segmented loss sum (:mod:`mtml.engine._packed`); off, each task's rows are drawn and scored on their own.
    """

    mlp_chain: bool = True
    hand_gradients: bool = True
    task_loop: bool = True
    task_backward: bool = True
    packed_rows: bool = True


_CURRENT: ContextVar[SpeedPaths] = ContextVar("mtml_speed_paths", default=SpeedPaths())  # noqa: B039 (frozen)


def current_paths() -> SpeedPaths:
    """The switches in force here (see :func:`speed_paths`)."""
    return _CURRENT.get()


@contextmanager
def speed_paths(**switches: bool) -> Iterator[SpeedPaths]:
    """Turn speed paths on or off inside a ``with`` block: ``with speed_paths(mlp_chain=False): ...``.

    Keywords are the fields of :class:`SpeedPaths`; the ones not given keep their current value. Algorithms
    read the switches when they first meet a model and again whenever they change.
    """
    known = {f.name for f in fields(SpeedPaths)}
    for name, value in switches.items():
        if name not in known:
            raise ConfigError(f"unknown speed path {name!r}; the switches are {', '.join(sorted(known))}.")
        if not isinstance(value, bool):
            raise ConfigError(f"speed path `{name}` must be true or false. Got {value!r}.")
    token = _CURRENT.set(replace(_CURRENT.get(), **switches))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
