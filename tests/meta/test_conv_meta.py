"""Meta-learning with convolutional backbones: every algorithm on image episodes, and the task loop against the
general ``vmap`` path and a plain loop (float64 oracles for outputs, per-task gradients and meta-gradients)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from mtml.config import Config
from mtml.datasets._fashion import DEFAULT_ROOT
from mtml.errors import ConfigError
from mtml.meta import (
    ALGORITHMS,
    Episode,
    MetaAlgorithm,
    batched_forward,
    meta_backward,
    meta_parameters,
    meta_step,
    speed_paths,
    task_gradients,
)
from mtml.nn import Conv4, MultiTaskModel, build_backbone, feature_dim
from mtml.sampling import few_shot_splits
from mtml.workflows import build, train

from .conftest import PathSpy

torch.set_num_threads(1)

WAYS = 3


def images(classes: int = 12, per_class: int = 6, size: int = 28, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random ``[n, 1, size, size]`` images whose class sets a fixed pattern (plus noise): ``x``, labels ``y``."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 1, size, size, generator=g).sign()
    y = torch.arange(classes).repeat_interleave(per_class)
    x = patterns[y] + 0.5 * torch.randn(len(y), 1, size, size, generator=g)
    return x, y


def episode(tasks: int = 2, shots: int = 1, query: int = 2, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> Episode:
    x, y = images(seed=seed)
    sampler = few_shot_splits(x.to(dtype), y, ways=WAYS, shots=shots, query_shots=query, meta_batch=tasks,
                              fractions=(0.5, 0.25, 0.25), seed=seed)["train"]
    return sampler.sample(torch.Generator().manual_seed(seed))


def model(backbone: str = "conv4", seed: int = 0, dtype: torch.dtype = torch.float32, **options: object) -> nn.Module:
    torch.manual_seed(seed)
    opts = {"width": 8, "groups": 4, **options} if backbone == "conv4" else {"width": 4, "groups": 2, **options}
    trunk = build_backbone(backbone, (1, 28, 28), opts)
    return MultiTaskModel(trunk, {"task": nn.Linear(feature_dim(trunk), WAYS)}).to(dtype)


OPTIONS: dict[str, dict[str, Any]] = {
    "maml": {"inner_lr": 0.1}, "fomaml": {"inner_lr": 0.1}, "reptile": {"inner_lr": 0.05, "inner_steps": 5},
    "anil": {"inner_lr": 0.1}, "boil": {"inner_lr": 0.1}, "metasgd": {"inner_lr": 0.1},
    # (hand-built episodes carry no global class ids: the Baseline family meta-trains through its support fit)
    "baseline": {"pretrain": False}, "baseline_pp": {"pretrain": False}, "rfs_linear": {"pretrain": False},
}


def _query_loss(algorithm: MetaAlgorithm, net: nn.Module, ep: Episode) -> float:
    steps = algorithm.test_inner_steps if algorithm.uses_inner_steps else 0
    return float(algorithm.evaluate(net, ep, [steps])[steps]["loss"].mean())


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_every_algorithm_learns_a_conv_episode(name: str) -> None:
    net = model()
    algorithm = ALGORITHMS.create(name, net, **OPTIONS.get(name, {}))
    optimizer = torch.optim.Adam(meta_parameters(algorithm, net), lr=1e-2)
    ep = episode(tasks=2, shots=2, query=2)
    before = _query_loss(algorithm, net, ep)
    for _ in range(8):
        out = meta_step(algorithm, net, ep, optimizer)
        assert torch.isfinite(torch.tensor(out["loss"]))
    after = _query_loss(algorithm, net, ep)
    assert after < before, f"{name}: query loss after adaptation {before:.4f} → {after:.4f} did not fall"
    assert algorithm.evaluate(net, ep, [0, 1])[1]["accuracy"].shape == (2,)


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_resnet12_runs_through_the_task_loop(name: str, path_spy: PathSpy) -> None:
    net = model("resnet12")
    algorithm = ALGORITHMS.create(name, net, **OPTIONS.get(name, {}))
    optimizer = torch.optim.Adam(meta_parameters(algorithm, net), lr=1e-3)
    out = meta_step(algorithm, net, episode(), optimizer)
    assert torch.isfinite(torch.tensor(out["loss"]))
    assert path_spy.ran() == ({"_loop_forward"} if name == "maml" else set())  # ProtoNet embeds all tasks at once


# -- oracles: the task loop == vmap(functional_call) == a plain loop, float64 -----------------------------------
VMAP = {"task_loop": False}  # the general vmap(functional_call) path


def _per_task(params: Mapping[str, Tensor], tasks: int, scale: float = 0.05) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(5)
    return {n: p.detach().unsqueeze(0) + scale * torch.randn(tasks, *p.shape, generator=g, dtype=p.dtype)
            for n, p in params.items()}


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
@pytest.mark.parametrize("which", ["all", "trunk", "heads", "norms", "none"])
def test_task_loop_forward_equals_vmap(backbone: str, which: str, path_spy: PathSpy) -> None:
    net = model(backbone, dtype=torch.float64)
    params = dict(net.named_parameters())
    pick = {"all": lambda n: True, "trunk": lambda n: n.startswith("trunk."),
            "heads": lambda n: n.startswith("heads."), "norms": lambda n: "norm" in n or ".1." in n,
            "none": lambda n: False}[which]
    names = [n for n in params if pick(n)]
    assert names or which == "none"
    fast = _per_task({n: params[n] for n in names}, 3)
    shared = {n: p for n, p in params.items() if n not in fast}
    x = episode(tasks=3, dtype=torch.float64).query.x
    looped = batched_forward(net, shared, fast, x)
    assert path_spy.ran() == {"_loop_forward"}
    path_spy.reset()
    with speed_paths(**VMAP):
        torch.testing.assert_close(looped, batched_forward(net, shared, fast, x), rtol=0, atol=1e-10)
    assert path_spy.ran() == {"_vmap_forward"}


def test_task_loop_gradients_equal_vmap(path_spy: PathSpy) -> None:
    net = model(dtype=torch.float64)
    params = dict(net.named_parameters())
    fast = _per_task(params, 3)
    support = episode(tasks=3, shots=2, dtype=torch.float64).support
    looped = task_gradients(net, {}, fast, support)
    assert path_spy.ran() == {"_loop_forward"}
    path_spy.reset()
    with speed_paths(**VMAP):
        reference = task_gradients(net, {}, fast, support)
    assert path_spy.ran() == {"_vmap_forward"}
    for n in fast:
        assert looped[n].shape == (3, *params[n].shape)
        torch.testing.assert_close(looped[n], reference[n], rtol=0, atol=1e-8)


def _meta_gradient(algorithm: MetaAlgorithm, net: nn.Module, ep: Episode) -> dict[str, Tensor]:
    net.zero_grad()
    algorithm.zero_grad()
    algorithm.meta_objective(net, ep).objective.backward()
    grads = {f"model.{n}": p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    grads.update({f"alg.{n}": p.grad.clone() for n, p in algorithm.named_parameters() if p.grad is not None})
    return grads


@pytest.mark.parametrize(("name", "options"), [
    ("maml", {"inner_steps": 2}), ("boil", {}), ("metasgd", {}), ("maml", {"first_order": True}),
    ("anil", {}), ("reptile", {"inner_steps": 2}),
])
def test_second_order_meta_gradient_task_loop_equals_vmap(name: str, options: dict[str, Any],
                                                        path_spy: PathSpy) -> None:
    net = model(dtype=torch.float64)
    algorithm = ALGORITHMS.create(name, net, inner_lr=0.3, **options).double()
    ep = episode(tasks=3, shots=1, query=2, dtype=torch.float64)
    looped = _meta_gradient(algorithm, net, ep)
    assert path_spy.ran() == {"_loop_forward"}
    path_spy.reset()
    with speed_paths(**VMAP):  # the same algorithm object: its cached plan follows the switch
        reference = _meta_gradient(algorithm, net, ep)
    assert path_spy.ran() == {"_vmap_forward"}
    assert looped.keys() == reference.keys() and looped
    for n, g in looped.items():
        torch.testing.assert_close(g, reference[n], rtol=0, atol=1e-6, msg=f"{name}: meta-gradient of {n}")
    assert any(g.abs().max() > 1e-4 for n, g in looped.items() if n.startswith("model.trunk.0."))


def test_task_loop_gradients_match_a_loop_over_tasks(path_spy: PathSpy) -> None:
    """Oracle against the plainest computation: each task alone, through the module's own forward."""
    net = model(dtype=torch.float64)
    params = dict(net.named_parameters())
    fast = _per_task(params, 2)
    support = episode(tasks=2, shots=2, dtype=torch.float64).support
    batched = task_gradients(net, {}, fast, support)
    assert path_spy.ran() == {"_loop_forward"}
    for t in range(2):
        mine = {n: w[t].clone().requires_grad_() for n, w in fast.items()}
        logits = torch.func.functional_call(net, mine, (support.x[t], "task"))
        loss = nn.functional.cross_entropy(logits, support.y[t])
        grads = torch.autograd.grad(loss, list(mine.values()))
        for n, g in zip(mine, grads, strict=True):
            torch.testing.assert_close(batched[n][t], g, rtol=0, atol=1e-10)


