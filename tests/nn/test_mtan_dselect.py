"""MTAN and DSelect-k: closed forms, oracles against hard sharing and MMoE, parameter ownership, config runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mtml.config import Config
from mtml.datasets._fashion import DEFAULT_ROOT
from mtml.engine._joint import joint_step, task_losses
from mtml.errors import ConfigError
from mtml.nn import ARCHITECTURES, ColumnModel, build_model
from mtml.nn._dselect_k import DSelectKGate, DSelectKModel, DSelectKTrunk, smooth_step
from mtml.nn._mtan import MTANMLPTrunk, MTANTrunk
from mtml.tasks import Split, Task, TaskKind
from mtml.weighting import WEIGHTINGS, GramianTape
from mtml.workflows import train

FASHION = Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()


def _flat_tasks(width: int = 5) -> list[Task]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(3):
        x = torch.randn(7 + i, width, generator=g, dtype=torch.float64)
        if i == 1:
            out.append(Task(f"t{i}", TaskKind.MULTICLASS, Split(x, torch.randint(0, 3, (7 + i,), generator=g)),
                            num_outputs=3))
        else:
            out.append(Task(f"t{i}", TaskKind.REGRESSION, Split(x, torch.randn(7 + i, 2, generator=g,
                                                                               dtype=torch.float64))))
    return out


def _image_tasks(shapes: tuple[tuple[int, int, int], ...] = ((1, 16, 16), (1, 16, 16))) -> list[Task]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i, shape in enumerate(shapes):
        x = torch.rand(5, *shape, generator=g, dtype=torch.float64)
        out.append(Task(f"img{i}", TaskKind.MULTICLASS, Split(x, torch.randint(0, 4, (5,), generator=g)),
                        num_outputs=4))
    return out


def _batch(tasks: list[Task]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {t.name: (t.train.x, t.train.y) for t in tasks}


# -- DSelect-k ------------------------------------------------------------------------------------------------

def test_smooth_step_closed_form() -> None:
    gamma = 2.0
    t = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    # -2t³/γ³ + 3t/(2γ) + 1/2 at t = ±0.5, γ = 2: ∓1/32 ± 3/8 + 1/2
    want = torch.tensor([0.0, 0.0, 0.5 - 0.375 + 1 / 32, 0.5, 0.5 + 0.375 - 1 / 32, 1.0, 1.0], dtype=torch.float64)
    assert torch.equal(smooth_step(t, gamma), want)
    t.requires_grad_(True)
    (grad,) = torch.autograd.grad(smooth_step(t, gamma).sum(), t)
    # derivative -6t²/γ³ + 3/(2γ): 0 outside the cubic region and at its ends, 3/4 at 0
    torch.testing.assert_close(grad, torch.tensor([0, 0, 0.75 - 0.1875, 0.75, 0.75 - 0.1875, 0, 0],
                                                  dtype=torch.float64))


@pytest.mark.parametrize("gate", ["per_example", "static"])
@pytest.mark.parametrize(("n", "k"), [(2, 1), (3, 2), (4, 4), (5, 2), (8, 3)])
def test_gate_is_a_distribution_over_experts(n: int, k: int, gate: str) -> None:
    torch.manual_seed(n * 10 + k)
    g = DSelectKGate(6, n, k, gamma=1.0, gate=gate).double()
    with torch.no_grad():  # far from the start: some smooth-steps saturated, some not
        for p in g.parameters():
            p.normal_(0.0, 1.0)
    x = torch.randn(11, 6, dtype=torch.float64)
    w = g(x)
    assert w.shape == (11, n) and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(1), torch.ones(11, dtype=torch.float64), rtol=0, atol=1e-12)
    r = g.selectors(x)
    torch.testing.assert_close(r.sum(2), torch.ones(11, k, dtype=torch.float64), rtol=0, atol=1e-12)


def _pin(gate: DSelectKGate, experts: list[int], alpha: list[float], scale: float = 1.0) -> None:
    """Per-example gate pinned (whatever the input) to selector i on the code of ``experts[i]``, α = ``alpha``."""
    assert isinstance(gate.z, nn.Linear) and isinstance(gate.alpha, nn.Linear)
    bits = [[(e >> (gate.bits - 1 - j)) & 1 for j in range(gate.bits)] for e in experts]
    with torch.no_grad():
        gate.z.weight.zero_()
        gate.z.bias.copy_(torch.tensor([(2 * b - 1) * scale * gate.gamma for row in bits for b in row]))
        gate.alpha.weight.zero_()
        gate.alpha.bias.copy_(torch.tensor(alpha, dtype=gate.alpha.bias.dtype))


@pytest.mark.parametrize(("n", "codes", "experts"), [(8, [5, 2], [5, 2]), (5, [6, 3], [1, 3]), (3, [3, 1], [0, 1])])
def test_saturated_gate_is_exactly_k_sparse(n: int, codes: list[int], experts: list[int]) -> None:
    """Saturated smooth-steps make each selector one-hot on its code (code c ≥ n weighs expert c − n): the gate
    is softmax(α) on those experts and exactly 0 elsewhere."""
    g = DSelectKGate(4, n, 2, gamma=0.5).double()
    _pin(g, codes, [0.3, -0.4])
    w = g(torch.randn(6, 4, dtype=torch.float64))
    want = torch.zeros(n, dtype=torch.float64)
    a = torch.softmax(torch.tensor([0.3, -0.4], dtype=torch.float64), 0)
    want[experts[0]] += a[0]
    want[experts[1]] += a[1]
    assert torch.equal(w, want.expand(6, n))
    assert int((w[0] != 0).sum()) <= 2
    assert torch.equal(g.entropy(torch.zeros(3, 4, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))


def test_random_saturated_gates_have_at_most_k_nonzeros() -> None:
    torch.manual_seed(0)
    for n, k in [(16, 3), (7, 2), (6, 4)]:
        g = DSelectKGate(5, n, k, gamma=0.1).double()
        with torch.no_grad():
            assert isinstance(g.z, nn.Linear)
            g.z.weight.zero_()
            g.z.bias.copy_(torch.randn(k * g.bits).sign() * 0.05)  # |z| = γ/2: the smooth-step's ends
        w = g(torch.randn(9, 5, dtype=torch.float64))
        assert bool(((w != 0).sum(1) <= k).all()) and bool(((w != 0).sum(1) >= 1).all())


def test_uniform_selectors_have_entropy_k_log_n() -> None:
    """z = 0: every smooth-step is 1/2, each selector uniform over 2^b = n codes, entropy log n each."""
    g = DSelectKGate(3, 8, 3).double()
    with torch.no_grad():
        for p in g.z.parameters():
            p.zero_()
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(g(x), torch.full((4, 8), 1 / 8, dtype=torch.float64))
    torch.testing.assert_close(g.entropy(x), torch.full((4,), 3 * math.log(8), dtype=torch.float64))


@pytest.mark.parametrize("n", [4, 3])
def test_equals_mmoe_with_selectors_pinned_to_the_softmax_case(n: int) -> None:
    """k = n selectors, selector i pinned to expert i, α = MMoE's gate logits: Σ_i softmax(α)_i e_i is MMoE's
    softmax gate, so with the same experts and heads the two models agree."""
    tasks = _flat_tasks()
    torch.manual_seed(1)
    mmoe = build_model(tasks, "mmoe", trunk_hidden=[6, 4], num_experts=n).double()
    dsel = build_model(tasks, "dselect_k", trunk_hidden=[6, 4], num_experts=n, k=n).double()
    assert isinstance(dsel.trunk, DSelectKTrunk)
    dsel.trunk.experts.load_state_dict(mmoe.trunk.experts.state_dict())
    dsel.heads.load_state_dict(mmoe.heads.state_dict())
    for t in tasks:
        gate = dsel.trunk.gates[t.name]
        assert isinstance(gate, DSelectKGate) and isinstance(gate.alpha, nn.Linear)
        _pin(gate, list(range(n)), [0.0] * n)
        with torch.no_grad():
            gate.alpha.weight.copy_(mmoe.trunk.gates[t.name].weight)
            gate.alpha.bias.copy_(mmoe.trunk.gates[t.name].bias)
    inputs = {t.name: t.train.x for t in tasks}
    want, got = mmoe.forward_many(inputs), dsel.forward_many(inputs)
    for t in tasks:
        torch.testing.assert_close(got[t.name], want[t.name], rtol=1e-12, atol=1e-12)
    assert not torch.equal(got["t0"], build_model(tasks, "dselect_k", trunk_hidden=[6, 4], num_experts=n,
                                                  k=n).double().forward_many(inputs)["t0"])  # the pin mattered


def test_entropy_regulariser_adds_to_each_task_loss() -> None:
    tasks = _flat_tasks()
    torch.manual_seed(2)
    plain = build_model(tasks, "dselect_k", trunk_hidden=[4], num_experts=4, k=2)
    assert type(plain) is ColumnModel  # no regulariser: the engine's own loss paths
    torch.manual_seed(2)
    model = build_model(tasks, "dselect_k", trunk_hidden=[4], num_experts=4, k=2, entropy_reg=0.25).double()
    assert isinstance(model, DSelectKModel)
    for gate in model.trunk.gates.values():
        assert isinstance(gate, DSelectKGate)
        with torch.no_grad():
            for p in gate.z.parameters():
                p.zero_()
    by_name, batch, names = {t.name: t for t in tasks}, _batch(tasks), [t.name for t in tasks]
    losses = task_losses(model, by_name, batch, names)  # calls model.training_losses
    out = model.forward_many({n: batch[n][0] for n in names})
    want = torch.stack([by_name[n].compute_loss(out[n], batch[n][1]) for n in names]) + 0.25 * 2 * math.log(4)
    torch.testing.assert_close(losses, want)
    # the regulariser moves each task's own gate only: the shared Gramian equals the plain loss's
    tape = GramianTape(model, "loop")
    with tape:
        losses = task_losses(model, by_name, batch, names)
    gram = tape.gramian(losses, {n: batch[n][0] for n in names}, names)
    ref = GramianTape(model, "loop")
    with ref:
        out = model.forward_many({n: batch[n][0] for n in names})
        plain_losses = torch.stack([by_name[n].compute_loss(out[n], batch[n][1]) for n in names])
    torch.testing.assert_close(gram, ref.gramian(plain_losses, None, names))


def test_dselect_k_parameters_and_static_gate() -> None:
    tasks = _flat_tasks()
    model = build_model(tasks, "dselect_k", trunk_hidden=[4], num_experts=3, k=2, gate="static")
    own = {n for n, _ in model.named_task_parameters("t1")}
    assert {"trunk.gates.t1.z", "trunk.gates.t1.alpha"} <= own
    assert all(n.startswith("trunk.experts.") for n, _ in model.named_shared_parameters())
    x = torch.randn(5, 5)
    w = model.trunk.gates["t0"](x)
    assert torch.equal(w[0], w[4])  # static: the same weights for every row


# -- MTAN ------------------------------------------------------------------------------------------------------

def _masks_to_one(trunk: nn.Module) -> None:
    """Every attention module's last 1×1 map → weight 0, bias 100: sigmoid(100) is exactly 1.0 in float64."""
    for modules in trunk.attention.values():
        for att in modules:
            last = att[-2]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.fill_(100.0)


