"""The Keras 3 bridge: a Keras model wrapped by ``from_keras`` against the same model written in torch."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported
keras = pytest.importorskip("keras")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import mtml.meta._functional as functional  # noqa: E402
from mtml import StopRule, train_multitask  # noqa: E402
from mtml.datasets import synthetic_linear  # noqa: E402
from mtml.errors import ConfigError  # noqa: E402
from mtml.meta import ALGORITHMS, Episode, meta_evaluate, meta_parameters, meta_step  # noqa: E402
from mtml.nn import KerasModule, MultiTaskModel, feature_dim, from_keras  # noqa: E402
from mtml.tasks import Split  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="keras runs on another backend")
L = keras.layers
ROOT = Path(__file__).resolve().parents[2]


def keras_mlp(d_in: int, widths: list[int], activation: str | None = None, seed: int = 0) -> KerasModule:
    """Dense layers (``activation`` after every one but the last), Glorot-initialised from ``seed``."""
    layers = [L.Dense(w, activation=activation if i < len(widths) - 1 else None,
                      kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i),
                      bias_initializer=keras.initializers.RandomUniform(-0.5, 0.5, seed=seed + 100 + i))
              for i, w in enumerate(widths)]
    return from_keras(keras.Sequential([keras.Input((d_in,)), *layers]))


def torch_twin(module: KerasModule, activation: type[nn.Module] | None = None) -> nn.Sequential:
    """The ``nn.Linear`` chain with the Keras module's weights (a Keras kernel is ``[in, out]``)."""
    kernels = [module.get_submodule(str(i)) for i in range(len(module._modules))]
    layers: list[nn.Module] = []
    for i, holder in enumerate(kernels):
        kernel, bias = holder.get_parameter("kernel"), holder.get_parameter("bias")
        linear = nn.Linear(*kernel.shape)
        with torch.no_grad():
            linear.weight.copy_(kernel.T)
            linear.bias.copy_(bias)
        layers.append(linear)
        if activation is not None and i < len(kernels) - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def keras_grad_as_torch(name: str, grad: Tensor) -> Tensor:
    return grad.T if name.endswith("kernel") else grad


def pairs(keras_model: nn.Module, torch_model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """Parameters of the two models side by side, in registration order (kernel ↔ weight, bias ↔ bias)."""
    ks, ts = list(keras_model.named_parameters()), list(torch_model.named_parameters())
    assert len(ks) == len(ts)
    return [(kn, kp, tp) for (kn, kp), (_, tp) in zip(ks, ts, strict=True)]


def assert_close_grads(keras_model: nn.Module, torch_model: nn.Module, rtol: float = 2e-5) -> float:
    """Every parameter's gradient equal up to ``rtol`` of its largest entry (and nonzero); the worst ratio."""
    worst = 0.0
    for name, kp, tp in pairs(keras_model, torch_model):
        assert kp.grad is not None and tp.grad is not None, name
        assert float(tp.grad.abs().max()) > 0, name
        diff = float((keras_grad_as_torch(name, kp.grad) - tp.grad).abs().max() / tp.grad.abs().max())
        worst = max(worst, diff)
    assert worst < rtol, worst
    return worst


# -- the wrapper ---------------------------------------------------------------------------------------------
def test_parameters_are_the_keras_variables_under_stable_names() -> None:
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, activation="relu"), L.Dropout(0.5), L.Dense(2)])
    wrapped = from_keras(model)
    assert [n for n, _ in wrapped.named_parameters()] == ["0.kernel", "0.bias", "2.kernel", "2.bias"]
    assert [n for n, _ in wrapped.named_buffers()] == ["1.seed_generator_state"]
    assert all(p is v.value for p, v in zip(wrapped.parameters(), model.trainable_variables, strict=True))
    assert feature_dim(wrapped) == 2 and wrapped.input_shape == (4,)
    # an optimiser step on the wrapper moves the Keras model with it
    x = torch.randn(5, 4)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped.eval()
    wrapped(x).square().sum().backward()
    optimizer.step()
    torch.testing.assert_close(wrapped(x), model(x, training=False), rtol=0, atol=0)