def test_split_batches_share_nothing() -> None:
    """A query example's output depends only on itself and its task's parameters (no batch statistics)."""
    net = model(dtype=torch.float64)
    fast = _per_task(dict(net.named_parameters()), 2)
    x = episode(tasks=2, query=3, dtype=torch.float64).query.x
    full = batched_forward(net, {}, fast, x)
    alone = batched_forward(net, {}, fast, x[:, :1])
    torch.testing.assert_close(full[:, :1], alone, rtol=0, atol=1e-12)


# -- configs and runs -------------------------------------------------------------------------------------------------
FASHION = Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not FASHION, reason="sudo apt-get install dataset-fashion-mnist")


def _config(algorithm: str, backbone: str = "conv4", **model: Any) -> dict[str, Any]:
    return {
        "name": f"{algorithm}-{backbone}", "threads": 1,
        "data": {"dataset": "fashion_fewshot", "options": {"ways": 3, "shots": 1, "query_shots": 2, "meta_batch": 2}},
        "model": {"backbone": backbone, "backbone_options": {"width": 8, "groups": 4}, **model},
        "training": {"algorithm": algorithm, "algorithm_options": OPTIONS.get(algorithm, {}), "max_steps": 2,
                     "eval_every": 2, "meta_val_tasks": 2, "meta_test_tasks": 2},
    }


