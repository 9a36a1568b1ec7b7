"""Unsupervised domain adaptation: each loss against a hand computation, the shifts, and ``mtml adapt`` end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mtml.config import Config
from mtml.datasets import DATASETS
from mtml.datasets._fashion import DEFAULT_ROOT
from mtml.datasets._shifts import apply_shift, fashion_shift, glyph_shift
from mtml.errors import ConfigError, RunExistsError, UnknownNameError
from mtml.nn import MultiTaskModel
from mtml.tasks import Split, Task
from mtml.transfer import ADAPTERS, Source, supervised_target
from mtml.transfer._adaptation import (
    class_confusion,
    dann_lambda,
    domain_loss,
    entropy_weights,
    grad_reverse,
    margin_disparity,
    mcc_loss,
    multilinear_map,
)
from mtml.workflows import adapt, parse_methods, train

REAL = Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not REAL, reason="sudo apt-get install dataset-fashion-mnist")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


# -- the pieces, by hand ------------------------------------------------------------------------------------------
def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward() -> None:
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    w = torch.tensor([[2.0, 1.0], [-1.0, 4.0]])
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x.detach())
    (y * w).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, -0.3 * w)
    z = x.detach().requires_grad_(True)  # and without the layer the sign is the ordinary one
    (z * w).sum().backward()
    assert z.grad is not None and torch.allclose(z.grad, w)


def test_dann_lambda_is_the_papers_schedule() -> None:
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_lambda(1.0) == pytest.approx(0.9999092, abs=1e-7)
    values = [dann_lambda(p / 10) for p in range(11)]
    assert values == sorted(values)


def test_multilinear_map_is_the_flattened_outer_product() -> None:
    f = torch.tensor([[1.0, 2.0, -1.0], [0.0, 3.0, 1.0]])
    g = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    out = multilinear_map(f, g)
    assert out.shape == (2, 6)
    assert torch.allclose(out[0], torch.tensor([0.25, 0.5, -0.25, 0.75, 1.5, -0.75]))
    for i in range(2):  # entry j·d + k is g_j · f_k
        for j in range(2):
            for k in range(3):
                assert out[i, j * 3 + k] == pytest.approx(float(g[i, j] * f[i, k]))


def test_entropy_weights_and_the_weighted_domain_loss_by_hand() -> None:
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]])
    w = entropy_weights(p)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert torch.allclose(w, torch.tensor([2.0, 1.5, 1 + math.exp(-h)]))
    ls, lt = torch.tensor([0.3, -1.0]), torch.tensor([2.0])
    ws, wt = torch.tensor([2.0, 1.0]), torch.tensor([1.5])

    def sp(v: float) -> float:  # softplus: BCE(logit, 1) = softplus(−logit), BCE(logit, 0) = softplus(logit)
        return math.log1p(math.exp(v))

    hand = 0.5 * ((2 * sp(-0.3) + 1 * sp(1.0)) / 3 + sp(2.0))
    assert float(domain_loss(ls, lt, ws, wt)) == pytest.approx(hand)
    assert float(domain_loss(ls, lt)) == pytest.approx(0.5 * ((sp(-0.3) + sp(1.0)) / 2 + sp(2.0)))


def test_class_confusion_matrix_and_mcc_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    T = 2.0
    n, c = 3, 3
    probs = [[math.exp(v / T) for v in row] for row in logits.tolist()]
    probs = [[v / sum(row) for v in row] for row in probs]
    raw = [1 + math.exp(sum(q * math.log(q) for q in row)) for row in probs]
    w = [n * r / sum(raw) for r in raw]
    conf = [[sum(w[i] * probs[i][j] * probs[i][k] for i in range(n)) for k in range(c)] for j in range(c)]
    norm = [[conf[j][k] / sum(conf[j]) for k in range(c)] for j in range(c)]
    got = class_confusion(logits, T)
    assert torch.allclose(got, torch.tensor(norm), atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(3))
    off = sum(norm[j][k] for j in range(c) for k in range(c) if j != k) / c
    assert float(mcc_loss(logits, T)) == pytest.approx(off, abs=1e-6)
    confident = torch.tensor([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0], [0.0, 0.0, 50.0]])
    assert float(mcc_loss(confident, 1.0)) < 1e-9  # one-hot, non-confused predictions: no confusion


def test_margin_disparity_by_hand() -> None:
    y_s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # main head: predicts 0, 1 on source
    y_s_adv = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y_t = torch.tensor([[0.0, 3.0]])  # predicts 1 on target
    y_t_adv = torch.tensor([[0.5, 0.0]])
    gamma = 4.0

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    log_agree_s = (math.log(softmax([1.0, 0.0])[0]) + math.log(softmax([0.0, 0.0])[1])) / 2
    hand = math.log(1 - softmax([0.5, 0.0])[1]) + gamma * log_agree_s
    assert float(margin_disparity(y_s, y_s_adv, y_t, y_t_adv, gamma)) == pytest.approx(hand)
    agree = torch.tensor([[-9.0, 9.0]])  # the auxiliary head agreeing on the target lowers the disparity
    assert float(margin_disparity(y_s, y_s_adv, y_t, agree, gamma)) < hand


# -- the methods --------------------------------------------------------------------------------------------------
def _toy(seed: int = 0) -> tuple[Source, Task, Split]:
    """A 2-class source model on 4 features, source rows and a target task whose inputs are shifted by +3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(120, 4, generator=g)
    y = (x[:, 0] > 0).long()
    xt = torch.randn(80, 4, generator=g)
    target = Task("c", "multiclass", Split(xt + 3.0, (xt[:, 0] > 0).long()), test=Split(xt + 3.0,
                                                                                        (xt[:, 0] > 0).long()),
                  num_outputs=2)
    torch.manual_seed(seed)
    model = MultiTaskModel(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), {"c": nn.Linear(8, 2)},
                           input_shapes={"c": (4,)})
    return Source(model.eval(), kinds={"c": "multiclass"}), target, Split(x, y)


