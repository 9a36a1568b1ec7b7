"""Δm % (Maninis et al., CVPR 2019; Vandenhende et al., TPAMI 2021): :func:`mtml.metrics.delta_m` against hand
computations, its refusals, and the Student-t interval and table of benchmarks/weighting_delta_m.py."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from mtml.metrics import delta_m


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "weighting_delta_m.py"
    spec = importlib.util.spec_from_file_location("weighting_delta_m", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_two_accuracies_by_hand() -> None:
    # left: 0.80 vs 0.75 (+6.67 % better), right: 0.60 vs 0.72 (−16.67 % worse): Δm = (−6.667 + 16.667)/2 = 5
    got = delta_m({"left": 0.80, "right": 0.60}, {"left": 0.75, "right": 0.72}, {"left": True, "right": True})
    assert got == pytest.approx(5.0, abs=1e-9)


def test_mixed_directions_by_hand() -> None:
    # accuracy 0.9 vs 1.0: −(0.9 − 1)/1 = +0.1; mse 2.0 vs 1.6 (lower is better): +(2 − 1.6)/1.6 = +0.25
    got = delta_m({"acc": 0.9, "mse": 2.0}, {"acc": 1.0, "mse": 1.6}, {"acc": True, "mse": False})
    assert got == pytest.approx(100 * (0.1 + 0.25) / 2, abs=1e-9)


def test_equal_to_baseline_is_zero_and_better_is_negative() -> None:
    base = {"a": 0.5, "b": 3.0}
    higher = {"a": True, "b": False}
    assert delta_m(base, base, higher) == 0.0
    assert delta_m({"a": 0.6, "b": 2.0}, base, higher) < 0


def test_refusals() -> None:
    with pytest.raises(ValueError, match="same non-empty keys"):
        delta_m({"a": 1.0}, {"b": 1.0}, {"a": True})
    with pytest.raises(ValueError, match="same non-empty keys"):
        delta_m({}, {}, {})
    with pytest.raises(ValueError, match="is 0"):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": False})


def test_benchmark_interval_and_table() -> None:
    bench = _load()
    mean, half = bench.ci([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    assert bench.ci([4.0]) == (4.0, 0.0)
    single = {0: {"left": 0.75, "right": 0.72}, 1: {"left": 0.75, "right": 0.72}}
    res = {"single": single, "runs": {"m": {0: {"left": 0.80, "right": 0.60}, 1: {"left": 0.80, "right": 0.60}}},
           "failed": {"broken": "ConfigError: needs x"}, "seconds": {"m": [1.0, 1.0]}, "metric": "accuracy",
           "higher": True}
    text = bench.table("multi_fashion", res, [0, 1])
    assert "| m | 80.00 ± 0.00 | 60.00 ± 0.00 | 5.00 ± 0.00 | 1.0 |" in text
    assert "| broken | not run | not run | not run | ConfigError: needs x |" in text