@pytest.mark.parametrize(("change", "match"), [
    ({"backbone": "conv5"}, r"model\.backbone: unknown backbone 'conv5'\. Did you mean 'conv4'"),
    ({"backbone_options": {"norm": "batch"}}, r"model\.backbone_options: `norm` must be one of group, layer, none"),
    ({"backbone_options": {"depth": 3}}, r"model\.backbone_options: unknown option 'depth'\. Allowed options: width"),
    ({"backbone": "mlp", "backbone_options": {"width": 3}}, r"takes no options.*model\.trunk_hidden"),
])
def test_config_checks_backbone_names_and_options(change: dict[str, Any], match: str) -> None:
    data = _config("protonet")
    data["model"].update(change)
    with pytest.raises(ConfigError, match=match):
        Config.from_dict(data)


def test_config_keeps_conv_backbones_to_hard_sharing_in_joint_runs() -> None:
    data = {"data": {"dataset": "fashion"}, "model": {"architecture": "mmoe", "backbone": "conv4"}}
    with pytest.raises(ConfigError, match=r"model\.architecture: hps"):
        Config.from_dict(data)
    assert Config.from_dict({"data": {"dataset": "fashion"}}).model.backbone == "mlp"  # the default is unchanged


@needs_fashion
@pytest.mark.slow
def test_build_meta_puts_a_linear_head_on_the_conv_backbone() -> None:
    exp = build(Config.from_dict(_config("maml")))
    assert isinstance(exp.model.trunk, Conv4) and exp.family.input_shape == (1, 28, 28)
    head = exp.model.heads["task"]
    assert isinstance(head, nn.Sequential) and isinstance(head[0], nn.Linear) and head[0].in_features == 8
    with pytest.raises(ConfigError, match=r"model\.backbone: conv4"):
        build(Config.from_dict(_config("maml", backbone="mlp", backbone_options={})))


@needs_fashion
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_train_end_to_end_with_a_conv_backbone(tmp_path: Path, algorithm: str) -> None:
    run, result = train(Config.from_dict(_config(algorithm)), tmp_path / "run")
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["test"]["fashion_fewshot"]["num_tasks"] == 2 and result.fit.steps == 2
    assert (run.path / "checkpoints" / "best.safetensors").is_file()


@pytest.mark.parametrize("algorithm", ["protonet", "maml", "ridge"])
def test_shipped_glyphs_configs_validate(algorithm: str) -> None:
    text = resources.files("mtml").joinpath("configs", f"glyphs_{algorithm}_5w1s.yaml").read_text()
    cfg = Config.from_dict(yaml.safe_load(text))
    assert (cfg.data.dataset, cfg.model.backbone, cfg.training.algorithm) == ("glyphs", "conv4", algorithm)
    assert (cfg.data.options["ways"], cfg.data.options["shots"]) == (5, 1)


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "metasgd", "protonet"])
def test_meta_backward_one_task_at_a_time_equals_one_backward(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images back-propagate task by task (each task's objective scaled by 1/tasks): the same gradients, losses
    and accuracies as one backward pass of the episode's mean."""
    ep = episode(tasks=3, shots=1, query=2, dtype=torch.float64)
    results = []
    for per_task in (True, False):
        net = model(dtype=torch.float64)
        algorithm = ALGORITHMS.create(name, net, **OPTIONS.get(name, {})).double()
        calls: list[int] = []

        def counted(m: nn.Module, e: Episode, calls: list[int] = calls,
                    original: Any = algorithm.meta_objective) -> Any:
            calls.append(e.num_tasks)
            return original(m, e)

        monkeypatch.setattr(algorithm, "meta_objective", counted)
        with speed_paths(task_backward=per_task):
            out = meta_backward(algorithm, net, ep)
        # gradient-based algorithms split an image episode into its tasks; ProtoNet keeps one batched pass
        assert calls == ([1, 1, 1] if per_task and name != "protonet" else [3])
        grads = [p.grad.clone() for p in meta_parameters(algorithm, net) if p.grad is not None]
        results.append((grads, out))
    (a, out_a), (b, out_b) = results
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out_a.losses, out_b.losses, rtol=1e-9, atol=1e-12)
    if name != "reptile":  # ½‖θ − φ̄‖² is not a mean over tasks; its gradient θ − φ̄ is (checked above)
        torch.testing.assert_close(out_a.objective, out_b.objective, rtol=1e-9, atol=1e-12)
    if out_b.accuracy is not None:
        torch.testing.assert_close(out_a.accuracy, out_b.accuracy)
