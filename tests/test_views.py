"""Crop-and-flip views (`label.view_recipe: crop_flip`) and the `shapes` dataset that uses them.

The views' promise: view v of sample `id` is a pure function of (id, v, seed) and the cache's
recipe, so the student regenerates exactly the pixels the teacher labeled. Checked here through
the real `kd label` writer and the student's loader (in memory and streamed) on RGB images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kd import augment, sources
from kd.cache import Cache, Teacher, label
from kd.cli import label as label_stage
from kd.cli import prepare as prepare_stage
from kd.config import LabelConfig, PrepareConfig, StudentConfig, TeacherConfig, from_mapping
from kd.errors import ConfigError
from kd.prepared import images
from kd.sources import shapes
from kd.tasks import image
from kd.tasks.image_models import build, fingerprint, save_model
from tests.helpers import invoke, invoke_cache, ok

CROP_FLIP = augment.crop_flip([0.35, 1.0], [3 / 4, 4 / 3], 0.5)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> Path:
    """A small preset-split image folder of rendered shapes (32x32 RGB), prepared."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(1)
    for split, count in (("train", 48), ("test", 16), ("unlabeled", 24)):
        labels = np.arange(count) % len(shapes.CLASSES)
        for n, (y, pixels) in enumerate(zip(labels, shapes.render(labels, rng))):
            folder = root / split if split == "unlabeled" else root / split / shapes.CLASSES[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{n}.png")
    out = root / "prepared"
    sources.prepare(PrepareConfig(dataset=str(root), labeled=None, unlabeled=None, test=None), out)
    return out


@pytest.fixture(scope="module")
def rgb_teacher(tmp_path_factory) -> Teacher:
    torch.manual_seed(0)
    kwargs = {"widths": [4, 8], "convs_per_stage": 1, "hidden": 16}
    model = build("cnn", kwargs, [3, 32, 32], len(shapes.CLASSES)).eval()
    directory = tmp_path_factory.mktemp("teacher") / "teacher"
    config = {"arch": "cnn", "arch_kwargs": kwargs, "input_shape": [3, 32, 32], "num_classes": len(shapes.CLASSES)}
    save_model(directory, model, config)
    return Teacher(model, fingerprint(directory), config, directory)


def student(**fields) -> StudentConfig:
    entry = {"arch": "cnn", "arch_kwargs": {"widths": [4], "hidden": 8}, "views": True,
             "loss": {"soft": {"weight": 1.0, "temperature": 4}}, **fields}
    return from_mapping(StudentConfig, {**entry, "name": "s"}, "students.s")


@pytest.mark.unit
@pytest.mark.parametrize("memory_mb", [2048, 0], ids=["in-memory", "streamed"])
def test_the_student_sees_the_exact_crops_the_teacher_labeled(rgb, rgb_teacher, tmp_path, memory_mb):
    seen: list[torch.Tensor] = []  # every input of the teacher's forward, in order
    hook = rgb_teacher.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        label(rgb_teacher, rgb, tmp_path / "cache", LabelConfig(top_k=4, views=3, view_recipe="crop_flip",
                                                                view_seed=7, part_size=16, batch_size=10),
              task_inputs=image.Inputs, progress=False)
    finally:
        hook.remove()
    assert seen[0].shape[0] == 1 and not seen[0].any()  # the probe that plans the cache
    labeled = torch.cat(seen[1:])  # cache rows in order: labeled, unlabeled, test splits
    cache = Cache.open(tmp_path / "cache")
    assert cache.manifest["views"] == {"count": 3, "seed": 7, "recipe": CROP_FLIP}
    transfer = image.rows(cache, rgb, student(), memory_mb)
    checked, views = 0, set()
    for batch in transfer.batches(epoch=0, batch_size=8, seed=0, views="cached"):
        assert torch.equal(batch["x"], labeled[batch["row"]])  # bit for bit
        views |= set((batch["row"] % 4).tolist())
        checked += len(batch["x"])
    assert checked == 48 + 24 and views == {0, 1, 2, 3}
    originals = torch.tensor(images.read_split(rgb / "labeled.parquet").x).view(-1, 3, 32, 32)
    assert torch.equal(labeled[0:192:4], originals)  # view 0 of every labeled image: as prepared
    assert not torch.equal(labeled[1:192:4], labeled[2:192:4])


@pytest.mark.unit
def test_views_are_pure_batch_independent_and_differ():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 3 * 12 * 16, generator=g)
    ids, views = np.repeat(np.arange(100, 130), 5), np.tile(np.arange(5), 30)
    out = augment.apply_views(x.repeat_interleave(5, 0), ids, views, [3, 12, 16], 3, CROP_FLIP)
    again = augment.apply_views(x.repeat_interleave(5, 0), ids, views, [3, 12, 16], 3, CROP_FLIP)
    assert torch.equal(out, again)
    assert torch.equal(out[views == 0], x)  # view 0: the image as is
    for row in (1, 7, 64, 149):  # a row alone gives the same bits as within the batch
        alone = augment.apply_views(x[row // 5:row // 5 + 1], ids[row:row + 1], views[row:row + 1], [3, 12, 16], 3,
                                    CROP_FLIP)
        assert torch.equal(alone[0], out[row])
    shown = out.view(30, 5, -1)
    for a in range(5):
        for b in range(a + 1, 5):
            assert not torch.isclose(shown[:, a], shown[:, b]).all(1).any()  # every pair of views differs
    other_seed = augment.apply_views(x.repeat_interleave(5, 0), ids, views, [3, 12, 16], 4, CROP_FLIP)
    assert not torch.equal(other_seed, out)


@pytest.mark.unit
def test_crop_parameters_follow_the_recipe():
    n, height, width = 20000, 24, 40
    boxes = augment.view_crops(np.arange(n), np.ones(n), 0, CROP_FLIP, height, width)
    left, top, w, h, flipped = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    area = w * h / (height * width)
    assert area.min() >= 0.35 - 1e-9 and area.max() <= 1 + 1e-9 and area.std() > 0.1
    inside = (w < width) & (h < height)  # not clamped: the drawn aspect ratio
    assert (w / h)[inside].min() >= 3 / 4 - 1e-9 and (w / h)[inside].max() <= 4 / 3 + 1e-9
    assert abs(flipped.mean() - 0.5) < 0.02
    assert (augment.view_crops(np.arange(5), np.zeros(5), 0, CROP_FLIP, height, width)
            == [0, 0, width, height, 0]).all()


@pytest.mark.unit
def test_a_full_crop_flips_and_a_crop_resizes_bilinearly():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=g)
    flip_only = augment.crop_flip([1, 1], [1, 1], 1.0)
    flipped = augment.apply_views(images.reshape(2, -1), np.arange(2), np.ones(2), [3, 8, 8], 0, flip_only)
    torch.testing.assert_close(flipped.view(2, 3, 8, 8), images.flip(-1), rtol=0, atol=1e-6)
    kept = augment.apply_views(images.reshape(2, -1), np.arange(2), np.ones(2), [3, 8, 8], 0,
                               augment.crop_flip([1, 1], [1, 1], 0.0))
    torch.testing.assert_close(kept.view(2, 3, 8, 8), images, rtol=0, atol=1e-6)
    # the 4x4 box at (left 2, top 1) resized to 8x8: away from its border (where the crop
    # samples the pixels around it, as a crop of the whole image should) it is plain bilinear
    # resizing of the cut-out box
    crop = augment._crop_flip(images, np.array([[2.0, 1.0, 4.0, 4.0, 0.0]] * 2))
    resized = F.interpolate(images[:, :, 1:5, 2:6], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crop[:, :, 1:7, 1:7], resized[:, :, 1:7, 1:7], rtol=0, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("fields,message", [
    ({"view_recipe": "crop"}, r"label.view_recipe: 'crop' must be one of \('shift', 'crop_flip'\)"),
    ({"view_scale": [0.5, 1.0]}, r"label.view_scale: \[0.5, 1.0\] is for view_recipe crop_flip, not 'shift'"),
    ({"view_recipe": "crop_flip", "view_scale": [0.8, 0.5]}, r"label.view_scale: .* 0 < low <= high"),
    ({"view_recipe": "crop_flip", "view_scale": [0.5]}, r"label.view_scale: \[0.5\] must be \[low, high\]"),
    ({"view_recipe": "crop_flip", "view_scale": [0.5, 1.5]}, r"label.view_scale: .* at most 1"),
    ({"view_recipe": "crop_flip", "view_ratio": [0, 1]}, r"label.view_ratio: .* 0 < low <= high"),
    ({"view_recipe": "crop_flip", "view_flip": 1.5}, r"label.view_flip: 1.5 must be a probability"),
    ({"view_recipe": "crop_flip", "view_flip": "yes"}, r"label.view_flip: 'yes' must be a number"),
])
def test_view_params_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(LabelConfig, fields, "label")
    with pytest.raises(ConfigError, match=message.replace("label", "teacher")):
        from_mapping(TeacherConfig, fields, "teacher")


@pytest.mark.unit
def test_crop_flip_needs_images(tmp_path):
    prepared = tmp_path / "prepared"
    sources.prepare(PrepareConfig(dataset="digits", input_shape=[64], labeled=20, unlabeled=10, test=20), prepared)
    model = build("mlp", {"hidden": [8]}, [64], 10)
    save_model(tmp_path / "t", model, {"arch": "mlp", "arch_kwargs": {"hidden": [8]}, "input_shape": [64],
                                       "num_classes": 10})
    teacher = Teacher(model, fingerprint(tmp_path / "t"), {"arch": "mlp"}, tmp_path / "t")
    with pytest.raises(ConfigError, match=r"label.view_recipe: crop_flip crops images \(C, H, W\); the prepared "
                                          r"inputs have shape \[64\]"):
        label(teacher, prepared, tmp_path / "cache", LabelConfig(views=2, view_recipe="crop_flip"),
              task_inputs=image.Inputs, progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()


@pytest.mark.integration
def test_kd_label_records_the_recipe_from_its_options(rgb, rgb_teacher, tmp_path, write_params):
    params = write_params(label={"top_k": 4, "views": 2, "view_recipe": "crop_flip"})
    ok(invoke(label_stage.main, "--params", params, "--teacher", rgb_teacher.directory, "--prepared", rgb,
              "--out", tmp_path / "cache", "--view-scale", "0.5,0.9", "--view-flip", "0", "--no-progress"))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["views"]["recipe"] == augment.crop_flip([0.5, 0.9], [3 / 4, 4 / 3], 0.0)
    info = ok(invoke_cache("info", tmp_path / "cache")).output
    assert "2 augmented per sample (crop_flip, flip 0.0, ratio [0.75, 1.3333333333333333], scale [0.5, 0.9], " \
           "seed 0)" in info
    result = invoke(label_stage.main, "--params", params, "--teacher", rgb_teacher.directory, "--prepared", rgb,
                    "--out", tmp_path / "other", "--view-recipe", "shift", "--view-scale", "0.5,1", expect=1)
    assert "label.view_scale: [0.5, 1.0] is for view_recipe crop_flip, not 'shift'" in result.output


@pytest.mark.unit
def test_shapes_classes_keep_their_label_when_flipped():
    u = np.arange(64, dtype=np.float32)[None, :] - 31.5
    v = np.arange(64, dtype=np.float32)[:, None] - 31.5
    for name in shapes.CLASSES:
        mask = shapes._mask(name, u, v, 20.0)
        assert mask.any() and (mask == mask[:, ::-1]).all(), name
    masks = [shapes._mask(name, u, v, 20.0) for name in shapes.CLASSES]
    assert len({m.tobytes() for m in masks}) == len(shapes.CLASSES)  # 8 different shapes


@pytest.mark.integration
def test_kd_prepare_shapes_writes_its_preset_splits(workdir, write_params):
    params = write_params(prepare={"dataset": "shapes", "labeled": None, "unlabeled": 500, "test": None})
    output = ok(invoke(prepare_stage.main, "--params", params)).output
    assert "cross, diamond, disk, hourglass, ring, square, triangle, x" in output
    splits = {s: images.read_split(workdir / "data/prepared" / f"{s}.parquet")
              for s in ("labeled", "unlabeled", "test")}
    assert {s: len(v.ids) for s, v in splits.items()} == {"labeled": 1200, "unlabeled": 500, "test": 1000}
    assert splits["labeled"].input_shape == [3, 32, 32]
    assert np.bincount(splits["test"].y).tolist() == [125] * 8
    assert np.bincount(splits["labeled"].y).tolist() == [150] * 8
    assert not (workdir / "data/prepared/unlabeled_truth.parquet").exists()
