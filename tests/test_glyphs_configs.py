"""The glyphs configs added for issue 16 (the 20-way 1-shot >= 95 % recipe and the MAML++, MetaOptNet,
Proto-MAML, Baseline++ and linear-probe rows) validate and train from their shipped files on a small script
subset, and the family's ``train_ways`` / ``train_query_shots`` options change the meta-train episodes only."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mtml.config import Config
from mtml.datasets import FAMILIES
from mtml.datasets._glyphs_fonts import NOTO_DIR
from mtml.errors import ConfigError
from mtml.workflows import train

pytestmark = pytest.mark.skipif(not any(NOTO_DIR.glob("NotoSans*.ttf")),
                                reason="needs Debian's fonts-noto-core (make sysdata)")

NEW_CONFIGS = ["glyphs_protonet_60wtrain_20w1s", "glyphs_metaoptnet_5w1s", "glyphs_baseline_pp_5w1s",
               "glyphs_rfs_linear_5w1s", "glyphs_proto_maml_5w1s", "glyphs_maml_pp_5w1s"]
SMALL: dict[str, Any] = {"alphabets": ["OGHAM", "RUNIC", "GOTHIC", "OLD ITALIC"], "max_characters": 12,
                         "min_characters": 10, "examples_per_class": 6, "fractions": [0.5, 0.25, 0.25]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("glyph-cache"))


def _shipped(name: str) -> dict[str, Any]:
    text = resources.files("mtml").joinpath("configs", f"{name}.yaml").read_text()
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_config_trains_two_steps(name: str, cache: str, tmp_path: Path) -> None:
    data = _shipped(name)
    Config.from_dict(data, source=name)  # the file as shipped is valid
    options = data["data"]["options"]
    assert options["shots"] == 1 and data["training"]["meta_test_tasks"] == 600 and data["threads"] == 1
    # shrink: 5-way (training 8-way where the config trains with more ways), 3 queries, a 4-script subset
    options.update(SMALL, ways=5, query_shots=3, cache_dir=cache)
    if "train_ways" in options:
        assert options["train_ways"] > 20
        options["train_ways"] = 8
    data["training"].update(max_steps=2, eval_every=1, meta_val_tasks=4, meta_test_tasks=4)
    run, result = train(Config.from_dict(data, source=name), tmp_path / "run")
    summary = json.loads((run.path / "summary.json").read_text())
    scores = next(iter(summary["test"].values()))
    assert result.fit.steps == 2 and scores["num_tasks"] == 4
    accuracy = [v for k, v in scores.items() if k.startswith("accuracy@") and not k.endswith("_ci95")]
    assert accuracy and all(0.0 <= v <= 1.0 for v in accuracy)


def test_train_ways_change_meta_train_episodes_only(cache: str) -> None:
    family = FAMILIES.create("glyphs", ways=5, shots=1, query_shots=2, meta_batch=2, train_ways=9,
                             train_query_shots=4, cache_dir=cache, **SMALL)
    gen = torch.Generator().manual_seed(0)
    episode = family.train.sample(gen)
    assert episode.ways == 9 and episode.support.x.shape[:2] == (2, 9)
    assert episode.query.x.shape[:2] == (2, 9 * 4)
    assert sorted(episode.support.y[0].tolist()) == list(range(9))
    for sampler in (family.val, family.test):
        held_out = sampler.sample(gen)
        assert held_out.ways == 5 and held_out.query.x.shape[:2] == (2, 5 * 2)
    assert family.num_outputs == 5  # the model's head follows the test-time ways


def test_train_ways_errors_name_the_option(cache: str) -> None:
    with pytest.raises(ConfigError, match=r"`train_ways` = 500 exceeds the \d+ characters of the train split"):
        FAMILIES.create("glyphs", ways=5, train_ways=500, query_shots=2, cache_dir=cache, **SMALL)
    with pytest.raises(ConfigError, match="shots \\+ train_query_shots = 7 exceeds examples_per_class = 6"):
        FAMILIES.create("glyphs", ways=5, query_shots=2, train_query_shots=6, cache_dir=cache, **SMALL)
    with pytest.raises(ConfigError, match="train_ways"):
        FAMILIES.create("glyphs", ways=5, train_ways=1, query_shots=2, cache_dir=cache, **SMALL)
