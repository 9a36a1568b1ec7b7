"""Resource bombs: an episode that cannot fit in memory is refused before anything is allocated."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtml.cli import main
from mtml.config import Config
from mtml.errors import ConfigError
from mtml.workflows import build, train
from mtml.workflows._build import check_episode_memory, episode_bytes

SINUSOID = {"threads": 1, "data": {"dataset": "sinusoid", "options": {"shots": 5, "query_shots": 10, "meta_batch": 25}},
            "model": {"trunk_hidden": [40, 40]},
            "training": {"algorithm": "maml", "max_steps": 2, "eval_every": 2, "meta_val_tasks": 25,
                         "meta_test_tasks": 25}}


def test_the_estimate_counts_rows_times_inputs_and_layer_outputs() -> None:
    built = build(Config.from_dict(SINUSOID))
    assert built.family is not None
    # 25 tasks × 15 rows × (1 input + 40 + 40 + 1 layer outputs) × 4 bytes
    assert episode_bytes(built.family, built.model) == 4 * 25 * 15 * 82


def test_an_episode_beyond_the_available_memory_names_the_sizes_and_the_fix() -> None:
    built = build(Config.from_dict(SINUSOID))
    assert built.family is not None
    check_episode_memory(built.family, built.model, available=10**6)  # 123 kB: fits
    with pytest.raises(ConfigError, match=r"one episode \(meta_batch 25 × shots 5 × query_shots 10\) needs at least "
                                          r"0\.0 GiB.*lower the shots, ways or meta_batch"):
        check_episode_memory(built.family, built.model, available=1000)


def test_mtml_eval_with_a_hundred_million_shots_stops_before_allocating(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = train(Config.from_dict(SINUSOID), tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["eval", str(run.path), "--shots", "100000000"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "GiB of activations" in err and "Traceback" not in err
