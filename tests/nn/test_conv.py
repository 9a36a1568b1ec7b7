"""Convolutional backbones: shapes, parameter counts, per-example normalisation, registry and validation."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mtml.errors import ConfigError, ShapeError
from mtml.nn import BACKBONES, build_backbone, build_model, check_backbone_options
from mtml.nn._conv import Conv4, ResNet12
from mtml.tasks import Split, Task, TaskKind

torch.set_num_threads(1)


def _conv_params(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_out * c_in * k * k + (c_out if bias else 0)


@pytest.mark.parametrize(("shape", "features"), [((1, 28, 28), 64), ((3, 84, 84), 1600)])
def test_conv4_shapes_and_parameter_count(shape: tuple[int, int, int], features: int) -> None:
    model = build_backbone("conv4", shape)
    assert model.out_features == features
    assert model(torch.randn(2, *shape)).shape == (2, features)
    widths = [shape[0], 64, 64, 64, 64]
    expected = sum(_conv_params(widths[i], widths[i + 1], 3) + 2 * 64 for i in range(4))  # conv + norm affine
    assert sum(p.numel() for p in model.parameters()) == expected
    assert expected == (111_936 if shape[0] == 1 else 113_088)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 84, 84)])
def test_resnet12_shapes_and_parameter_count(shape: tuple[int, int, int]) -> None:
    model = build_backbone("resnet12", shape, {"width": 8, "groups": 4})
    assert model.out_features == 80
    assert model(torch.randn(2, *shape)).shape == (2, 80)
    widths = [shape[0], 8, 20, 40, 80]
    expected = 0
    for c_in, c_out in itertools.pairwise(widths):
        expected += _conv_params(c_in, c_out, 3, False) + 2 * _conv_params(c_out, c_out, 3, False)
        expected += _conv_params(c_in, c_out, 1, False) + 4 * 2 * c_out  # shortcut + four norms
    assert sum(p.numel() for p in model.parameters()) == expected


def test_resnet12_default_widths_are_the_papers() -> None:
    with torch.device("meta"):
        model = ResNet12((3, 84, 84))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [c.out_channels for c in convs] == [64, 160, 320, 640]
    assert model.out_features == 640


@pytest.mark.parametrize("name", ["conv4", "resnet12"])
@pytest.mark.parametrize("norm", ["group", "layer", "none"])
def test_outputs_of_an_example_do_not_depend_on_the_rest_of_the_batch(name: str, norm: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, (1, 28, 28), {"width": 8, "norm": norm, "groups": 4}).double()
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(6, 1, 28, 28, generator=g, dtype=torch.float64)
    other = batch.clone()
    other[1:] = 5.0 * torch.randn(5, 1, 28, 28, generator=g, dtype=torch.float64) + 3.0  # new neighbours
    alone = model(batch[:1])
    torch.testing.assert_close(model(batch)[:1], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(other)[:1], alone, rtol=0, atol=1e-12)
    model.train()  # no mode-dependent statistics either: train and eval agree
    train_out = model(batch)
    model.eval()
    torch.testing.assert_close(model(batch), train_out, rtol=0, atol=1e-12)


def test_no_batchnorm_and_no_buffers() -> None:
    for name in ("conv4", "resnet12"):
        model = build_backbone(name, (3, 32, 32), {"width": 8, "groups": 4})
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert not list(model.buffers())


@pytest.mark.parametrize(("norm", "kind", "groups"), [("group", nn.GroupNorm, 8), ("layer", nn.GroupNorm, 1),
                                                      ("none", nn.Identity, None)])
def test_norm_choices(norm: str, kind: type, groups: int | None) -> None:
    model = Conv4((1, 28, 28), norm=norm)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm | nn.Identity)]
    assert len(norms) == 4
    assert all(isinstance(m, kind) and (kind is not nn.Identity or type(m) is nn.Identity) for m in norms)
    if groups is not None:
        assert all(m.num_groups == groups for m in norms)


def test_registry_lists_backbones() -> None:
    assert {"mlp", "conv4", "resnet12"} <= set(BACKBONES.names())
    assert all(BACKBONES.describe().values())
    flat = build_backbone("mlp", (5,), {"hidden": (7, 3)})
    assert flat.out_features == 3 and flat(torch.randn(2, 5)).shape == (2, 3)


@pytest.mark.parametrize(("options", "match"), [
    ({"norm": "batch"}, "norm` must be one of group, layer, none"),
    ({"width": 0}, "`width` must be an integer >= 1"),
    ({"widht": 8}, "Did you mean 'width'"),
    ({"groups": True}, "`groups` must be int, written as such.*Got True"),  # a flag for a number: the registry
])
def test_bad_options_are_named(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_backbone_options("conv4", options)
    with pytest.raises(ConfigError, match=match):
        build_backbone("conv4", (1, 28, 28), options)


def test_unknown_keys_list_the_valid_ones_and_mlp_takes_none() -> None:
    with pytest.raises(ConfigError, match="Allowed options: width, norm, groups"):
        check_backbone_options("resnet12", {"depth": 12})
    with pytest.raises(ConfigError, match=r"model\.trunk_hidden"):
        check_backbone_options("mlp", {"width": 3})


def test_shape_errors_name_the_fix() -> None:
    with pytest.raises(ShapeError, match="at least 16×16"):
        build_backbone("conv4", (1, 8, 8))
    with pytest.raises(ShapeError, match=r"\[channels=3, height, width\]|images"):
        build_backbone("resnet12", (12,))
    with pytest.raises(ShapeError, match=r"model\.backbone: conv4"):
        build_backbone("mlp", (1, 28, 28))
    with pytest.raises(ConfigError, match="groups=8` must divide"):
        build_backbone("resnet12", (1, 28, 28), {"width": 8})  # stage width 20 is not a multiple of 8


# -- hard parameter sharing with a conv trunk (joint multi-task on images) ----------------------------------------
def _image_tasks(shape: tuple[int, ...] = (1, 28, 28)) -> list[Task]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, *shape, generator=g)
    fine = torch.arange(12) % 10
    return [Task("category", TaskKind.MULTICLASS, Split(x, fine), num_outputs=10),
            Task("group", TaskKind.MULTICLASS, Split(x, fine % 4), num_outputs=4)]


def test_hps_with_a_conv_trunk_trains_jointly() -> None:
    tasks = _image_tasks()
    torch.manual_seed(0)
    model = build_model(tasks, "hps", backbone="conv4", backbone_options={"width": 8, "groups": 4})
    assert isinstance(model.trunk, Conv4) and not model.stems
    assert [model.heads[t.name](torch.zeros(1, 8)).shape[1] for t in tasks] == [10, 4]
    out = model.forward_many({t.name: t.train.x for t in tasks})
    assert out["category"].shape == (12, 10) and out["group"].shape == (12, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = sum(nn.functional.cross_entropy(model(t.train.x, t.name), t.train.y) for t in tasks)
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def test_hps_conv_single_task_baseline_and_errors() -> None:
    tasks = _image_tasks()
    separate = build_model(tasks, "hps", backbone="resnet12", backbone_options={"width": 4, "groups": 2},
                           share_trunk=False)
    assert isinstance(separate.trunk, nn.Identity) and all(isinstance(s, ResNet12) for s in separate.stems.values())
    assert separate(tasks[0].train.x[:2], "group").shape == (2, 4)
    with pytest.raises(ConfigError, match="one input shape"):
        build_model([tasks[0], _image_tasks((784,))[1]], "hps", backbone="conv4")  # flat: no image stem
    with pytest.raises(ConfigError, match="Remove stem_width"):
        build_model(tasks, "hps", backbone="conv4", stem_width=8)
    with pytest.raises(ConfigError, match=r"model\.backbone: conv4"):
        build_model(tasks, "hps")  # the MLP default refuses images and names the fix
    with pytest.raises(ConfigError, match=r"unknown backbone 'conv5'\. Did you mean 'conv4'"):
        build_model(tasks, "hps", backbone="conv5")
