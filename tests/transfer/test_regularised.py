"""Regularised fine-tuning (DELTA, BSS, Co-Tuning, StochNorm, LwF): each penalty against a hand computation on a
tiny batch, each objective against its formula written out, behaviour at the extremes of its weight, refusals,
and a run of each through ``transfer`` (the library call behind ``mtml transfer``)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from mtml.config import Config
from mtml.errors import ConfigError
from mtml.nn import MultiTaskModel, mlp
from mtml.tasks import Split, Task
from mtml.transfer._regularised import (
    StochNormLayer,
    bss_penalty,
    category_relationship,
    channel_attention,
    distillation_loss,
    feature_map_distance,
)
from mtml.transfer._strategies import BSS, DELTA, STRATEGIES, CoTuning, LwF, Source, StochNorm
from mtml.workflows import train
from mtml.workflows._transfer import transfer

D_IN = 5
F64 = torch.float64


def _model(out: int = 3, heads: tuple[str, ...] = ("a", "b"), seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(mlp(D_IN, [6, 4]), {n: mlp(4, [], out) for n in heads},
                          input_shapes={n: (D_IN,) for n in heads})


def _task(kind: str = "multiclass", n: int = 12, seed: int = 1) -> Task:
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(n, D_IN, generator=g), torch.randn(30, D_IN, generator=g)
    if kind == "regression":
        w = torch.randn(D_IN, 2, generator=g)
        return Task("t", "regression", Split(x, x @ w), test=Split(xt, xt @ w))
    if kind == "binary":
        return Task("t", "binary", Split(x, (x[:, 0] > 0).float()), test=Split(xt, (xt[:, 0] > 0).float()))
    y = torch.arange(n) % 3
    return Task("t", "multiclass", Split(x + y[:, None], y), test=Split(xt, torch.arange(30) % 3))


def _perturbed(module: nn.Module, seed: int = 5, scale: float = 0.3) -> nn.Module:
    out = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- BSS -----------------------------------------------------------------------------------------------------------
def test_bss_penalty_is_the_sum_of_the_k_smallest_squared_singular_values() -> None:
    g = _g(2)
    u, _ = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(4, 3, generator=g, dtype=F64))
    feats = u @ torch.diag(torch.tensor([3.0, 2.0, 0.5], dtype=F64)) @ v.T  # [6, 4] of rank 3: σ = 3, 2, 0.5, 0
    assert float(bss_penalty(feats, 1)) == pytest.approx(0.0, abs=1e-20)
    assert float(bss_penalty(feats, 2)) == pytest.approx(0.25)
    assert float(bss_penalty(feats, 3)) == pytest.approx(4.25)
    assert float(bss_penalty(feats, 9)) == pytest.approx(4.25)  # never the largest
    wide = torch.randn(3, 8, generator=g, dtype=F64)  # b < d: min(b, d) = 3 values, from the eigenvalues of F Fᵀ
    eig = torch.linalg.eigvalsh(wide @ wide.T)  # ascending
    assert float(bss_penalty(wide, 2)) == pytest.approx(float(eig[:2].sum()))
    assert float(bss_penalty(wide[:1], 1)) == 0.0  # one row: only the largest value, nothing to shrink


def test_bss_objective_and_its_effect() -> None:
    model, task = _model(), _task()
    strategy = BSS(k=2, eta=0.5)
    trunk, head = _perturbed(model.trunk), nn.Linear(4, 3)
    loss, extra = strategy.objective(trunk, head, Source(model), task, [], _g())
    x, y = task.train.x, task.train.y
    f = trunk(x)
    s = torch.linalg.svdvals(f)
    expected = F.cross_entropy(head(f), y) + 0.5 * s[-2:].square().sum()
    torch.testing.assert_close(loss(x, y), expected)
    assert extra == []

    def smallest(eta: float) -> float:
        predictor = STRATEGIES.create("bss", eta=eta, steps=60).fit(Source(model), task, generator=_g())
        return float(torch.linalg.svdvals(predictor[0](x))[-1])

    assert smallest(100.0) < 0.2 * smallest(1e-8)


# -- DELTA ---------------------------------------------------------------------------------------------------------
def test_feature_map_distance_by_hand() -> None:
    maps = [torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]]),
            torch.arange(16.0).reshape(2, 2, 2, 2)]  # a conv map: [n=2, c=2, 2, 2]
    anchors = [torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 2.0]]), torch.zeros(2, 2, 2, 2)]
    weights = [torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, 3.0])]
    # layer 0: example 0 (1, 0, 4)·w = 1 + 0 + 2 = 3; example 1 (1, 4, 0)·w = 1 + 8 = 9 → mean 6
    # layer 1: channel 1 of example 0 holds 4..7 (mean square 126/4), of example 1 holds 12..15 (734/4); × 3
    conv = 3 * (126 / 4 + 734 / 4) / 2
    assert float(feature_map_distance(maps, anchors, weights)) == pytest.approx(6 + conv)
    unweighted = (1 + 0 + 4 + 1 + 4 + 0) / 2 + ((0 + 1 + 4 + 9) / 4 + 126 / 4 + (64 + 81 + 100 + 121) / 4
                                                 + 734 / 4) / 2
    assert float(feature_map_distance(maps, anchors)) == pytest.approx(unweighted)


def test_channel_attention_by_hand() -> None:
    drops = torch.tensor([1.0, 2.0, 3.0])
    std = math.sqrt(2 / 3)
    e = [math.exp((d - 2) / std / 5) for d in (1.0, 2.0, 3.0)]
    expected = [3 * v / sum(e) for v in e]
    torch.testing.assert_close(channel_attention(drops, 5.0), torch.tensor(expected))
    torch.testing.assert_close(channel_attention(torch.full((4,), 0.7)), torch.ones(4))  # no spread: uniform


def test_delta_attention_is_the_loss_rise_of_each_switched_off_channel() -> None:
    model, task = _model(), _task()
    strategy = DELTA(steps=1, lr=1e-12)  # the probe head stays at its start, so the drops can be redone by hand
    head = nn.Linear(4, 3)
    weights = strategy.attention_weights(Source(model), task, head, _g())
    x, y = task.train.x, task.train.y
    with torch.no_grad():
        base = F.cross_entropy(head(model.trunk(x)), y)
        for block, (index, w) in zip([0, 2], enumerate(weights), strict=True):
            drops = []
            for j in range(w.shape[0]):
                off = copy.deepcopy(model.trunk)
                off[block].weight[j] = 0
                off[block].bias[j] = 0
                drops.append(F.cross_entropy(head(off(x)), y) - base)
            torch.testing.assert_close(w, channel_attention(torch.stack(drops)), msg=f"block {index}")
    assert [w.shape[0] for w in weights] == [6, 4]


def test_delta_objective_and_its_extremes() -> None:
    model, task = _model(), _task()
    strategy = DELTA(alpha=0.3, beta=0.2, attention=False)
    trunk, head = _perturbed(model.trunk), nn.Linear(4, 3)
    head0 = [torch.zeros_like(p) for p in head.parameters()]
    loss, _ = strategy.objective(trunk, head, Source(model), task, head0, _g())
    x, y = task.train.x, task.train.y
    dist = sum(((trunk[: i + 1](x) - model.trunk[: i + 1](x)) ** 2).sum(1).mean() for i in (0, 2))
    pull = sum(p.square().sum() for p in head.parameters())
    expected = F.cross_entropy(head(trunk(x)), y) + 0.15 * dist + 0.1 * pull
    torch.testing.assert_close(loss(x, y), expected)
    assert strategy.weights is None

    def moved(alpha: float) -> float:
        s = DELTA(alpha=alpha, steps=80, lr=0.03)
        predictor = s.fit(Source(model), task, generator=_g())
        assert s.weights is not None and len(s.weights) == 2  # the supervised attention was computed
        with torch.no_grad():
            return float((predictor[0](x) - model.trunk(x)).abs().max())

    assert moved(1e4) < 0.1 * moved(1e-6)


# -- LwF -----------------------------------------------------------------------------------------------------------
def test_distillation_loss_by_hand() -> None:
    out = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    rec = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    t = 2.0

    def soft(row: list[float]) -> list[float]:
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    ce = [-sum(p * math.log(q) for p, q in zip(soft(r.tolist()), soft(o.tolist()), strict=True))
          for o, r in zip(out, rec, strict=True)]
    assert float(distillation_loss(out, rec, "multiclass", t)) == pytest.approx(sum(ce) / 2)
    o, r = torch.tensor([[0.4], [-1.0]]), torch.tensor([[1.0], [3.0]])
    sig = [1 / (1 + math.exp(-v / t)) for v in (0.4, -1.0, 1.0, 3.0)]
    bce = [-(sig[2 + i] * math.log(sig[i]) + (1 - sig[2 + i]) * math.log(1 - sig[i])) for i in range(2)]
    assert float(distillation_loss(o, r, "binary", t)) == pytest.approx(sum(bce) / 2)
    assert float(distillation_loss(out, rec, "regression", t)) == pytest.approx(float(((out - rec) ** 2).mean()))


def test_lwf_objective_stacked_heads_equal_the_loop_over_heads() -> None:
    torch.manual_seed(0)
    heads: dict[str, nn.Module] = {"a": mlp(4, [], 3), "b": mlp(4, [], 3), "c": mlp(4, [3], 3), "r": nn.Linear(4, 1)}
    model = MultiTaskModel(mlp(D_IN, [6, 4]), heads, input_shapes={n: (D_IN,) for n in heads})
    kinds = {"a": "multiclass", "b": "multiclass", "c": "multiclass", "r": "regression"}
    source, task = Source(model, kinds=kinds), _task()
    strategy = LwF(trade_off=0.7, temperature=3.0)
    trunk, head = _perturbed(model.trunk), nn.Linear(4, 3)
    loss, extra = strategy.objective(trunk, head, source, task, [], _g())
    assert len(extra) == 2 + 4 + 2  # stacked a+b (weight, bias), c's two layers, r
    x, y = task.train.x, task.train.y
    with torch.no_grad():
        rec = {n: model(x, n) for n in heads}
    f = trunk(x)
    old = [distillation_loss(heads[n](f), rec[n], kinds[n], 3.0) for n in "abcr"]
    expected = F.cross_entropy(head(f), y) + 0.7 * torch.stack(old).mean()
    torch.testing.assert_close(loss(x, y), expected)


def test_lwf_with_a_huge_weight_keeps_the_source_heads_outputs() -> None:
    model, task = _model(), _task()
    kinds = {"a": "multiclass", "b": "multiclass"}
    x = task.test.x

    def drift(trade_off: float) -> float:
        s = LwF(trade_off=trade_off, steps=80, lr=0.03)
        predictor = s.fit(Source(model, kinds=kinds), task, generator=_g())
        with torch.no_grad():
            return float((torch.softmax(model.heads["a"](predictor[0](x)), 1)
                          - torch.softmax(model(x, "a"), 1)).abs().max())

    assert drift(1e4) < 0.2 * drift(1e-6)


# -- Co-Tuning -----------------------------------------------------------------------------------------------------
def test_category_relationship_rows_are_the_mean_source_prediction_per_class() -> None:
    g = _g(4)
    probs = torch.softmax(torch.randn(10, 4, generator=g, dtype=F64), 1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
    rel = category_relationship(probs, labels, 4)  # class 3 has no example
    for c in range(3):
        torch.testing.assert_close(rel[c], probs[labels == c].mean(0))
    torch.testing.assert_close(rel[3], torch.full((4,), 0.25, dtype=F64))
    torch.testing.assert_close(rel.sum(1), torch.ones(4, dtype=F64))


def test_co_tuning_relationship_and_objective() -> None:
    model, task = _model(out=4), _task()
    source = Source(model, kinds={"a": "multiclass", "b": "multiclass"})
    strategy = CoTuning(trade_off=1.5)
    trunk, head = _perturbed(model.trunk), nn.Linear(4, 3)
    loss, extra = strategy.objective(trunk, head, source, task, [], _g())
    x, y = task.train.x, task.train.y
    with torch.no_grad():
        probs = torch.softmax(model(x, "a"), 1)
    rel = strategy.relationship
    assert rel is not None and rel.shape == (3, 4)
    for c in range(3):
        torch.testing.assert_close(rel[c], probs[y == c].mean(0))
    f = trunk(x)
    expected = F.cross_entropy(head(f), y) - 1.5 * (rel[y] * torch.log_softmax(model.heads["a"](f), 1)).sum(1).mean()
    torch.testing.assert_close(loss(x, y), expected)
    assert len(extra) == 2  # the source head trains too
    predictor = strategy.fit(source, task, generator=_g())
    assert predictor(task.test.x).shape == (30, 3)


def test_co_tuning_with_a_binary_source_head_and_a_binary_target() -> None:
    model, task = _model(out=1, heads=("flag",)), _task("binary")
    strategy = CoTuning()
    strategy.fit(Source(model, kinds={"flag": "binary"}), task, generator=_g())
    rel, x, y = strategy.relationship, task.train.x, task.train.y.long()
    with torch.no_grad():
        p = torch.sigmoid(model(x, "flag"))[:, 0]
    assert rel is not None and rel.shape == (2, 2)
    torch.testing.assert_close(rel[1, 1], p[y == 1].mean())
    torch.testing.assert_close(rel[0, 0], 1 - p[y == 0].mean())


def test_co_tuning_refuses_in_one_line() -> None:
    model = _model()
    for source, task, match in [(Source(model, kinds={"a": "multiclass"}), _task("regression"), "regression"),
                                (Source(model, kinds={"a": "regression"}), _task(), "binary or multiclass head")]:
        with pytest.raises(ConfigError, match=match) as err:
            STRATEGIES.create("co_tuning").fit(source, task, generator=_g())
        assert "\n" not in str(err.value)


# -- StochNorm -----------------------------------------------------------------------------------------------------
def _bn_model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(D_IN, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4),
                          nn.ReLU())
    model = MultiTaskModel(trunk, {"a": mlp(4, [], 3)}, input_shapes={"a": (D_IN,)})
    model.train()
    for _ in range(3):  # some moving statistics to mix with
        model.trunk(torch.randn(16, D_IN) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
def test_stochnorm_layer_mixes_batch_and_moving_statistics_per_channel(p: float) -> None:
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.arange(5.0))
        bn.running_var.copy_(torch.arange(1.0, 6.0))
        bn.weight.copy_(torch.linspace(0.5, 2, 5))
        bn.bias.copy_(torch.linspace(-1, 1, 5))
    reference, layer = copy.deepcopy(bn).train(), StochNormLayer(copy.deepcopy(bn), p, seed=2).train()
    x = torch.randn(4, 5, 3, 3, generator=_g(1))
    moving = copy.deepcopy(bn).eval()(x)  # the statistics before this batch
    batch = reference(x)
    out = layer(x)
    chosen = torch.rand(5, generator=torch.Generator().manual_seed(2)) < p
    for c in range(5):
        torch.testing.assert_close(out[:, c], (moving if bool(chosen[c]) else batch)[:, c])
    if p == 0.5:
        assert 0 < int(chosen.sum()) < 5  # both branches taken in this draw
    torch.testing.assert_close(layer.bn.running_mean, reference.running_mean)  # moving statistics update as BN's
    torch.testing.assert_close(layer.bn.running_var, reference.running_var)
    torch.testing.assert_close(layer.eval()(x), reference.eval()(x))  # eval mode: the BatchNorm


def test_stochnorm_fine_tunes_a_batchnorm_source_and_leaves_it() -> None:
    model, task = _bn_model(), _task()
    before = copy.deepcopy(model.state_dict())
    predictor = STRATEGIES.create("stochnorm", steps=20).fit(Source(model), task, generator=_g())
    layers = [m for m in predictor.modules() if isinstance(m, StochNormLayer)]
    assert len(layers) == 2 and not predictor.training
    assert not torch.equal(layers[0].bn.running_mean, model.trunk[1].running_mean)  # its statistics moved
    pred = predictor(task.test.x)
    assert pred.shape == (30, 3) and bool(torch.isfinite(pred).all())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_stochnorm_refuses_a_trunk_without_batchnorm_in_one_line() -> None:
    with pytest.raises(ConfigError, match="BatchNorm") as err:
        STRATEGIES.create("stochnorm").fit(Source(_model()), _task(), generator=_g())
    assert "\n" not in str(err.value) and "finetune_all" in str(err.value)
    assert STRATEGIES.create("stochnorm").refusal(Source(_bn_model()), _task()) is None


# -- options -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "opts", "match"), [
    ("delta", {"alpha": 0}, "`alpha`"), ("delta", {"beta": -1}, "`beta`"), ("delta", {"attention": "maybe"},
                                                                           "attention"),
    ("delta", {"temperature": 0}, "`temperature`"), ("bss", {"k": 0}, "`k`"), ("bss", {"eta": -0.1}, "`eta`"),
    ("co_tuning", {"trade_off": 0}, "`trade_off`"), ("co_tuning", {"source_task": 3}, "source_task"),
    ("stochnorm", {"p": 1.5}, "`p`"), ("lwf", {"temperature": -2}, "`temperature`"),
    ("lwf", {"trade_off": float("inf")}, "`trade_off`"), ("lwf", {"part": "head"}, "part"),
])
def test_bad_options_are_one_line_config_errors(name: str, opts: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        STRATEGIES.create(name, where=f"strategy '{name}'", **opts)
    assert "\n" not in str(err.value)


def test_every_new_strategy_leaves_the_source() -> None:
    model, task = _model(), _task()
    kinds = {"a": "multiclass", "b": "multiclass"}
    before = copy.deepcopy(model.state_dict())
    for cls in (DELTA, BSS, CoTuning, LwF):
        cls(steps=5).fit(Source(model, kinds=kinds), task, generator=_g())  # type: ignore[abstract]
    StochNorm(steps=5).fit(Source(_bn_model()), task, generator=_g())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- through `transfer` --------------------------------------------------------------------------------------------
DATA = {"num_tasks": 2, "in_dim": 6, "latent_dim": 2, "n_train": 20, "n_val": 10, "n_test": 20}
TRAINING = {"lr": 0.01, "batch_size": 16, "max_steps": 20, "eval_every": 10, "patience": 0}
NEW = {n: {"steps": 8} for n in ("scratch", "delta", "bss", "lwf")}


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def regression(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny regression source run and a target config of the same family (other tasks)."""
    root = tmp_path_factory.mktemp("regularised")
    train(Config.from_dict({"name": "src", "seed": 0, "threads": 1, "data": {"dataset": "synthetic", "options": DATA},
                            "model": {"trunk_hidden": [6, 4]}, "training": TRAINING}), root / "src")
    target = _write(root / "t.yaml", {"name": "tgt", "seed": 1, "data": {
        "dataset": "synthetic", "options": {**DATA, "seed": 5}}})
    return root / "src", target