def test_frozen_layers_are_buffers_the_engine_leaves_alone() -> None:
    body = keras.Sequential([keras.Input((6,)), L.Dense(5, activation="tanh"), L.Dense(4)])
    body.layers[0].trainable = False  # e.g. a pretrained layer kept fixed
    model = MultiTaskModel(from_keras(body), {"task": keras_mlp(4, [1])})
    assert [n for n, _ in model.named_buffers()] == ["trunk.0.kernel", "trunk.0.bias"]
    frozen = model.trunk.get_buffer("0.kernel").clone()
    method = ALGORITHMS.create("maml", model, inner_lr=0.1, inner_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meta_step(method, model, regression_episode(), optimizer)
    assert torch.equal(model.trunk.get_buffer("0.kernel"), frozen)
    assert all(float(p.grad.abs().max()) > 0 for p in model.parameters() if p.grad is not None)
    assert method.fast_names(model) == ["trunk.1.kernel", "trunk.1.bias", "heads.task.0.kernel", "heads.task.0.bias"]


def test_names_do_not_depend_on_keras_layer_names() -> None:
    """Keras numbers layer names globally (dense, dense_1, ...); checkpoints of two builds still line up."""
    first, second = keras_mlp(3, [4, 2], "tanh", seed=1), keras_mlp(3, [4, 2], "tanh", seed=2)
    assert first.keras_model.layers[0].name != second.keras_model.layers[0].name
    second.load_state_dict(first.state_dict())
    x = torch.randn(6, 3)
    torch.testing.assert_close(second(x), first(x))


def test_functional_call_uses_the_substituted_tensors() -> None:
    """What ``functional_call`` on a bare Keras model cannot do (keras-team/keras#20279)."""
    wrapped = keras_mlp(3, [4, 2], "tanh")
    twin = torch_twin(wrapped, nn.Tanh)
    x = torch.randn(6, 3)
    new = {n: (p.detach() + 0.1 * torch.randn_like(p)).requires_grad_() for n, p in wrapped.named_parameters()}
    out = functional_call(wrapped, new, (x,))
    for (_, _, tp), value in zip(pairs(wrapped, twin), new.values(), strict=True):
        with torch.no_grad():
            tp.copy_(value.T if value.ndim == 2 else value)
    torch.testing.assert_close(out, twin(x))
    out.square().sum().backward()
    assert all(float(v.grad.abs().sum()) > 0 for v in new.values())
    assert all(p.grad is None for p in wrapped.parameters())  # the module's own tensors were not used


def test_state_is_a_buffer_that_calls_move_on() -> None:
    model = keras.Sequential([keras.Input((4,)), L.Dense(8), L.BatchNormalization(), L.Dropout(0.5), L.Dense(1)])
    wrapped = from_keras(model)
    assert not wrapped.supports_vmap  # dropout draws random numbers; batch statistics move every call
    x = torch.randn(16, 4) + 3.0
    mean = wrapped.get_buffer("1.moving_mean").clone()
    a, b = wrapped(x), wrapped(x)
    assert not torch.equal(a, b)  # the seed state moved on: a new dropout mask
    assert not torch.equal(wrapped.get_buffer("1.moving_mean"), mean)
    wrapped.eval()
    torch.testing.assert_close(wrapped(x), wrapped(x), rtol=0, atol=0)
    torch.testing.assert_close(wrapped(x), wrapped.to_keras()(x, training=False))


def test_deepcopy_is_independent_and_syncs_back() -> None:
    wrapped = keras_mlp(3, [2])
    clone = copy.deepcopy(wrapped)
    x = torch.randn(4, 3)
    torch.testing.assert_close(clone(x), wrapped(x))
    with torch.no_grad():
        clone.get_parameter("0.bias").add_(1.0)
    assert not torch.allclose(clone(x), wrapped(x))
    torch.testing.assert_close(clone.to_keras()(x), clone(x))


def test_building_touches_no_global_torch_state() -> None:
    dtype, rng = torch.get_default_dtype(), torch.get_rng_state()
    keras_mlp(3, [4, 2], "relu")
    from_keras(keras.Sequential([keras.Input((4,)), L.Dropout(0.3), L.Dense(2)]))
    assert torch.get_default_dtype() == dtype and torch.equal(torch.get_rng_state(), rng)


def test_importing_mtml_does_not_import_keras_and_keras_keeps_torch_state() -> None:
    code = ("import sys, torch, mtml, mtml.nn, mtml.meta; assert 'keras' not in sys.modules; "
            "d, r, n = torch.get_default_dtype(), torch.get_rng_state(), torch.get_num_threads(); "
            "import os; os.environ['KERAS_BACKEND'] = 'torch'; import keras; "
            "assert (torch.get_default_dtype(), torch.get_num_threads()) == (d, n); "
            "assert torch.equal(torch.get_rng_state(), r)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# -- joint training --------------------------------------------------------------------------------------------
def twin_models(tasks: list, seed: int = 0) -> tuple[MultiTaskModel, MultiTaskModel]:
    trunk = keras_mlp(100, [16, 10], "relu", seed=seed)
    heads = {t.name: keras_mlp(10, [1], seed=seed + 10 * (i + 1)) for i, t in enumerate(tasks)}
    keras_model = MultiTaskModel(trunk, heads)
    torch_model = MultiTaskModel(torch_twin(trunk, nn.ReLU), {n: torch_twin(h) for n, h in heads.items()})
    return keras_model, torch_model


def test_joint_training_matches_torch_step_for_step() -> None:
    tasks = synthetic_linear(num_tasks=5, in_dim=100, latent_dim=10, n_train=40, n_val=20, n_test=20, seed=3)
    keras_model, torch_model = twin_models(tasks)
    batch = {t.name: (t.train.x[:16], t.train.y[:16]) for t in tasks}
    for model in (keras_model, torch_model):
        out = model.forward_many({n: x for n, (x, _) in batch.items()})
        sum(((out[n].squeeze(-1) - y) ** 2).mean() for n, (_, y) in batch.items()).backward()
    assert_close_grads(keras_model, torch_model)
    stop = StopRule(max_steps=30, eval_every=10, patience=5)
    results = [train_multitask(m, tasks, lr=1e-2, batch_size=16, stop=stop, seed=0) for m in twin_models(tasks)]
    for name in results[0].test:
        assert results[0].test[name]["mse"] == pytest.approx(results[1].test[name]["mse"], rel=1e-4)


def test_joint_training_reduces_the_loss() -> None:
    tasks = synthetic_linear(num_tasks=4, in_dim=100, latent_dim=10, n_train=60, n_val=30, n_test=30, seed=1)
    model, _ = twin_models(tasks)
    with torch.no_grad():
        before = {t.name: float(((model(t.test.x, t.name).squeeze(-1) - t.test.y) ** 2).mean()) for t in tasks}
    result = train_multitask(model, tasks, lr=1e-2, batch_size=32, stop=StopRule(max_steps=150, eval_every=50,
                                                                                 patience=3), seed=0)
    assert all(result.test[n]["mse"] < 0.8 * before[n] for n in before)  # (about 0.65 in 150 steps)


# -- meta-learning ----------------------------------------------------------------------------------------------
def regression_episode(seed: int = 0, tasks: int = 4, d: int = 6) -> Episode:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(tasks, d, 1, generator=g)
    xs, xq = torch.randn(tasks, 5, d, generator=g), torch.randn(tasks, 7, d, generator=g)
    return Episode(Split(xs, xs @ w), Split(xq, xq @ w))


def classification_episode(seed: int = 0, tasks: int = 3, ways: int = 3, d: int = 6) -> Episode:
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(tasks, ways, d, generator=g)
    labels = torch.arange(ways).repeat_interleave(4).expand(tasks, -1)

    def draw() -> Tensor:
        return centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(tasks, 4 * ways, d,
                                                                                       generator=g)

    return Episode(Split(draw(), labels), Split(draw(), labels), ways=ways)


def meta_twins(out: int = 1, vmap: bool | None = None) -> tuple[MultiTaskModel, MultiTaskModel]:
    body = keras.Sequential([keras.Input((6,)), L.Dense(5, activation="tanh",
                                                         kernel_initializer=keras.initializers.GlorotUniform(7)),
                             L.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(8))])
    trunk = from_keras(body, vmap=vmap)
    head = keras_mlp(4, [out], seed=9)
    return (MultiTaskModel(trunk, {"task": head}),
            MultiTaskModel(torch_twin(trunk, nn.Tanh), {"task": torch_twin(head)}))


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count calls of the engine's ``name`` (``_vmap_forward`` or ``_loop_forward``)."""
    calls: list[int] = []
    original: Callable[..., Tensor] = getattr(functional, name)

    def counted(*args: object) -> Tensor:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(functional, name, counted)
    return calls


@pytest.mark.parametrize("vmap", [None, False], ids=["vmap", "task-loop"])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil", "boil"])
def test_meta_gradient_matches_torch(algorithm: str, vmap: bool | None, monkeypatch: pytest.MonkeyPatch) -> None:
    keras_model, torch_model = meta_twins(vmap=vmap)
    episode = regression_episode()
    vmapped, looped = spy(monkeypatch, "_vmap_forward"), spy(monkeypatch, "_loop_forward")
    objectives = []
    for model in (keras_model, torch_model):
        method = ALGORITHMS.create(algorithm, model, inner_lr=0.1, inner_steps=2)
        out = method.meta_objective(model, episode)
        out.objective.backward()
        objectives.append(float(out.objective.detach()))
        if model is keras_model:  # the path under test ran (the torch twin takes the MLP speed path)
            assert (len(vmapped) > 0, len(looped) > 0) == ((True, False) if vmap is None else (False, True))
            vmapped.clear(), looped.clear()
    assert not vmapped and not looped
    assert objectives[0] == pytest.approx(objectives[1], rel=1e-5)
    assert_close_grads(keras_model, torch_model)  # every parameter: the torch model's gradient, nonzero


def test_protonet_matches_torch() -> None:
    keras_model, torch_model = meta_twins(out=3)
    episode = classification_episode()
    losses = []
    for model in (keras_model, torch_model):
        out = ALGORITHMS.create("protonet", model).meta_objective(model, episode)
        out.objective.backward()
        losses.append(float(out.objective.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # (the head plays no part in ProtoNet.) Squared distances do not change when every embedding moves by the same
    # vector, so the embedding's last bias has a zero gradient in exact arithmetic: both models' must be rounding
    # noise, and every other parameter's gradient must agree
    *rest, (last, kb, tb) = pairs(keras_model.trunk, torch_model.trunk)
    assert last.endswith("bias")
    assert kb.grad is not None and tb.grad is not None
    scale = max(float(tp.grad.abs().max()) for _, _, tp in rest if tp.grad is not None)
    assert float(kb.grad.abs().max()) < 1e-5 * scale and float(tb.grad.abs().max()) < 1e-5 * scale
    for name, kp, tp in rest:
        assert kp.grad is not None and tp.grad is not None and float(tp.grad.abs().max()) > 0, name
        diff = float((keras_grad_as_torch(name, kp.grad) - tp.grad).abs().max() / tp.grad.abs().max())
        assert diff < 2e-5, (name, diff)


#: algorithms whose head is a classifier built from the support set: they get a classification episode
CLASSIFICATION_ONLY = {"protonet", "metaoptnet", "baseline", "baseline_pp", "rfs_linear"}
BASELINES = {"baseline", "baseline_pp", "rfs_linear"}


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS.names() if a != "proto_maml"])
def test_every_algorithm_meta_learns_a_keras_model_like_torch(algorithm: str) -> None:
    # (proto_maml writes prototypes into an nn.Linear head; a Keras Dense head is refused in one line, below)
    out = 3 if algorithm in CLASSIFICATION_ONLY else 1
    episode = classification_episode() if algorithm in CLASSIFICATION_ONLY else regression_episode()
    runs = []
    for model in meta_twins(out=out):
        # (hand-built episodes carry no global class ids: the Baseline family meta-trains through its support fit)
        method = ALGORITHMS.create(algorithm, model, **({"pretrain": False} if algorithm in BASELINES else {}))
        optimizer = torch.optim.SGD(meta_parameters(method, model), lr=0.01)
        runs.append([meta_step(method, model, episode, optimizer)["loss"] for _ in range(3)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    assert runs[0][-1] < runs[0][0]


def test_proto_maml_refuses_a_keras_head_in_one_line() -> None:
    keras_model, _ = meta_twins(out=3)
    with pytest.raises(ConfigError):
        method = ALGORITHMS.create("proto_maml", keras_model)
        method.meta_objective(keras_model, classification_episode())


def test_dropout_model_meta_learns_through_the_task_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    body = keras.Sequential([keras.Input((6,)), L.Dense(8, activation="relu"), L.Dropout(0.2), L.Dense(4)])
    model = MultiTaskModel(from_keras(body), {"task": keras_mlp(4, [1])})
    looped = spy(monkeypatch, "_loop_forward")
    method = ALGORITHMS.create("maml", model, inner_lr=0.05, inner_steps=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    episode = regression_episode(tasks=6)
    before = meta_evaluate(method, model.eval(), [episode], steps=[1], num_tasks=6)["loss@1"]
    model.train()
    for _ in range(60):
        meta_step(method, model, episode, optimizer)
    after = meta_evaluate(method, model.eval(), [episode], steps=[1], num_tasks=6)["loss@1"]
    assert looped and after < 0.7 * before


# -- bad inputs --------------------------------------------------------------------------------------------------
def one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_refuses_what_it_cannot_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as err:
        from_keras(nn.Linear(2, 2))
    assert "keras.Model" in one_line(err)
    with pytest.raises(ConfigError) as err:
        from_keras(keras.Sequential([L.Dense(2)]))
    assert "not built" in one_line(err) and "keras.Input" in one_line(err)
    two = keras.Input((3,))
    with pytest.raises(ConfigError) as err:
        from_keras(keras.Model(two, [L.Dense(1)(two), L.Dense(2)(two)]))
    assert "one output tensor" in one_line(err)
    with pytest.raises(ConfigError) as err:
        from_keras(keras_mlp(3, [2]).keras_model, input_shape=(5,))
    assert "input_shape" in one_line(err)
    built = keras_mlp(3, [2]).keras_model
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ConfigError) as err:
        from_keras(built)
    assert "KERAS_BACKEND=torch" in one_line(err)


def test_missing_keras_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)
    with pytest.raises(ConfigError) as err:
        from_keras(object())
    assert "pip install 'mtml[keras]'" in one_line(err)


@pytest.mark.slow
def test_seed_example_runs() -> None:
    done = subprocess.run([sys.executable, "examples/seed_keras.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, check=True)  # ~9.5 min on an AVX2-only 2-core host
    lines = done.stdout.splitlines()
    assert lines[0].startswith("layers: keras") and len(lines) == 4
    mse = [float(line.split("mean test MSE ")[1].split()[0]) for line in lines[1:]]
    assert mse[0] < 0.1 < 1.0 < mse[1] and mse[2] < 1.0  # sharing beats separate trunks; MAML adapts well
