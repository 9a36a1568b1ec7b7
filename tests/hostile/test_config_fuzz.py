"""A config fuzzer: every shipped config, mutated by hypothesis (keys dropped, misspelt or added, values of the
wrong type, out of range, huge, non-finite, empty), must load or fail with an :class:`~mtml.errors.MtmlError` —
never another exception (a traceback at the command line). Configs of the cheap datasets are also built (data,
model, weighting or algorithm) and trained for two steps, which reaches the options' own schemas and the data
checks (issue 17: *a hypothesis-driven config fuzzer*).
"""

from __future__ import annotations

import copy
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtml.config import load_config
from mtml.errors import MtmlError
from mtml.workflows import train
from mtml.workflows._build import build

CONFIGS = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))
CHEAP = {"synthetic", "penguins", "schools", "sinusoid", "gaussian_classes"}
HOSTILE: list[Any] = [None, 0, -1, 1, 2**63, -(2**63), 1e308, -1e-308, math.inf, -math.inf, math.nan, "", "x",
                      "nan", "1e-4", "-", [], [0], [[1]], {}, {"a": 1}, True, False, 0.5, -0.5, 1e-12, "🙂", "../x"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a nested mapping (lists are leaves: their items are mutated as a whole)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out.extend(_paths(value, (*prefix, key)))
    return out


def _parent(config: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    node: Any = config
    for key in path[:-1]:
        node = node[key]
    return node  # type: ignore[no-any-return]


@st.composite
def mutated(draw: st.DrawFn, files: list[Path], most: int = 3) -> tuple[str, dict[str, Any], list[str]]:
    path = draw(st.sampled_from(files))
    config = yaml.safe_load(path.read_text())
    done: list[str] = []
    for _ in range(draw(st.integers(1, most))):
        paths = _paths(config)
        if not paths:
            break
        where = draw(st.sampled_from(paths))
        parent = _parent(config, where)
        if where[-1] not in parent:
            continue
        op = draw(st.sampled_from(["set", "set", "set", "drop", "misspell", "add"]))
        if op == "set":
            parent[where[-1]] = copy.deepcopy(draw(st.sampled_from(HOSTILE)))
        elif op == "drop":
            del parent[where[-1]]
        elif op == "misspell":
            parent[f"{where[-1]}x"] = parent.pop(where[-1])
        else:
            parent[f"unknown_{len(done)}"] = draw(st.sampled_from(HOSTILE))
        done.append(f"{op} {'.'.join(map(str, where))}")
    return path.name, config, done


def _write(tmp: Path, config: dict[str, Any]) -> Path:
    out = tmp / "fuzzed.yaml"
    out.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out


TRAINED: list[str] = []  # configs that trained to the end (the test checks some did: the path is reached)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated(CONFIGS))
def test_every_mutated_shipped_config_loads_or_fails_with_one_line(case: tuple[str, dict[str, Any], list[str]],
                                                                   tmp_path: Path) -> None:
    name, config, mutations = case
    try:
        load_config(_write(tmp_path, config))
    except MtmlError:
        pass
    except Exception as exc:  # anything else is what the test looks for
        pytest.fail(f"{name} with {mutations}: {type(exc).__name__}: {exc}")


def _cheap(path: Path) -> bool:
    data = yaml.safe_load(path.read_text()).get("data", {})
    return isinstance(data, dict) and data.get("dataset") in CHEAP


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True,  # the same examples in every run (see the next test)
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated([p for p in CONFIGS if _cheap(p)], most=1))  # one mutation: more of them reach training
def test_mutated_cheap_configs_build_and_train_or_fail_with_one_line(case: tuple[str, dict[str, Any], list[str]],
                                                                     tmp_path: Path) -> None:
    name, config, mutations = case
    training = config.get("training")
    if isinstance(training, dict):  # two steps: enough to reach every check, cheap enough for many examples
        for key, value in (("max_steps", 2), ("eval_every", 1), ("meta_val_tasks", 4), ("meta_test_tasks", 4)):
            if key in training and isinstance(training[key], int) and not isinstance(training[key], bool):
                training[key] = min(training[key], value) if training[key] > 0 else training[key]
    try:
        loaded = load_config(_write(tmp_path, config))
        build(loaded)
        # a fresh directory per example: hypothesis reuses tmp_path, and an existing run would be refused
        train(loaded, tmp_path / f"run-{uuid.uuid4().hex[:8]}")
        TRAINED.append(name)
    except MtmlError:
        pass
    except Exception as exc:  # anything else is what the test looks for
        pytest.fail(f"{name} with {mutations}: {type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_the_fuzzer_reaches_training() -> None:
    """Runs after the fuzzer above (same module, file order): some mutated configs must have trained to the end,
    or the fuzzer only ever exercised the refusals. (Run it with the module, not alone.)"""
    print(f"{len(TRAINED)} mutated configs trained: {sorted(set(TRAINED))}")
    assert len(TRAINED) >= 5, f"only {len(TRAINED)} mutated configs trained: the fuzzer hardly reached training"