@pytest.mark.parametrize("name", ["dann", "cdan", "mcc", "mdd"])
def test_every_method_trains_the_source_start_and_leaves_the_source_alone(name: str) -> None:
    source, target, rows = _toy()
    before = [p.clone() for p in source.model.parameters()]
    method = ADAPTERS.create(name, steps=5, batch_size=16)
    predictor = method.fit(source, target, rows, target.train.x, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(method.last_transfer)  # the transfer term was computed
    assert all(torch.equal(a, b) for a, b in zip(before, source.model.parameters(), strict=True))
    start = nn.Sequential(source.model.trunk, source.model.heads["c"])
    assert not torch.equal(predictor(target.test.x), start(target.test.x))  # it trained
    again = ADAPTERS.create(name, steps=5, batch_size=16).fit(source, target, rows, target.train.x,
                                                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(predictor(target.test.x), again(target.test.x))  # seeded: reproducible


def test_dann_discriminator_gradient_reaches_the_trunk_reversed() -> None:
    """One DANN step's transfer term: its gradient on the trunk is −λ times the discriminator-loss gradient."""
    source, target, rows = _toy()
    dann = ADAPTERS.create("dann")
    disc = dann.modules(8, 2, source.model.heads["c"], 0)
    trunk = source.model.trunk
    trunk.requires_grad_(True)
    f_s, f_t = trunk(rows.x[:8]), trunk(target.train.x[:8])
    disc.eval()  # no dropout: both passes see the same discriminator
    term = dann.transfer(disc, f_s, f_t, f_s, f_t, 0.5)
    rev = torch.autograd.grad(term, list(trunk.parameters()), retain_graph=True)
    plain = torch.autograd.grad(domain_loss(disc[0](f_s), disc[0](f_t)), list(trunk.parameters()))
    trunk.requires_grad_(False)
    for a, b in zip(rev, plain, strict=True):
        assert torch.allclose(a, -dann_lambda(0.5) * b, atol=1e-6)


def test_supervised_target_fits_the_labelled_target() -> None:
    source, target, _ = _toy()
    start = nn.Sequential(source.model.trunk, source.model.heads["c"])
    predictor = supervised_target(source, target, steps=200, lr=0.01, generator=torch.Generator().manual_seed(0))

    def acc(m: nn.Module) -> float:
        assert target.test is not None
        return float((m(target.test.x).argmax(1) == target.test.y).double().mean())

    assert acc(predictor) >= 0.8 and acc(predictor) > acc(start) + 0.2


def test_bad_options_and_targets_are_one_line_config_errors() -> None:
    for name, opts in [("mcc", {"temperature": 0}), ("dann", {"steps": 0}), ("cdan", {"entropy": "yes"}),
                       ("mdd", {"margin": -1.0}), ("dann", {"lr": float("nan")}),
                       ("cdan", {"trunk_lr": 0}), ("mdd", {"reversal": "big"})]:
        with pytest.raises(ConfigError) as err:
            ADAPTERS.create(name, **opts)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="Did you mean 'hidden'"):
        ADAPTERS.create("dann", hiden=3)
    with pytest.raises(UnknownNameError, match="dann"):
        parse_methods("dan,mcc")
    source, target, rows = _toy()
    with pytest.raises(ConfigError, match="no unlabelled training rows") as err:
        ADAPTERS.create("mcc").fit(source, target, rows, target.train.x[:0], generator=torch.Generator())
    assert "\n" not in str(err.value)
    other = Task("d", "multiclass", target.train, test=target.test, num_outputs=2)
    with pytest.raises(ConfigError, match="no head of the same name"):
        ADAPTERS.create("mcc").fit(source, other, rows, other.train.x, generator=torch.Generator())


# -- shifts -------------------------------------------------------------------------------------------------------
def test_shifts_are_what_they_say() -> None:
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_shift(x, "invert"), 1 - x)
    assert torch.equal(apply_shift(x, "none"), x)
    r = x
    for _ in range(4):
        r = apply_shift(r, "rotate")
    assert torch.equal(r, x)
    assert torch.equal(apply_shift(x, "rotate")[0, 0, 0], x[0, 0, :, -1])  # rot90 anticlockwise: top row = last col
    flat = torch.full((1, 1, 28, 28), 0.4)
    assert torch.allclose(apply_shift(flat, "blur", severity=2.0), flat)  # a blur keeps a constant image
    assert apply_shift(x, "blur").std() < x.std()
    n1, n2 = apply_shift(x, "noise", seed=1), apply_shift(x, "noise", seed=1)
    assert torch.equal(n1, n2) and not torch.equal(n1, apply_shift(x, "noise", seed=2))
    assert float(n1.min()) >= 0 and float(n1.max()) <= 1
    for shift, sev, match in [("fog", None, "shift"), ("invert", 1.0, "severity"), ("blur", 0, "severity")]:
        with pytest.raises(ConfigError, match=match):
            apply_shift(x, shift, severity=sev)


