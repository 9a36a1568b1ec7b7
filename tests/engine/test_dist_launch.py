"""The ``--nproc`` launcher: how workers start (forked from the launcher, or fresh interpreters), their exit
statuses, and stopping the others when one fails. Real processes, no mocks."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from mtml.engine._dist_launch import _Forked, launch, launch_method
from mtml.engine._distributed import DistributedError
from mtml.errors import ConfigError


def test_launch_method_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTML_LAUNCH", "spawn")
    assert launch_method() == "spawn"
    monkeypatch.setenv("MTML_LAUNCH", "forkserver")
    with pytest.raises(ConfigError, match=r"MTML_LAUNCH must be one of auto, fork, spawn\. Got 'forkserver'"):
        launch_method()
    monkeypatch.setenv("MTML_LAUNCH", "auto")
    if not sys.platform.startswith("linux"):
        assert launch_method() == "spawn"
        return
    # one thread: fork; pytest-xdist's worker runs threads of its own, so there the rule already says spawn
    assert launch_method() == ("fork" if threading.active_count() == 1 else "spawn")
    with monkeypatch.context() as single:
        single.setattr(threading, "active_count", lambda: 1)
        assert launch_method() == "fork"
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:  # a Python thread in the launcher (it could hold a lock at fork time): fresh interpreters instead
        assert launch_method() == "spawn"
    finally:
        stop.set()
        helper.join()


def _exits(code: int | None) -> None:
    if code is not None:
        sys.exit(code)


def _raises(args: list[str]) -> None:
    raise ValueError(f"bad worker {args}")


def _sleeps(args: list[str]) -> None:
    time.sleep(60)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_worker_exit_statuses(capfd: pytest.CaptureFixture[str]) -> None:
    env = {**os.environ, "MTML_TEST_MARK": "seen"}
    assert _Forked(lambda a: _exits(None), [], env).wait(30) == 0
    assert _Forked(lambda a: _exits(3), [], env).wait(30) == 3
    assert _Forked(lambda a: _exits(0 if os.environ.get("MTML_TEST_MARK") == "seen" else 4), [], env).wait(30) == 0
    assert _Forked(_raises, ["x"], env).wait(30) == 1
    assert "ValueError: bad worker ['x']" in capfd.readouterr().err  # a crash prints its traceback
    sleeper = _Forked(_sleeps, [], env)
    assert sleeper.poll() is None
    deadline = time.monotonic() + 10
    while os.getsid(sleeper.pid) != sleeper.pid and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.getsid(sleeper.pid) == sleeper.pid  # its own session: a terminal's Ctrl-C reaches the launcher only
    with pytest.raises(Exception, match="forked rank"):
        sleeper.wait(0.1)
    sleeper.kill()
    assert sleeper.wait(30) == -signal.SIGKILL


def _record(args: list[str]) -> None:
    out = Path(args[0])
    rank = os.environ["RANK"]
    (out / f"rank{rank}").write_text(f"{os.environ['WORLD_SIZE']} {os.environ['MASTER_ADDR']} {os.getpid()}")
    if len(args) > 1 and rank == args[1]:
        sys.exit(2)
    if len(args) > 1:
        time.sleep(60)  # the healthy rank: stopped by the launcher when the other fails


@pytest.mark.parametrize("method", ["fork", "auto"])
def test_launch_forks_ranks_with_torchrun_environment(tmp_path: Path, method: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTML_LAUNCH", method)
    if method == "auto" and threading.active_count() > 1:
        # under pytest-xdist, whose worker threads would make auto spawn: let it see a single-threaded launcher
        # (those threads hold no lock a forked rank needs; the "fork" case forks beside them too)
        monkeypatch.setattr(threading, "active_count", lambda: 1)
    launch([str(tmp_path)], 3, run_dir=tmp_path, entry=_record)
    seen = {p.name: p.read_text().split() for p in tmp_path.iterdir()}
    assert sorted(seen) == ["rank0", "rank1", "rank2"]
    assert {v[0] for v in seen.values()} == {"3"} and {v[1] for v in seen.values()} == {"127.0.0.1"}
    assert len({v[2] for v in seen.values()} | {str(os.getpid())}) == 4  # three processes besides this one


def test_launch_stops_the_others_when_a_forked_rank_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTML_LAUNCH", "fork")
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match=r"2-rank run failed: rank 1 stopped with the error above; stopped "
                                               r"rank\(s\) 0\. No checkpoint was written"):
        launch([str(tmp_path), "1"], 2, run_dir=tmp_path, entry=_record)
    assert time.monotonic() - t0 < 30  # not the sleeping rank's 60 s


def _killed_then_follower(args: list[str]) -> None:
    """Rank 1 is killed; rank 0 notices at once and stops with its own error (exit 2), as with gloo."""
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.3)
    sys.exit(2)


def test_the_rank_that_caused_a_failure_is_named_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTML_LAUNCH", "fork")
    with pytest.raises(DistributedError, match=r"2-rank run failed: rank 1 was killed by SIGKILL; rank 0 stopped "
                                               r"with the error above\. No checkpoint"):
        launch([str(tmp_path)], 2, run_dir=tmp_path, entry=_killed_then_follower)