def test_transfer_runs_delta_bss_lwf_and_refuses_co_tuning_for_regression(regression: tuple[Path, Path]) -> None:
    source, target = regression
    result = transfer(source, target, strategies=list(NEW), sizes=[3], repeats=2, options=NEW)
    assert set(result.scores["mse"]) == set(NEW)
    assert all(math.isfinite(v) for n in NEW for v in result.scores["mse"][n]["3"]["values"])
    with pytest.raises(ConfigError, match=r"co_tuning.*regression"):
        transfer(source, target, strategies=["co_tuning"], sizes=[3], repeats=1)
    with pytest.raises(ConfigError, match=r"stochnorm.*BatchNorm"):
        transfer(source, target, strategies=["stochnorm"], sizes=[3], repeats=1)


@pytest.mark.slow  # two subprocesses, each importing torch
def test_cli_runs_the_new_strategies_and_refuses_in_one_line(regression: tuple[Path, Path], tmp_path: Path) -> None:
    source, target = regression
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mtml", "transfer", str(source), "--target", str(target),
                               *map(str, args)], capture_output=True, text=True, env=env, timeout=300)

    steps = [a for n in ("scratch", "delta", "bss", "lwf") for a in ("--option", f"{n}.steps=5")]
    proc = cli("--strategies", "delta,bss,lwf", "--sizes", "2", "--repeats", "2", *steps, "--option",
               "delta.attention=false", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads((tmp_path / "out" / "transfer.json").read_text())["strategies"]) == {
        "scratch", "delta", "bss", "lwf"}
    proc = cli("--strategies", "co_tuning", "--sizes", "2", "--repeats", "1", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "co_tuning" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_transfer_runs_co_tuning_and_lwf_from_a_classification_source(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    g = _g(0)
    x = torch.randn(200, 6, generator=g)
    frame: dict[str, Any] = {f"f{i}": x[:, i].numpy() for i in range(6)}
    frame["a"] = x[:, :3].argmax(1).numpy().astype(str)
    frame["b"] = ((x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()).numpy().astype(str)
    pd.DataFrame(frame).to_csv(tmp_path / "data.csv", index=False)

    def config(name: str, column: str) -> dict[str, Any]:
        return {"name": name, "seed": 0, "threads": 1, "data": {"dataset": "table", "options": {
            "path": str(tmp_path / "data.csv"), "features": [f"f{i}" for i in range(6)],
            "targets": {column: {"column": column, "kind": "multiclass"}}}},
            "model": {"trunk_hidden": [8]}, "training": TRAINING}

    train(Config.from_dict(config("src", "a")), tmp_path / "src")
    target = _write(tmp_path / "t.yaml", config("tgt", "b"))
    opts = {n: {"steps": 8} for n in ("scratch", "co_tuning", "lwf", "delta", "bss")}
    result = transfer(tmp_path / "src", target, strategies=list(opts), sizes=[2], repeats=2, options=opts)
    acc = result.scores["accuracy"]
    assert set(acc) == set(opts) and all(0 <= v <= 1 for n in opts for v in acc[n]["2"]["values"])
