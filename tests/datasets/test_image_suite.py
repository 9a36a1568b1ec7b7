"""The ``images`` suite: glyph script/character/font-style tasks on shared images, Fashion-MNIST category/group,
faces through an image stem into the 28×28 conv trunk, wrong-size and unseen-label errors, a short joint run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mtml.config import Config
from mtml.datasets import DATASETS
from mtml.datasets._fashion import DEFAULT_ROOT
from mtml.datasets._image_suite import FONT_STYLES, check_seen_labels, images
from mtml.errors import ConfigError, DataError, ShapeError
from mtml.nn import build_model
from mtml.nn._builders import ImageStem
from mtml.nn._conv import Conv4
from mtml.tasks import Split, Task, TaskKind
from mtml.workflows import embedded_config, train

pytest.importorskip("skimage")
pytest.importorskip("fontTools")
pytestmark = pytest.mark.skipif(not Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file(),
                                reason="sudo apt-get install dataset-fashion-mnist")
TINY = {"alphabets": ["GREEK", "LATIN"], "characters_per_alphabet": 4, "examples_per_character": 10,
        "fashion_train": 64, "fashion_val": 32, "fashion_test": 32}
NAMES = ["script", "character", "font_style", "category", "group", "faces"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("glyph-cache"))


@pytest.fixture(scope="module")
def tasks(cache: str) -> list[Task]:
    return images(cache_dir=cache, **TINY)  # type: ignore[arg-type]


def test_task_names_kinds_and_shapes(tasks: list[Task]) -> None:
    assert [t.name for t in tasks] == NAMES
    assert [t.kind for t in tasks] == [TaskKind.MULTICLASS] * 5 + [TaskKind.BINARY]
    assert [t.num_outputs for t in tasks] == [2, 8, len(FONT_STYLES), 10, 4, 1]
    assert [t.input_shape for t in tasks] == [(1, 28, 28)] * 5 + [(1, 25, 25)]
    script, character, style = tasks[:3]
    for split in ("train", "val", "test"):
        x = script.split(split).x
        assert torch.equal(x, character.split(split).x) and torch.equal(x, style.split(split).x)  # one image set
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # every character is in every split (stratified), and a character belongs to one script
    for split in ("train", "val", "test"):
        assert set(character.split(split).y.tolist()) == set(range(8))
    pairs = set(zip(character.train.y.tolist(), script.train.y.tolist(), strict=True))
    assert len(pairs) == 8 and {s for _, s in pairs} == {0, 1}
    assert set(style.train.y.tolist()) <= set(range(len(FONT_STYLES))) and len(set(style.train.y.tolist())) >= 3
    assert len(tasks[3].train) == 64 and len(tasks[3].test) == 32 and len(tasks[5].train) == 120


def test_registered_and_seeded(tasks: list[Task], cache: str) -> None:
    again = DATASETS.create("images", cache_dir=cache, **TINY)
    assert all(torch.equal(a.test.y, b.test.y) for a, b in zip(tasks, again, strict=True))
    other = images(cache_dir=cache, seed=1, **TINY)  # type: ignore[arg-type]
    assert not torch.equal(tasks[1].test.x, other[1].test.x)  # the seed re-draws the split, not the rendering
    total = [sum(float(t.split(s).x.double().sum()) for s in ("train", "val", "test")) for t in (tasks[1], other[1])]
    assert total[0] == pytest.approx(total[1], rel=1e-9)  # same images, split differently


def test_faces_stem_into_the_conv_trunk(tasks: list[Task]) -> None:
    torch.manual_seed(0)
    model = build_model(tasks, "hps", backbone="conv4", backbone_options={"width": 8, "groups": 4})
    assert isinstance(model.trunk, Conv4) and list(model.stems) == ["faces"]
    stem = model.stems["faces"]
    assert isinstance(stem, ImageStem)
    x = tasks[5].train.x[:3]
    padded = stem(x)
    assert padded.shape == (3, 1, 28, 28)
    assert torch.allclose(padded[:, :, 1:26, 1:26], x)  # identity 1×1 conv at the start, then zero padding
    assert float(padded.detach()[:, :, 0].abs().sum()) == 0.0
    assert model(x, "faces").shape == (3, 1)
    out = model.forward_many({t.name: t.train.x[:4] for t in tasks})
    assert [tuple(o.shape) for o in out.values()] == [(4, 2), (4, 8), (4, 4), (4, 10), (4, 4), (4, 1)]
    # the single-task baseline: every task its own Conv-4; faces' own one behind its image stem
    separate = build_model(tasks, "hps", backbone="conv4", backbone_options={"width": 8, "groups": 4},
                           share_trunk=False)
    assert isinstance(separate.trunk, nn.Identity) and isinstance(separate.stems["script"], Conv4)
    faces = separate.stems["faces"]
    assert isinstance(faces, nn.Sequential) and isinstance(faces[0], ImageStem) and isinstance(faces[1], Conv4)
    assert separate(x, "faces").shape == (3, 1)


def test_image_stem_resizes_larger_images_and_maps_channels() -> None:
    stem = ImageStem((3, 40, 36), (1, 28, 28))
    assert stem(torch.rand(2, 3, 40, 36)).shape == (2, 1, 28, 28)
    with pytest.raises(ConfigError, match=r"\(784,\)"):
        ImageStem((784,), (1, 28, 28))


def test_wrong_image_size_names_task_and_shapes(tasks: list[Task]) -> None:
    model = build_model(tasks, "hps", backbone="conv4", backbone_options={"width": 8, "groups": 4})
    with pytest.raises(ShapeError, match=r"task 'faces'.*\(1, 28, 28\).*\(1, 25, 25\)"):
        model(torch.zeros(2, 1, 28, 28), "faces")
    with pytest.raises(ShapeError, match=r"task 'character'.*\(1, 25, 25\).*\(1, 28, 28\)"):
        model(torch.zeros(2, 1, 25, 25), "character")


def test_unseen_labels_and_bad_options_are_refused(cache: str) -> None:
    x = torch.zeros(4, 1, 28, 28)
    y = [torch.tensor(v) for v in ([0, 0, 1, 1], [0, 2, 1, 1], [0, 1, 1, 0])]
    task = Task("letters", TaskKind.MULTICLASS, *(Split(x, labels) for labels in y), num_outputs=3)
    with pytest.raises(DataError, match=r"task 'letters': val labels \[2\] never occur in its train split"):
        check_seen_labels(task)
    with pytest.raises(ConfigError, match="characters_per_alphabet"):
        images(characters_per_alphabet=1, cache_dir=cache)
    with pytest.raises(ConfigError, match="val_fraction"):
        images(val_fraction=0.7, cache_dir=cache)
    with pytest.raises(ConfigError, match="Did you mean 'GREEK'"):
        images(alphabets=["GREKK"], cache_dir=cache)


def test_shipped_config_validates() -> None:
    config = embedded_config("images")
    assert config.data.dataset == "images" and config.model.backbone == "conv4" and config.threads == 1
    assert set(config.data.options) <= set(images.__kwdefaults__)


@pytest.mark.slow
def test_short_joint_run_of_the_suite(cache: str, tmp_path: Path) -> None:
    raw = embedded_config("images").to_dict()
    raw["data"]["options"] = {**TINY, "cache_dir": cache}
    raw["model"]["backbone_options"] = {"width": 8, "groups": 4}
    raw["training"].update(max_steps=6, eval_every=3, batch_size=16)
    _, result = train(Config.from_dict(raw), tmp_path / "run")
    assert set(result.test) == set(NAMES)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert json.dumps(summary)  # written and readable
    for metrics in result.test.values():
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert 0.0 <= result.test["faces"]["accuracy"] <= 1.0
