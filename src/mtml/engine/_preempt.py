"""Preemption: SIGTERM (what schedulers and torchrun's agent send) stops training at the next step boundary,
after a checkpoint of that step, instead of losing the steps since the last one.

The command line's SIGTERM handler calls :func:`request_stop`. Inside :func:`fit`'s loop (a
:func:`stop_window`) that only records the request, and the loop stops at the end of the step; elsewhere
(building data, evaluating after training) there is no step to finish and the handler raises
:class:`Terminated` at once, as before. Ctrl-C (SIGINT) always stops at once.

On several ranks the signal may reach one rank only, or each at a different step, so the ranks vote: each
rank's request travels as one more number in the gradient all-reduce every data-parallel step already makes
(:func:`~mtml.engine._distributed.reduce_gradients` adds :func:`vote` and hands the sum to :func:`tally`),
and every rank stops after the first step whose sum is non-zero — the same step everywhere, at no extra
collective. A step that made no such all-reduce (a custom ``train_step``) gets one small all-reduce of the vote.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "agreed", "last_terminated", "request_stop", "requested", "stop_window", "tallies", "tally",
           "vote"]


class Terminated(KeyboardInterrupt):
    """SIGTERM: raised where the process is (or at a step boundary after a checkpoint), so it stops the way
    Ctrl-C does (checkpoints kept, run.json marked interrupted) instead of dying with its run marked running."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message
        _S.last = self  # click turns a KeyboardInterrupt into exit code 130: the CLI looks here to say 143


def last_terminated() -> Terminated | None:
    """The last :class:`Terminated` raised in this process (``None`` if none was)."""
    return _S.last


class _State:
    depth = 0  # nesting of stop windows (a fit inside a map_ranks job inside another fit is not expected)
    requested = False  # this rank received SIGTERM inside a window
    agreed = False  # the last vote's sum over ranks was non-zero
    rounds = 0  # votes tallied so far (one per data-parallel step)
    last: Terminated | None = None


_S = _State()


@contextmanager
def stop_window() -> Iterator[None]:
    """The block in which SIGTERM only requests a stop (the fit loop); requests from before are dropped."""
    if _S.depth == 0:
        _S.requested = _S.agreed = False
    _S.depth += 1
    try:
        yield
    finally:
        _S.depth -= 1


def request_stop() -> bool:
    """Record a SIGTERM: True when a running fit loop will stop at its next step boundary (the signal handler
    then returns), False when none runs (the handler raises :class:`Terminated`)."""
    if _S.depth == 0:
        return False
    _S.requested = True
    return True


def requested() -> bool:
    """Whether this rank has a stop request pending."""
    return _S.requested


def vote() -> float:
    """This rank's vote for the all-reduce of a step: 1.0 when it asks to stop."""
    return 1.0 if _S.requested else 0.0


def tally(total: float) -> None:
    """The sum of every rank's :func:`vote`, from one all-reduce: non-zero stops every rank after this step."""
    _S.rounds += 1
    _S.agreed = _S.agreed or total > 0


def tallies() -> int:
    """How many votes were tallied so far (the fit loop compares it around a step)."""
    return _S.rounds


def agreed() -> bool:
    return _S.agreed
