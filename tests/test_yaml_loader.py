"""The one YAML reader: YAML 1.2 numbers (``3e-4`` is a float), duplicate keys refused, unreadable files named."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from mtml._yaml import load_yaml
from mtml.cli import main
from mtml.config import load_config, parse_overrides
from mtml.errors import ConfigError


@pytest.mark.parametrize(("text", "value"), [
    ("3e-4", 3e-4), ("1E5", 1e5), ("+2e3", 2e3), ("-1e-2", -1e-2), (".5e-3", 5e-4), ("1.5e+2", 150.0),
    ("1.5", 1.5), ("10", 10), ("1_000", 1000), (".inf", float("inf")), ("'3e-4'", "3e-4"), ("1e", "1e"),
    ("e5", "e5"), ("0x1f", 31), ("true", True), ("null", None),
])
def test_numbers_follow_yaml_1_2(text: str, value: object) -> None:
    got = load_yaml(f"v: {text}", "t")["v"]
    assert got == value and type(got) is type(value)


def test_pyyaml_alone_reads_exponents_as_strings() -> None:
    """The reason for this loader: without it ``lr: 3e-4`` is the string '3e-4'."""
    assert yaml.safe_load("lr: 3e-4")["lr"] == "3e-4"


@pytest.mark.parametrize(("text", "key", "first"), [
    ("training:\n  lr: 1\nseed: 0\ntraining:\n  max_steps: 3\n", "training", 1),
    ("data:\n  options:\n    shots: 1\n    shots: 5\n", "shots", 3),
])
def test_a_key_given_twice_is_refused_with_both_lines(text: str, key: str, first: int) -> None:
    with pytest.raises(ConfigError, match=rf"key '{key}' is given twice \(first on line {first}\)"):
        load_yaml(text, "cfg.yaml")


def test_merge_keys_may_override_what_they_merge() -> None:
    assert load_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", "t")["other"] == {"x": 3, "y": 2}


def test_every_shipped_config_reads_as_before() -> None:
    for path in resources.files("mtml.configs").iterdir():
        if path.name.endswith(".yaml"):
            text = path.read_text()
            assert load_yaml(text, path.name) == yaml.safe_load(text), path.name


def test_set_overrides_take_exponent_floats() -> None:
    assert parse_overrides(["training.lr=1e-4", "model.trunk_hidden=[8,8]", "name=[unclosed"]) == [
        (["training", "lr"], 1e-4), (["model", "trunk_hidden"], [8, 8]), (["name"], "[unclosed")]


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


SYNTHETIC = "data:\n  dataset: synthetic\ntraining:\n  lr: 3e-4\n  max_steps: 3\n  eval_every: 3\n"


def test_a_config_with_lr_3e_4_loads(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, SYNTHETIC)).training.lr == 3e-4
    assert load_config(_write(tmp_path, SYNTHETIC), ["training.lr=1e-5"]).training.lr == 1e-5


@pytest.mark.parametrize(("content", "match"), [
    (b"name: caf\xe9\n", r"is not UTF-8 text \(byte 9 cannot be decoded\); save it as UTF-8"),
    (SYNTHETIC + "training:\n  lr: 1\n", r"key 'training' is given twice \(first on line 3\)"),
])
def test_unreadable_configs_stop_with_one_message(tmp_path: Path, content: str | bytes, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, content))


def test_a_directory_given_as_the_config_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is a directory, not a config file.*--resume"):
        load_config(tmp_path)


def test_the_cli_prints_the_duplicate_key_without_a_traceback(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, SYNTHETIC + "training:\n  max_steps: 5\n")
    with pytest.raises(SystemExit) as stop:
        main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "given twice" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