def test_mtan_with_unit_masks_is_the_shared_conv4() -> None:
    tasks = _image_tasks()
    torch.manual_seed(0)
    model = build_model(tasks, "mtan", backbone_options={"width": 8, "groups": 4}).double()
    assert isinstance(model.trunk, MTANTrunk)
    _masks_to_one(model.trunk)
    hps = build_model(tasks, "hps", backbone="conv4", backbone_options={"width": 8, "groups": 4}).double()
    hps.trunk.load_state_dict(model.trunk.backbone.state_dict())  # the same Conv-4, run by hard sharing
    x = tasks[0].train.x
    for t in tasks:
        assert torch.equal(model.features(x, t.name), hps.features(x, t.name))
    assert all(bool((m == 1).all()) for ms in model.trunk.masks(x).values() for m in ms)
    # with its own masks MTAN's features differ per task
    torch.manual_seed(0)
    fresh = build_model(tasks, "mtan", backbone_options={"width": 8, "groups": 4}).double()
    feats = fresh.features(x)
    assert feats.shape == (5, 2, 8) and not torch.allclose(feats[:, 0], feats[:, 1])


def test_mtan_mlp_analogue_closed_form() -> None:
    """Two layers: s0 = tanh(L0 x), a0 = att0(s0), r0 = tanh(B0(a0 ⊙ s0)), s1 = tanh(L1 s0),
    feature = att1([s1; r0]) ⊙ s1 with att = sigmoid(W2 relu(LN(W1 ·)))."""
    tasks = _flat_tasks()
    torch.manual_seed(4)
    model = build_model(tasks, "mtan", trunk_hidden=[6, 3], activation="tanh").double()
    trunk = model.trunk
    assert isinstance(trunk, MTANMLPTrunk)
    x = tasks[0].train.x

    def att(mod: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
        lin1, norm, _, lin2, _ = mod
        z = F.layer_norm(F.linear(h, lin1.weight, lin1.bias), norm.normalized_shape, norm.weight, norm.bias)
        return torch.sigmoid(F.linear(torch.relu(z), lin2.weight, lin2.bias))

    l0, l1 = trunk.backbone[0], trunk.backbone[2]
    s0 = torch.tanh(F.linear(x, l0.weight, l0.bias))
    s1 = torch.tanh(F.linear(s0, l1.weight, l1.bias))
    for t in tasks:
        a0, a1 = trunk.attention[t.name]
        b0 = trunk.bridges[0][0]
        r0 = torch.tanh(F.linear(att(a0, s0) * s0, b0.weight, b0.bias))
        want = att(a1, torch.cat([s1, r0], 1)) * s1
        torch.testing.assert_close(model.features(x, t.name), want, rtol=1e-12, atol=1e-12)
    _masks_to_one(trunk)
    assert torch.equal(model.features(x, "t0"), trunk.shared_features(x))


@pytest.mark.parametrize("inputs", ["images", "flat"])
def test_mtan_parameter_split_and_gradient_reach(inputs: str) -> None:
    tasks = _image_tasks() if inputs == "images" else _flat_tasks()
    torch.manual_seed(5)
    model = build_model(tasks, "mtan", **({"backbone_options": {"width": 8, "groups": 4, "blocks": 3}}
                                          if inputs == "images" else {"trunk_hidden": [6, 4]})).double()
    shared = dict(model.named_shared_parameters())
    assert shared and all(n.startswith(("trunk.backbone.", "trunk.bridges.")) for n in shared)
    assert any(n.startswith("trunk.bridges.") for n in shared)
    names = [t.name for t in tasks]
    own = {n: dict(model.named_task_parameters(n)) for n in names}
    for n in names:
        assert {k for k in own[n] if k.startswith("trunk.")} == {
            k for k, _ in model.named_parameters() if k.startswith(f"trunk.attention.{n}.")}
    losses = task_losses(model, {t.name: t for t in tasks}, _batch(tasks), names)
    for j, loss_task in enumerate(names):
        for n in names:
            params = [p for k, p in own[n].items() if k.startswith("trunk.attention.")]
            grads = torch.autograd.grad(losses[j], params, retain_graph=True, allow_unused=True)
            reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
            assert reached == (n == loss_task), (n, loss_task)
        grads = torch.autograd.grad(losses[j], list(shared.values()), retain_graph=True, allow_unused=True)
        assert all(g is not None for g in grads)  # every task reaches the whole shared trunk and every bridge


def test_mtan_image_stem_for_another_shape_and_gramian() -> None:
    tasks = _image_tasks(((1, 16, 16), (1, 12, 12)))
    torch.manual_seed(6)
    model = build_model(tasks, "mtan", backbone_options={"width": 8, "groups": 4}).double()
    assert list(model.stem_of) == ["img1"]
    by_name, batch, names = {t.name: t for t in tasks}, _batch(tasks), [t.name for t in tasks]
    out = model.forward_many({n: batch[n][0] for n in names})
    for n in names:
        torch.testing.assert_close(out[n], model(batch[n][0], n))
    grams = {}
    for backend in ("loop", "batched", "auto"):
        tape = GramianTape(model, backend)
        with tape:
            losses = task_losses(model, by_name, batch, names)
        grams[backend] = tape.gramian(losses, {n: batch[n][0] for n in names}, names)
        assert tape.used == ("loop" if backend == "auto" else backend)  # conv layers: no layer-wise Gramian
    torch.testing.assert_close(grams["batched"], grams["loop"])
    torch.testing.assert_close(grams["auto"], grams["loop"])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    w = WEIGHTINGS.create("pcgrad", names)
    first = joint_step(model, by_name, batch, w, opt).task_losses
    for _ in range(15):
        last = joint_step(model, by_name, batch, w, opt).task_losses
    assert sum(last.values()) < sum(first.values())


@pytest.mark.parametrize(("name", "options"), [("mtan", {}), ("dselect_k", {}), ("dselect_k", {"entropy_reg": 0.1})])
def test_layerwise_weighted_backward_equals_autograd(name: str, options: dict) -> None:
    """Flat inputs: every shared layer is an nn.Linear (MTAN's bridges run once per task in one trunk call), so
    ``auto`` takes the row-split layer-wise Gramian and its fused weighted backward; it must equal autograd's."""
    tasks = _flat_tasks()
    torch.manual_seed(7)
    model = build_model(tasks, name, trunk_hidden=[6, 4], **options).double()
    by_name, batch, names = {t.name: t for t in tasks}, _batch(tasks), [t.name for t in tasks]
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    tape = GramianTape(model, "auto")
    with tape:
        losses = task_losses(model, by_name, batch, names)
    tape.gramian(losses, {n: batch[n][0] for n in names}, names)
    assert tape.used == "layerwise/rows"
    tape.backward((w * losses).sum(), w, list(model.parameters()))
    fused = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    (w * task_losses(model, by_name, batch, names)).sum().backward()
    plain = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(fused) == len(plain) == len(list(model.parameters()))
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


# -- options --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "tasks", "options", "match"), [
    ("dselect_k", "flat", {"k": 0}, "`k` must be an integer >= 1. Got 0."),
    ("dselect_k", "flat", {"k": 5, "num_experts": 4}, r"`k` must be <= num_experts \(4\)"),
    ("dselect_k", "flat", {"num_experts": 0}, "`num_experts` must be an integer >= 1"),
    ("dselect_k", "flat", {"gamma": 0.0}, "`gamma` must be a number > 0"),
    ("dselect_k", "flat", {"gamma": "wide"}, "gamma.*'wide'"),  # (the registry's type check, or ours)
    ("dselect_k", "flat", {"entropy_reg": -1.0}, "`entropy_reg` must be a number >= 0"),
    ("dselect_k", "flat", {"gate": "dense"}, "`gate` must be one of per_example, static. Got 'dense'"),
    ("dselect_k", "flat", {"experts": 3}, "unknown option 'experts'"),
    ("mtan", "flat", {"backbone": "resnet12"}, "`backbone` must be one of auto, conv4, mlp. Got 'resnet12'"),
    ("mtan", "flat", {"backbone": "conv4"}, "takes images .* use backbone: mlp"),
    ("mtan", "flat", {"backbone_options": {"width": 8}}, "the mlp backbone takes none"),
    ("mtan", "images", {"backbone_options": {"width": 0}}, "`width` must be an integer >= 1"),
    ("mtan", "images", {"backbone_options": {"depth": 3}}, "unknown option 'depth'"),
    ("mtan", "images", {"stem_width": 8}, "Remove stem_width"),
    ("mtan", "mixed", {}, "some tasks have images and some flat inputs"),
    ("mtan", "flat", {"trunk_hidden": []}, "`trunk_hidden` must be"),
])
def test_bad_options_are_one_line_config_errors(name: str, tasks: str, options: dict, match: str) -> None:
    made = {"flat": _flat_tasks, "images": _image_tasks,
            "mixed": lambda: [*_image_tasks()[:1], *_flat_tasks()[:1]]}[tasks]()
    with pytest.raises(ConfigError, match=match) as info:
        build_model(made, name, **options)
    assert "\n" not in str(info.value)


