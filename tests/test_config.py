"""Config validation: every error names its key path, the rule and (for typos) the nearest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtml.config import Config, apply_overrides, load_config, parse_overrides
from mtml.datasets import DATASETS
from mtml.errors import ConfigError
from mtml.weighting import WEIGHTINGS


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    return str(info.value)


def test_defaults_validate_and_round_trip() -> None:
    cfg = Config.from_dict({})
    assert cfg.training.weighting.name == "equal" and cfg.data.dataset in DATASETS
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()


@pytest.mark.parametrize(("data", "path", "suggestion"), [
    ({"training": {"lrr": 0.1}}, "training.lrr", "lr"),
    ({"trainng": {}}, "trainng", "training"),
    ({"model": {"trunk_hiden": [4]}}, "model.trunk_hiden", "trunk_hidden"),
    ({"training": {"weighting": {"nmae": "dwa"}}}, "training.weighting.nmae", "name"),
    ({"data": {"datset": "penguins"}}, "data.datset", "dataset"),
    ({"training": {"max_step": 5}}, "training.max_step", "max_steps"),
])
def test_misspelt_key_names_path_and_suggests(data: dict, path: str, suggestion: str) -> None:
    msg = _error(data)
    assert f"{path}: unknown key." in msg
    assert f"Did you mean '{suggestion}'?" in msg
    assert "Allowed keys:" in msg and suggestion in msg.split("Allowed keys:")[1]


def test_unrelated_unknown_key_has_no_suggestion() -> None:
    msg = _error({"model": {"zzzzqqq": 1}})
    assert "model.zzzzqqq: unknown key." in msg and "Did you mean" not in msg


@pytest.mark.parametrize(("data", "path", "given"), [
    ({"training": {"lr": "fast"}}, "training.lr", "'fast'"),
    ({"seed": "abc"}, "seed", "'abc'"),
    ({"training": {"batch_size": 1.5}}, "training.batch_size", "1.5"),
    ({"model": {"trunk_hidden": "wide"}}, "model.trunk_hidden", "'wide'"),
    ({"model": {"share_trunk": "maybe"}}, "model.share_trunk", "'maybe'"),
    ({"model": {"activation": "relu6"}}, "model.activation", "'relu6'"),
    ({"training": {"optimizer": "rmsprop"}}, "training.optimizer", "'rmsprop'"),
    ({"data": None}, "data", "None"),
])
def test_wrong_type(data: dict, path: str, given: str) -> None:
    msg = _error(data)
    assert f"{path}: " in msg and f"(got {given})" in msg


@pytest.mark.parametrize(("data", "path"), [
    ({"training": {"lr": -1}}, "training.lr"),
    ({"training": {"lr": 0}}, "training.lr"),
    ({"training": {"max_steps": 0}}, "training.max_steps"),
    ({"training": {"eval_every": 0}}, "training.eval_every"),
    ({"training": {"patience": -1}}, "training.patience"),
    ({"training": {"min_delta": -0.5}}, "training.min_delta"),
    ({"training": {"weight_decay": -1e-4}}, "training.weight_decay"),
    ({"training": {"keep_checkpoints": 0}}, "training.keep_checkpoints"),
    ({"training": {"checkpoint_every": 0}}, "training.checkpoint_every"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"model": {"dropout": -0.1}}, "model.dropout"),
    ({"model": {"trunk_hidden": [8, 0]}}, "model.trunk_hidden"),
    ({"model": {"head_hidden": [-3]}}, "model.head_hidden"),
    ({"model": {"stem_width": 0}}, "model.stem_width"),
])
def test_out_of_range(data: dict, path: str) -> None:
    assert f"{path}: " in _error(data)


def test_every_problem_is_listed_at_once() -> None:
    msg = _error({"training": {"lr": -1, "max_steps": 0, "lrr": 2}, "model": {"dropout": 2}})
    for path in ("training.lr", "training.max_steps", "training.lrr", "model.dropout"):
        assert path in msg


def test_unknown_dataset_names_the_key() -> None:
    msg = _error({"data": {"dataset": "pengiuns"}})
    assert msg.startswith("data.dataset: ") and "Did you mean 'penguins'?" in msg
    for name in DATASETS.names():
        assert name in msg


def test_unknown_weighting_names_the_key() -> None:
    for data in ({"training": {"weighting": "uncertainity"}},
                 {"training": {"weighting": {"name": "uncertainity"}}}):
        msg = _error(data)
        assert msg.startswith("training.weighting.name: ") and "Did you mean 'uncertainty'?" in msg
        for name in WEIGHTINGS.names():
            assert name in msg


def test_unknown_option_names() -> None:
    msg = _error({"data": {"dataset": "schools", "options": {"max_school": 3}}})
    assert msg.startswith("data.options: unknown option 'max_school'") and "Did you mean 'max_schools'?" in msg
    msg = _error({"training": {"weighting": {"name": "dwa", "options": {"temprature": 1.0}}}})
    assert msg.startswith("training.weighting.options: unknown option 'temprature'")
    assert "Did you mean 'temperature'?" in msg
    good = Config.from_dict({"data": {"dataset": "schools", "options": {"max_schools": 3}},
                             "training": {"weighting": {"name": "dwa", "options": {"temperature": 1.0}}}})
    assert good.data.options == {"max_schools": 3}


def test_weighting_shorthand() -> None:
    cfg = Config.from_dict({"training": {"weighting": "dwa"}})
    assert cfg.training.weighting.name == "dwa" and cfg.training.weighting.options == {}
    cfg = Config.from_dict({"training": {"weighting": {"name": "fixed", "options": {"weights": [1, 2]}}}})
    assert cfg.training.weighting.options == {"weights": [1, 2]}


def test_apply_overrides() -> None:
    base = {"training": {"lr": 0.1, "algorithm_options": {"inner_lr": 0.5, "inner_steps": 2}}, "seed": 1}
    out = apply_overrides(base, [
        "training.lr=0.01", "model.trunk_hidden=[32, 16]", "model.share_trunk=false", "name=my run",
        "training.weighting.options.weights={a: 1, b: 2}", "data.options.n=null", "seed=7", "device=cuda:0",
        "note=a=b", "training.algorithm_options={}",
    ])
    assert out == {
        "training": {"lr": 0.01, "algorithm_options": {}, "weighting": {"options": {"weights": {"a": 1, "b": 2}}}},
        "model": {"trunk_hidden": [32, 16], "share_trunk": False},
        "name": "my run", "data": {"options": {"n": None}}, "seed": 7, "device": "cuda:0", "note": "a=b",
    }
    assert base["training"]["lr"] == 0.1  # the input is not modified
    assert parse_overrides(["x=[1,"]) == [(["x"], "[1,")]  # not YAML: kept as the string


@pytest.mark.parametrize("pair", ["training.lr", "=3", " =3", "", "training..lr=1"])
def test_malformed_override(pair: str) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides([pair])


def test_override_uses_a_value_as_a_section() -> None:
    with pytest.raises(ConfigError, match="'seed' holds a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_load_config_applies_overrides_on_top(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: base\ntraining:\n  lr: 0.5\n  max_steps: 10\nmodel:\n  trunk_hidden: [3]\n")
    cfg = load_config(path, ["training.lr=0.25", "model.trunk_hidden=[5, 6]", "training.weighting=dwa"])
    assert cfg.training.lr == 0.25 and cfg.training.max_steps == 10 and cfg.name == "base"
    assert cfg.model.trunk_hidden == [5, 6] and cfg.training.weighting.name == "dwa"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["training.lrr=1"])
    assert str(path) in str(info.value) and "training.lrr: unknown key. Did you mean 'lr'?" in str(info.value)


@pytest.mark.parametrize("text", ["", "# a comment only\n", "\n\n"])
def test_an_empty_file_is_refused_unless_overrides_fill_it(tmp_path: Path, text: str) -> None:
    # an empty config is a truncated save far more often than a request for every default (issue 17's catalogue)
    with pytest.raises(ConfigError, match=r"cfg\.yaml is empty \(no keys\).*examples/configs"):
        load_config(_write(tmp_path, text))
    assert load_config(_write(tmp_path, text), ["training.lr=0.5"]) == Config.from_dict({"training": {"lr": 0.5}})


@pytest.mark.parametrize("text", ["training: [1,\n", "a: b: c\n", "\tx: 1\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        Config.from_dict([1, 2])  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(info.value) and "does not exist" in str(info.value)


_SHIPPED = sorted(p.stem for p in (Path(__file__).parents[1] / "src" / "mtml" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", _SHIPPED)
def test_shipped_configs_validate(name: str) -> None:
    from importlib import resources

    text = resources.files("mtml").joinpath("configs", f"{name}.yaml").read_text()
    cfg = Config.from_dict(yaml.safe_load(text), source=name)
    if name in ("synthetic", "penguins", "schools", "movies", "fashion", "images", "texts", "tables"):
        assert cfg.data.dataset == name
    assert cfg.threads is not None, "shipped configs set threads (1 keeps small models fast)"


def test_every_shipped_config_is_checked() -> None:
    assert len(_SHIPPED) >= 30 and "texts_finetune" in _SHIPPED


def test_missing_required_dataset_options() -> None:
    assert _error({"data": {"dataset": "table"}}).startswith("data.options: missing required options 'path'")