@needs_fashion
def test_fashion_shift_domains_are_disjoint_and_shifted() -> None:
    src = fashion_shift(domain="source", train_size=200, val_size=50, test_size=100)[0]
    same = fashion_shift(domain="target", shift="none", train_size=200, val_size=50, test_size=100)[0]
    inv = DATASETS.create("fashion_shift", domain="target", shift="invert", train_size=200, val_size=50,
                          test_size=100)[0]
    assert src.test is not None and same.test is not None and inv.test is not None
    assert torch.equal(src.test.x, same.test.x) and torch.equal(inv.test.x, 1 - src.test.x)
    rows = {tuple(r.tolist()) for r in src.train.x}
    assert not any(tuple(r.tolist()) in rows for r in same.train.x)  # disjoint images (no row repeats)
    with pytest.raises(ConfigError, match="domain"):
        fashion_shift(domain="both")


def test_glyph_shift_options_are_checked_before_rendering() -> None:
    for opts, match in [({"domain": "both"}, "domain"), ({"target_style": "gothic"}, "target_style"),
                        ({"target_style": "sans"}, "two styles"), ({"test_fraction": 0.7}, "test_fraction")]:
        with pytest.raises(ConfigError, match=match) as err:
            glyph_shift(**opts)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)


@pytest.mark.slow  # renders the glyphs when they are not cached yet
def test_glyph_shift_domains_share_classes_and_differ_in_style() -> None:
    src = DATASETS.create("glyph_shift", domain="source")[0]
    tgt = glyph_shift(domain="target")[0]
    assert src.num_outputs == tgt.num_outputs and src.input_shape == tgt.input_shape == (784,)
    assert src.test is not None and tgt.test is not None and src.val is not None
    assert len(src.train) > 300 and len(tgt.train) > 300  # both styles well populated
    assert len(src.test) == int(0.25 * (len(src.train) + len(src.val) + len(src.test)))
    rows = {tuple(r.tolist()) for r in src.train.x}
    assert not any(tuple(r.tolist()) in rows for r in tgt.train.x)


