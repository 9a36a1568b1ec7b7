"""MultiTaskModel: forward_many = per-task forward (values and gradients), parameter groups, shape errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtml.errors import ConfigError, ShapeError, UnknownNameError
from mtml.nn import MultiTaskModel, build_multitask_model, mlp
from mtml.tasks import Split, Task


def _model(n_linear: int, *, d_in: int = 5, d_feat: int = 6, out: int = 3, stems: dict[str, int] | None = None,
           extra_heads: dict[str, nn.Module] | None = None, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(d_in, 7), nn.Tanh(), nn.Linear(7, d_feat), nn.Tanh())
    heads: dict[str, nn.Module] = {f"lin{i}": nn.Linear(d_feat, out) for i in range(n_linear)}
    heads.update(extra_heads or {})
    stem_mods: dict[str, nn.Module] = {}
    for name, width in (stems or {}).items():
        heads[name] = nn.Linear(d_feat, 2)
        stem_mods[name] = nn.Sequential(nn.Linear(width, d_in), nn.Sigmoid())
    return MultiTaskModel(trunk, heads, stem_mods).double()


def _inputs(model: MultiTaskModel, sizes: dict[str, int], widths: dict[str, int], seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(sizes[n], widths.get(n, 5), generator=g, dtype=torch.float64) for n in sizes}


def _outputs_and_grads(model: MultiTaskModel, inputs: dict, many: bool) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    outs = model.forward_many(inputs) if many else {n: model(x, n) for n, x in inputs.items()}
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + o.square().sum() for o in outs.values())
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return {n: o.detach() for n, o in outs.items()}, grads


def _assert_oracle(model: MultiTaskModel, inputs: dict) -> None:
    many_out, many_grad = _outputs_and_grads(model, inputs, True)
    loop_out, loop_grad = _outputs_and_grads(model, inputs, False)
    assert list(many_out) == list(inputs)
    for n in inputs:
        assert many_out[n].shape == loop_out[n].shape
        torch.testing.assert_close(many_out[n], loop_out[n], rtol=1e-12, atol=1e-12)
    for n in loop_grad:
        torch.testing.assert_close(many_grad[n], loop_grad[n], rtol=1e-10, atol=1e-12, msg=n)
    assert any(g.abs().sum() > 0 for g in many_grad.values())


@pytest.mark.parametrize("n_heads", [1, 3, 4, 7])
def test_forward_many_equal_batches(n_heads: int) -> None:
    model = _model(n_heads)
    _assert_oracle(model, _inputs(model, {f"lin{i}": 9 for i in range(n_heads)}, {}))


@pytest.mark.parametrize("n_heads", [4, 6])
def test_forward_many_unequal_batches(n_heads: int) -> None:
    model = _model(n_heads)
    _assert_oracle(model, _inputs(model, {f"lin{i}": 3 + 2 * i for i in range(n_heads)}, {}))


def test_forward_many_subset_and_order() -> None:
    model = _model(6)
    sizes = {"lin5": 4, "lin0": 2, "lin3": 4, "lin1": 1}
    _assert_oracle(model, _inputs(model, sizes, {}))


def test_forward_many_with_stems_mixed_widths_and_nonlinear_heads() -> None:
    extra = {"deep": nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), "wide": nn.Linear(6, 5)}
    model = _model(5, stems={"s3": 3, "s8": 8, "s5": 5}, extra_heads=extra)
    sizes = {"s3": 4, "lin0": 5, "deep": 3, "lin1": 5, "s8": 2, "lin2": 6, "wide": 5, "lin3": 5, "s5": 3, "lin4": 1}
    _assert_oracle(model, _inputs(model, sizes, {"s3": 3, "s8": 8, "s5": 5}))


def test_forward_many_large_group_falls_back_to_per_head() -> None:
    model = _model(4, d_feat=64, out=64)
    _assert_oracle(model, _inputs(model, {f"lin{i}": 300 for i in range(4)}, {}))


def test_forward_many_linear_heads_without_bias_or_other_width() -> None:
    torch.manual_seed(0)
    heads: dict[str, nn.Module] = {f"h{i}": nn.Linear(6, 2, bias=i != 2) for i in range(5)}
    heads["h4"] = nn.Linear(6, 3)
    model = MultiTaskModel(nn.Sequential(nn.Linear(5, 6), nn.Tanh()), heads).double()
    _assert_oracle(model, _inputs(model, {n: 4 for n in heads}, {}))


def _names(it) -> list[str]:  # type: ignore[no-untyped-def]
    return [n for n, _ in it]


def test_parameter_groups_cover_every_parameter_once() -> None:
    model = _model(4, stems={"s3": 3, "s8": 8})
    shared = list(model.shared_parameters())
    per_task = [p for t in model.task_names for p in model.task_parameters(t)]
    ids = [id(p) for p in shared + per_task]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    named = dict(model.named_parameters())
    for name, p in model.named_shared_parameters():
        assert name.startswith("trunk.") and named[name] is p
    for t in model.task_names:
        for name, p in model.named_task_parameters(t):
            assert name.startswith((f"heads.{t}.", f"stems.{t}.")) and named[name] is p
    assert any(n.startswith("stems.s3.") for n in _names(model.named_task_parameters("s3")))


def test_build_multitask_model_groups_and_stems() -> None:
    g = torch.Generator().manual_seed(0)
    tasks = [Task("a", "regression", Split(torch.randn(8, 4, generator=g), torch.randn(8))),
             Task("b", "multiclass", Split(torch.randn(8, 4, generator=g), torch.arange(8) % 3)),
             Task("c", "binary", Split(torch.randn(8, 6, generator=g), torch.arange(8) % 2))]
    model = build_multitask_model(tasks, trunk_hidden=(16, 8), head_hidden=(5,))
    assert set(model.stems) == {"a", "b", "c"}  # widths differ: every task gets a stem to the first width
    out = model.forward_many({t.name: t.train.x for t in tasks})
    assert out["a"].shape == (8, 1) and out["b"].shape == (8, 3) and out["c"].shape == (8, 1)
    n_shared = sum(p.numel() for p in model.shared_parameters())
    assert n_shared == 4 * 16 + 16 + 16 * 8 + 8
    ids = [id(p) for p in model.shared_parameters()] + [id(p) for t in tasks for p in model.task_parameters(t.name)]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())

    same = build_multitask_model(tasks[:2], trunk_hidden=(8,))
    assert len(same.stems) == 0
    stemmed = build_multitask_model(tasks[:2], trunk_hidden=(8,), stem_width=3)
    assert set(stemmed.stems) == {"a", "b"} and stemmed.trunk[0].in_features == 3


def test_share_trunk_false_gives_each_task_its_own_trunk() -> None:
    g = torch.Generator().manual_seed(0)
    tasks = [Task(f"t{i}", "regression", Split(torch.randn(5, 4, generator=g), torch.randn(5))) for i in range(3)]
    shared = build_multitask_model(tasks, trunk_hidden=(8, 8))
    separate = build_multitask_model(tasks, trunk_hidden=(8, 8), share_trunk=False)
    assert list(separate.shared_parameters()) == []
    per_task = {t.name: {id(p) for p in separate.task_parameters(t.name)} for t in tasks}
    assert not (per_task["t0"] & per_task["t1"]) and not (per_task["t1"] & per_task["t2"])
    n_trunk = sum(p.numel() for p in shared.shared_parameters())
    assert sum(p.numel() for p in separate.parameters()) == sum(p.numel() for p in shared.parameters()) + 2 * n_trunk
    # changing one task's parameters leaves the other tasks' outputs unchanged
    x = {t.name: t.train.x for t in tasks}
    before = separate.forward_many(x)
    with torch.no_grad():
        for p in separate.task_parameters("t0"):
            p.add_(1.0)
    after = separate.forward_many(x)
    assert not torch.allclose(before["t0"], after["t0"])
    assert torch.equal(before["t1"], after["t1"]) and torch.equal(before["t2"], after["t2"])


def test_shape_error_names_the_task() -> None:
    g = torch.Generator().manual_seed(0)
    tasks = [Task("alpha", "regression", Split(torch.randn(5, 4, generator=g), torch.randn(5))),
             Task("beta", "regression", Split(torch.randn(5, 4, generator=g), torch.randn(5)))]
    model = build_multitask_model(tasks, trunk_hidden=(8,))
    with pytest.raises(ShapeError) as info:
        model(torch.zeros(3, 5), "beta")
    assert "'beta'" in str(info.value) and "(5,)" in str(info.value) and "(4,)" in str(info.value)
    with pytest.raises(ShapeError, match="'alpha'"):
        model.forward_many({"beta": torch.zeros(2, 4), "alpha": torch.zeros(2, 7)})
    with pytest.raises(ShapeError, match="'alpha'"):
        model.features(torch.zeros(2, 3), "alpha")


def test_unknown_task_and_bad_construction() -> None:
    model = _model(2)
    with pytest.raises(UnknownNameError, match=r"unknown task 'nope'.*lin0, lin1"):
        model(torch.zeros(1, 5, dtype=torch.float64), "nope")
    with pytest.raises(UnknownNameError, match="nope"):
        list(model.task_parameters("nope"))
    with pytest.raises(UnknownNameError, match="without a head"):
        MultiTaskModel(nn.Identity(), {"a": nn.Linear(2, 1)}, {"b": nn.Identity()})
    with pytest.raises(ValueError, match="at least one head"):
        MultiTaskModel(nn.Identity(), {})


def test_builder_errors() -> None:
    img = Task("img", "regression", Split(torch.zeros(4, 1, 3, 3), torch.zeros(4)))
    with pytest.raises(ConfigError, match=r"'img'.*flat features"):
        build_multitask_model([img])
    with pytest.raises(ConfigError, match="at least one task"):
        build_multitask_model([])
    with pytest.raises(ConfigError, match="activation 'relu6'"):
        mlp(3, (4,), 1, activation="relu6")
    with pytest.raises(ConfigError, match="widths must be > 0"):
        mlp(3, (0,), 1)
    with pytest.raises(ConfigError, match="dropout"):
        mlp(3, (4,), 1, dropout=1.0)


def test_mlp_layout() -> None:
    net = mlp(3, (4, 5), 2, activation="gelu", dropout=0.1)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "GELU", "Dropout", "Linear", "GELU", "Dropout", "Linear"]
    assert [type(m).__name__ for m in mlp(3, (4,))] == ["Linear", "ReLU"]
    assert [type(m).__name__ for m in mlp(3, (), 2, final_activation=True)] == ["Linear", "ReLU"]
