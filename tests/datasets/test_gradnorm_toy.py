"""GradNorm's synthetic tasks (Chen et al., ICML 2018, §4): targets against the formula σᵢ·tanh((B + εᵢ)x) with B
and εᵢ recomputed from the seed, scale ratios, shared inputs, determinism and bad options."""

from __future__ import annotations

import math

import pytest
import torch

from mtml.datasets import DATASETS
from mtml.datasets._gradnorm_toy import gradnorm_scales, gradnorm_synthetic
from mtml.errors import ConfigError
from mtml.groups import task_groups


def test_targets_follow_the_formula() -> None:
    tasks = gradnorm_synthetic(num_tasks=3, in_dim=7, out_dim=4, n_train=20, n_val=5, n_test=6, seed=5)
    gen = torch.Generator().manual_seed(5)  # the draw order the docstring promises: B, every εᵢ, then inputs
    b = 10.0 * torch.randn(4, 7, generator=gen)
    eps = 3.5 * torch.randn(3, 4, 7, generator=gen)
    x_train = 2 * torch.rand(20, 7, generator=gen) - 1
    sigma = [1.0, 10.0, 100.0]
    for i, task in enumerate(tasks):
        assert task.name == f"task_{i}" and task.group == "gradnorm" and task.kind.value == "regression"
        assert torch.equal(task.train.x, x_train)
        for n in range(20):  # one row at a time, a loop over the formula
            want = sigma[i] * torch.tanh((b + eps[i]) @ x_train[n])
            torch.testing.assert_close(task.train.y[n], want)
        assert tuple(task.val.y.shape) == (5, 4) and tuple(task.test.x.shape) == (6, 7)
    assert len(task_groups(tasks)) == 1


def test_default_setting_and_scales() -> None:
    tasks = DATASETS.create("gradnorm_synthetic", n_train=50, n_val=10, n_test=10)
    assert len(tasks) == 10
    assert tuple(tasks[0].train.x.shape) == (50, 250) and tuple(tasks[0].train.y.shape) == (50, 100)
    s = gradnorm_scales(10)
    assert s[0] == pytest.approx(1.0) and s[-1] == pytest.approx(100.0)
    assert all(math.isclose(s[i + 1] / s[i], 100 ** (1 / 9)) for i in range(9))
    # the targets' magnitudes follow σᵢ (tanh saturates: |y| ≈ σᵢ)
    mags = [float(t.train.y.abs().mean()) for t in tasks]
    for i in range(10):
        assert mags[i] / s[i] == pytest.approx(mags[0] / s[0], rel=0.05)
    assert gradnorm_scales(1) == [1.0]


def test_explicit_scales_and_determinism() -> None:
    one = gradnorm_synthetic(scales=[2, 5], in_dim=3, out_dim=2, n_train=4, n_val=2, n_test=2, seed=1)
    two = gradnorm_synthetic(scales=[2, 5], num_tasks=2, in_dim=3, out_dim=2, n_train=4, n_val=2, n_test=2, seed=1)
    other = gradnorm_synthetic(scales=[2, 5], in_dim=3, out_dim=2, n_train=4, n_val=2, n_test=2, seed=2)
    assert len(one) == 2 and torch.equal(one[1].train.y, two[1].train.y)
    assert not torch.equal(one[1].train.y, other[1].train.y)


@pytest.mark.parametrize(("options", "fragment"), [
    ({"num_tasks": 0}, "`num_tasks` must be an integer >= 1"),
    ({"scales": [1, -2]}, "`scales` must be a non-empty list of positive numbers"),
    ({"scales": []}, "`scales` must be a non-empty list"),
    ({"scales": "1,2"}, "`scales` must be a non-empty list"),
    ({"scales": [1, 2], "num_tasks": 3}, "`scales` holds 2 values but `num_tasks` is 3"),
    ({"in_dim": 0}, "`in_dim` must be an integer >= 1"),
    ({"task_std": -1.0}, "`task_std` must be a number >= 0"),
    ({"seed": -1}, "`seed` must be an integer >= 0"),
])
def test_bad_options(options: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        gradnorm_synthetic(**options)
    assert fragment in str(err.value) and "\n" not in str(err.value)
