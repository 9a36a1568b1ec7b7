"""Resource bombs refused before anything starts: ``--nproc`` far beyond the machine's cores."""

from __future__ import annotations

from pathlib import Path

import pytest

import mtml.engine._dist_launch as dist_launch
from mtml.config import Config
from mtml.engine import launch
from mtml.errors import ConfigError


def test_a_thousand_ranks_are_refused_naming_the_cores_and_the_override(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[object] = []
    monkeypatch.setattr(dist_launch, "free_port", lambda: started.append("port") or 0)
    monkeypatch.delenv("MTML_ALLOW_OVERSUBSCRIBE", raising=False)
    with pytest.raises(ConfigError, match=r"--nproc 1000 starts 1000 processes on a machine with \d+ usable "
                                          r"core\(s\); use at most \d+.*MTML_ALLOW_OVERSUBSCRIBE=1"):
        launch(["train", "x.yaml"], 1000, run_dir=tmp_path)
    assert not started  # refused before a port, a process or a file


def test_the_override_lets_an_oversubscribed_launch_through_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTML_ALLOW_OVERSUBSCRIBE", "1")
    dist_launch.check_ranks(1000)  # no error: the user asked for it
    monkeypatch.delenv("MTML_ALLOW_OVERSUBSCRIBE")
    dist_launch.check_ranks(dist_launch.OVERSUBSCRIBE)  # at most OVERSUBSCRIBE per core is fine on any machine


@pytest.mark.parametrize("seed", [2**64, 2**31, -1])
def test_seeds_outside_the_generators_range_are_config_errors(seed: int) -> None:
    with pytest.raises(ConfigError, match=r"seed: Input should be"):
        Config.from_dict({"seed": seed})