def test_registered_with_help() -> None:
    help_ = ARCHITECTURES.describe()
    assert "Liu et al. CVPR 2019" in help_["mtan"] and "Hazimeh et al. NeurIPS 2021" in help_["dselect_k"]


# -- end to end -------------------------------------------------------------------------------------------------

SMALL = {
    "name": "arch-test", "seed": 0, "threads": 1,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 3, "in_dim": 6, "latent_dim": 2, "n_train": 16,
                                                 "n_val": 8, "n_test": 8}},
    "model": {"trunk_hidden": [6, 4]},
    "training": {"weighting": {"name": "pcgrad"}, "lr": 0.01, "batch_size": 8, "max_steps": 12, "eval_every": 6,
                 "patience": 0},
}


@pytest.mark.parametrize(("architecture", "options"), [
    ("mtan", {}), ("dselect_k", {"num_experts": 3, "k": 2, "entropy_reg": 0.01})])
def test_mtml_train_from_a_tiny_config(tmp_path: Path, architecture: str, options: dict) -> None:
    config = {**SMALL, "model": {**SMALL["model"], "architecture": architecture, "options": options}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "mtml", "train", str(path), "--out", str(tmp_path / "run"),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 12 and set(summary["test"]) == {"task_0", "task_1", "task_2"}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["architecture"] == architecture


CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize(("name", "overrides", "trunk"), [
    ("penguins_dselect_k", [], DSelectKTrunk),
    pytest.param("fashion_mtan", ["data.options.train_size=64", "data.options.val_size=32",
                                  "data.options.test_size=32"], MTANTrunk,
                 marks=pytest.mark.skipif(not FASHION, reason="needs dataset-fashion-mnist")),
])
def test_shipped_configs_build_and_step_with_one_trunk_pass(name: str, overrides: list[str], trunk: type,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtml.config import load_config
    from mtml.engine._joint import TaskBatcher
    from mtml.workflows import build

    monkeypatch.setenv("MTML_CACHE", str(tmp_path))
    config = load_config(CONFIGS / f"{name}.yaml", overrides)
    exp = build(config)
    assert isinstance(exp.model.trunk, trunk)
    batch = TaskBatcher(exp.tasks, config.training.batch_size).sample(torch.Generator().manual_seed(0))
    rows: list[int] = []
    exp.model.trunk.register_forward_hook(lambda mod, a, out: rows.append(int(a[0].shape[0])))
    w = WEIGHTINGS.create("pcgrad", [t.name for t in exp.tasks])
    joint_step(exp.model, {t.name: t for t in exp.tasks}, batch, w, torch.optim.SGD(exp.model.parameters(), lr=0.0))
    assert rows == [config.training.batch_size]  # both tasks read the same rows: one trunk pass


@pytest.mark.skipif(not FASHION, reason="needs dataset-fashion-mnist")
def test_mtan_trains_on_fashion_images_with_pcgrad(tmp_path: Path) -> None:
    cfg = Config.from_dict({
        "seed": 0, "threads": 1,
        "data": {"dataset": "fashion", "options": {"train_size": 64, "val_size": 32, "test_size": 32,
                                                   "flatten": False}},
        "model": {"architecture": "mtan", "options": {"backbone_options": {"width": 8, "groups": 4}}},
        "training": {"weighting": {"name": "pcgrad"}, "batch_size": 16, "max_steps": 4, "eval_every": 2,
                     "patience": 0}})
    run, result = train(cfg, tmp_path / "run")
    assert result.fit.steps == 4 and (run.path / "summary.json").is_file()