# -- end to end ---------------------------------------------------------------------------------------------------
SMALL = {"train_size": 300, "val_size": 100, "test_size": 200}
FAST = {n: {"steps": 4, "batch_size": 32} for n in ("dann", "cdan", "mcc", "mdd")}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapt")
    config = {"name": "da-source", "seed": 0, "threads": 1,
              "data": {"dataset": "fashion_shift", "options": {"domain": "source", **SMALL}},
              "model": {"trunk_hidden": [16]},
              "training": {"lr": 0.01, "batch_size": 64, "max_steps": 20, "eval_every": 10, "patience": 0}}
    train(Config.from_dict(config), root / "run")
    return root / "run"


def _target(path: Path, **options: object) -> Path:
    data = {"dataset": "fashion_shift", "options": {"domain": "target", "shift": "noise", **SMALL, **options}}
    path.write_text(yaml.safe_dump({"name": "da-target", "seed": 0, "data": data}))
    return path


@needs_fashion
def test_adapt_scores_methods_against_source_only_and_the_upper_bound(source_run: Path, tmp_path: Path) -> None:
    target = _target(tmp_path / "t.yaml")
    result = adapt(source_run, target, methods="mcc,dann", seeds=2, options={"mcc": FAST["mcc"],
                                                                             "dann": FAST["dann"]},
                   out=tmp_path / "out")
    assert list(result.scores) == ["source_only", "mcc", "dann", "target_supervised"]
    base = result.scores["source_only"]["values"]
    assert len(set(base)) == 1 and math.isnan(result.scores["source_only"]["ci95"])
    for name in ("mcc", "dann"):
        values = result.scores[name]["values"]
        assert len(values) == 2 and all(0 <= v <= 1 for v in values)
        gain = result.gains[name]
        assert gain["mean"] == pytest.approx(sum(values) / 2 - base[0])
        sd = float(torch.tensor(values, dtype=torch.float64).std())
        assert gain["ci95"] == pytest.approx(12.706 * sd / math.sqrt(2))
    saved = json.loads((tmp_path / "out" / "adapt.json").read_text())
    assert saved["n_target_unlabelled"] == 300 and saved["methods"] == ["mcc", "dann"]
    assert "| mcc |" in (tmp_path / "out" / "adapt.md").read_text()
    with pytest.raises(RunExistsError, match="exists"):
        adapt(source_run, target, methods="mcc", seeds=1, options={"mcc": FAST["mcc"]}, out=tmp_path / "out")


@needs_fashion
def test_adapt_refuses_bad_set_ups_in_one_line(source_run: Path, tmp_path: Path) -> None:
    target = _target(tmp_path / "t.yaml")
    for kwargs, match in [({"methods": "mcc", "options": {"dann": {}}}, "not run"),
                          ({"methods": "mcc", "options": {"mcc": {"temperature": "hot"}}}, "temperature"),
                          ({"methods": "mcc", "seeds": 0}, "seeds")]:
        with pytest.raises(ConfigError, match=match) as err:
            adapt(source_run, target, **kwargs)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)
    meta = tmp_path / "meta.yaml"
    meta.write_text(yaml.safe_dump({"name": "m", "data": {"dataset": "fashion_fewshot"},
                                    "training": {"algorithm": "protonet"}}))
    with pytest.raises(ConfigError, match="task family"):
        adapt(source_run, meta, methods="mcc")
    conv = _target(tmp_path / "conv.yaml", flatten=False)
    with pytest.raises(ConfigError, match="shape"):
        adapt(source_run, conv, methods="mcc")


@needs_fashion
@pytest.mark.slow  # two subprocesses, each importing torch
def test_cli_adapt_prints_the_table_and_writes_json(source_run: Path, tmp_path: Path) -> None:
    target = _target(tmp_path / "t.yaml")
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "mtml", "adapt", str(source_run), "--target", str(target),
                           "--methods", "mdd,cdan", "--seeds", "2", "--option", "mdd.steps=3", "--option",
                           "cdan.steps=3", "--no-upper-bound", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| cdan |" in proc.stdout and "gain over source-only" in proc.stdout
    assert set(json.loads((out / "adapt.json").read_text())["scores"]) == {"source_only", "mdd", "cdan"}
    bad = subprocess.run([sys.executable, "-m", "mtml", "adapt", str(source_run), "--target", str(target),
                          "--methods", "mcc", "--option", "mcc.temprature=2", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode != 0 and "temperature" in bad.stderr and "Traceback" not in bad.stderr
