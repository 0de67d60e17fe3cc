"""`kd prepare` on your own images: image folders, encoded-image Parquet files (as Hugging Face
`datasets` writes them), preset splits, resizing, and the compact uint8 storage that readers
turn back into float32."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image

from kd.cli import prepare
from kd.config import PrepareConfig
from kd.errors import InputError
from kd.prepared import images, metadata
from kd.sources import images as image_sources
from tests.helpers import invoke, ok


def gray(value: int, size=(6, 5)) -> Image.Image:
    """A constant grayscale image (width x height = size): its value identifies it after prepare."""
    return Image.fromarray(np.full(size[::-1], value, np.uint8), mode="L")


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def raw_pixels(path: Path) -> np.ndarray:
    """(N, D) uint8 as stored, without the reader's normalisation."""
    column = pq.read_table(path, columns=["x"]).column("x").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def preset_folder(root: Path) -> dict[str, set[int]]:
    """train/{a,b}/ 8 each, test/{a,b}/ 3 each, unlabeled/ 4 flat: the pixel values of each split."""
    values = {"train": set(), "test": set(), "unlabeled": set()}
    value = 0
    for split, per_class in (("train", 8), ("test", 3)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                value += 1
                gray(value).save(root / split / name / f"{i}.png")
                values[split].add(value)
    (root / "unlabeled").mkdir()
    for i in range(4):
        value += 1
        gray(value).save(root / "unlabeled" / f"u{i}.png")
        values["unlabeled"].add(value)
    return values


def run_prepare(workdir: Path, write_params, **section) -> Path:
    params = write_params(prepare=section)
    ok(invoke(prepare.main, "--params", params))
    return workdir / "data" / "prepared"


# --- the compact format ------------------------------------------------------------------------


@pytest.mark.unit
def test_uint8_split_round_trip_reads_float32_normalised(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (11, 3 * 4 * 5), dtype=np.uint8)
    norm = images.Norm([0.5, 0.25, 0.125], [0.5, 0.2, 0.1])
    split = images.Split(np.arange(11, dtype=np.int64) * 7, pixels, rng.integers(0, 3, 11), [3, 4, 5], 3, norm)
    path = tmp_path / "s.parquet"
    images.write_split(path, split, dataset="toy", classes=["x", "y", "z"], row_group_rows=4)

    assert pq.read_schema(path).field("x").type == pa.list_(pa.uint8(), 60)
    meta = metadata(pq.read_schema(path))
    assert (json.loads(meta["mean"]), json.loads(meta["std"]), json.loads(meta["classes"])) == (
        norm.mean, norm.std, ["x", "y", "z"])
    assert_array_equal(raw_pixels(path), pixels)

    expected = ((pixels.reshape(11, 3, 20) / 255.0 - np.array(norm.mean)[:, None])
                / np.array(norm.std)[:, None]).reshape(11, 60)
    back = images.read_split(path)
    assert back.x.dtype == np.float32 and not back.x.flags.writeable
    assert_allclose(back.x, expected, rtol=1e-6, atol=1e-6)
    assert_array_equal(back.ids, split.ids)
    rows = images.read_rows(path, 3, 9)  # across row groups
    assert_array_equal(rows.x, back.x[3:9])
    assert images.split_info(path)["input_shape"] == [3, 4, 5]


@pytest.mark.unit
def test_uint8_split_without_its_normalisation_is_refused(tmp_path):
    split = images.Split(np.arange(2), np.zeros((2, 4), np.uint8), np.zeros(2, np.int64), [1, 2, 2], 1,
                       images.Norm([0.5], [0.5]))
    path = tmp_path / "s.parquet"
    images.write_split(path, split, dataset="toy")
    table = pq.read_table(path)
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"std"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(InputError, match="uint8 x needs metadata std as a JSON list of 1 numbers > 0"):
        images.read_split(path)
    assert len(images.read_split(path, columns=("id", "y")).ids) == 2  # x not asked for: no need for it


@pytest.mark.unit
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_split_round_trip_reads_the_same_floats_as_uint8(tmp_path, channels):
    """store png: one lossless PNG file per row in an `image` column; every reader returns the
    float32 inputs the uint8 form gives, bit for bit, whole or by rows across row groups."""
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, (11, channels * 4 * 5), dtype=np.uint8)
    norm = images.Norm([0.5] * channels, [0.25] * channels)
    split = images.Split(np.arange(11, dtype=np.int64) * 7, pixels, rng.integers(0, 3, 11), [channels, 4, 5], 3, norm)
    images.write_split(tmp_path / "u8.parquet", split, dataset="toy", row_group_rows=4)
    images.write_split(tmp_path / "png.parquet", split, dataset="toy", row_group_rows=4, store="png")

    schema = pq.read_schema(tmp_path / "png.parquet")
    assert schema.names == ["id", "image", "y"] and schema.field("image").type == pa.binary()
    blob = pq.read_table(tmp_path / "png.parquet").column("image")[0].as_py()
    assert blob.startswith(b"\x89PNG")  # a PNG file any image library opens
    png, u8 = images.read_split(tmp_path / "png.parquet"), images.read_split(tmp_path / "u8.parquet")
    assert_array_equal(png.x, u8.x)
    assert png.x.dtype == np.float32 and not png.x.flags.writeable
    assert_array_equal(png.ids, u8.ids) and assert_array_equal(png.y, u8.y)
    assert_array_equal(images.read_rows(tmp_path / "png.parquet", 3, 9).x, u8.x[3:9])
    assert images.split_info(tmp_path / "png.parquet")["input_shape"] == [channels, 4, 5]
    assert len(images.read_split(tmp_path / "png.parquet", columns=("id", "y")).ids) == 11


@pytest.mark.unit
def test_png_split_with_a_wrong_image_is_refused_naming_the_row(tmp_path):
    split = images.Split(np.arange(3), np.zeros((3, 3 * 4 * 5), np.uint8), np.zeros(3, np.int64), [3, 4, 5], 1,
                       images.Norm([0.5] * 3, [0.5] * 3))
    path = tmp_path / "s.parquet"
    images.write_split(path, split, dataset="toy", store="png")
    table = pq.read_table(path)
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4)).save(buffer, format="PNG")  # 6 wide, not 5
    pictures = table.column("image").to_pylist()
    pictures[2] = buffer.getvalue()
    pq.write_table(table.set_column(1, "image", pa.array(pictures, pa.binary())), path)
    with pytest.raises(InputError, match=r"row 2 of column 'image' is a PNG RGB 6x4 image; .* needs a PNG RGB 5x4"):
        images.read_split(path)
    pictures[2] = b"not an image"
    pq.write_table(table.set_column(1, "image", pa.array(pictures, pa.binary())), path)
    with pytest.raises(InputError, match="row 2 of column 'image' is not a readable image"):
        images.read_rows(path, 1, 3)


@pytest.mark.integration
@pytest.mark.parametrize("dataset, store, message", [
    ("digits", "png", "prepare.store: 'png' stores 8-bit pixels; 'digits' has float inputs (store: pixels)"),
    ("digits", "jpeg", "prepare.store: 'jpeg' must be one of pixels, png"),
])
def test_store_errors_are_one_line(workdir, write_params, dataset, store, message):
    params = write_params(prepare={"dataset": dataset, "labeled": 10, "unlabeled": 10, "test": 10, "store": store})
    result = invoke(prepare.main, "--params", params, expect=1)
    assert result.stderr.strip() == f"error: {message}" and not (workdir / "data").exists()


# --- image folders -----------------------------------------------------------------------------


@pytest.mark.integration
def test_image_folder_with_preset_splits_keeps_them(workdir, write_params):
    values = preset_folder(workdir / "imgs")
    out = run_prepare(workdir, write_params, dataset="imgs", labeled=10, unlabeled=None, test=None)

    seen = {name: raw_pixels(out / f"{name}.parquet")[:, 0] for name in ("labeled", "unlabeled", "test")}
    assert set(seen["test"].tolist()) == values["test"] and len(seen["test"]) == 6  # the test folder, all of it
    assert set(seen["unlabeled"].tolist()) == values["unlabeled"]  # flat unlabeled/
    assert set(seen["labeled"].tolist()) <= values["train"] and len(seen["labeled"]) == 10
    assert not (out / "unlabeled_truth.parquet").exists()  # unlabeled/ has no labels
    test = images.read_split(out / "test.parquet")
    meta = metadata(pq.read_schema(out / "test.parquet"))
    assert json.loads(meta["classes"]) == ["a", "b"] and test.num_classes == 2
    assert test.input_shape == [1, 5, 6]  # channels, height, width
    assert images.read_split(out / "unlabeled.parquet").y.tolist() == [-1] * 4
    # a class's pixel values come from its folder: test/a holds values 17..19, test/b 20..22
    assert sorted(zip(seen["test"].tolist(), test.y.tolist())) == [(v, 0 if v < 20 else 1) for v in range(17, 23)]
    # the normalisation is the labeled split's statistics of pixel / 255
    labeled = raw_pixels(out / "labeled.parquet") / 255.0
    assert_allclose(json.loads(meta["mean"]), [labeled.mean()], atol=1e-6)
    assert_allclose(json.loads(meta["std"]), [labeled.std()], atol=1e-6)


@pytest.mark.integration
def test_preset_train_serves_the_unnamed_splits_and_sizes_count_within_each(workdir, write_params):
    values = preset_folder(workdir / "imgs")
    for path in (workdir / "imgs" / "unlabeled").iterdir():
        path.unlink()
    (workdir / "imgs" / "unlabeled").rmdir()
    out = run_prepare(workdir, write_params, dataset="imgs", labeled=6, unlabeled=4, test=2)
    seen = {name: set(raw_pixels(out / f"{name}.parquet")[:, 0].tolist()) for name in ("labeled", "unlabeled", "test")}
    assert seen["test"] <= values["test"] and len(seen["test"]) == 2
    assert seen["labeled"] | seen["unlabeled"] <= values["train"] and not seen["labeled"] & seen["unlabeled"]
    assert (out / "unlabeled_truth.parquet").exists()  # drawn from labeled train images: truth known

    params = write_params(prepare={"dataset": "imgs", "labeled": 6, "unlabeled": None, "test": 2})
    result = invoke(prepare.main, "--params", params, expect=1)
    assert "prepare.unlabeled: null (all rows) needs its own split" in result.stderr
    ok(invoke(prepare.main, "--params", params, "--unlabeled", 3, "--test", 6))  # the whole test folder
    result = invoke(prepare.main, "--params", params, "--unlabeled", 3, "--test", 7, expect=1)
    assert "imgs: its test split has 6 samples; asked for test 7 (lower prepare.test)" in result.stderr


@pytest.mark.integration
def test_class_folder_rgb_and_resize(workdir, write_params):
    rng = np.random.default_rng(1)
    for name, count in (("zebra", 9), ("ant", 6)):
        (workdir / "imgs" / name).mkdir(parents=True)
        for i in range(count):
            size = (7 + i, 9)  # sizes differ: image_size is needed
            if name == "ant" and i == 0:
                gray(3, size).save(workdir / "imgs" / name / f"{i}.png")  # grayscale among RGB: made RGB
            elif name == "ant" and i == 1:
                gray(3, size).convert("RGB").save(workdir / "imgs" / name / f"{i}.webp", lossless=True)
            else:
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                    workdir / "imgs" / name / f"{i}.jpg", quality=95)
    params = write_params(prepare={"dataset": "imgs", "labeled": 8, "unlabeled": 4, "test": 3})
    result = invoke(prepare.main, "--params", params, expect=1)
    assert "differs from" in result.stderr and "set prepare.image_size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    ok(invoke(prepare.main, "--params", params, "--image-size", "4,3"))
    out = workdir / "data" / "prepared"
    split = images.read_split(out / "labeled.parquet")
    assert split.input_shape == [3, 4, 3] and split.num_classes == 2
    assert json.loads(metadata(pq.read_schema(out / "labeled.parquet"))["classes"]) == ["ant", "zebra"]
    assert sorted(np.bincount(split.y).tolist()) == [3, 5]  # stratified: 6 ants, 9 zebras
    # the mean/std the reader applies: prepare.mean/std when given
    ok(invoke(prepare.main, "--params", params, "--image-size", "4", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.5,1"))
    meta = metadata(pq.read_schema(out / "test.parquet"))
    assert (json.loads(meta["mean"]), json.loads(meta["std"]), json.loads(meta["input_shape"])) == (
        [0.5] * 3, [0.25, 0.5, 1.0], [3, 4, 4])
    result = invoke(prepare.main, "--params", params, "--image-size", "4", "--mean", "0.5", "--std", "0.5", expect=1)
    assert "prepare.mean: [0.5] has 1 values; the images have 3 channel(s)" in result.stderr


@pytest.mark.integration
def test_folder_errors_are_one_line(workdir, write_params):
    (workdir / "imgs" / "a").mkdir(parents=True)
    gray(1).save(workdir / "imgs" / "a" / "0.png")
    (workdir / "imgs" / "a" / "notes.txt").write_text("hi")
    params = write_params(prepare={"dataset": "imgs", "labeled": 1, "unlabeled": 0, "test": 0})
    result = invoke(prepare.main, "--params", params, expect=1)
    assert "notes.txt: not an image in class folders" in result.stderr
    (workdir / "imgs" / "a" / "notes.txt").unlink()
    (workdir / "imgs" / "a" / "1.png").write_bytes(b"not a png")
    result = invoke(prepare.main, "--params", params, expect=1)
    assert "1.png: not a readable image" in result.stderr and "Traceback" not in result.output
    result = invoke(prepare.main, "--params", params, "--dataset", "digits", "--image-size", "8", expect=1)
    assert "prepare.image_size: [8] resizes encoded images" in result.stderr
    assert not (workdir / "data").exists()


# --- Parquet files of encoded images -----------------------------------------------------------


def hf_parquet(path: Path, rows: int = 30, split: bool = True) -> None:
    """What `datasets.Dataset.to_parquet` writes for an Image + ClassLabel dataset."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": png_bytes(gray(i, (4, 4)), "PNG" if i % 2 else "JPEG"), "path": f"{i}.png"}
                           for i in range(rows)], image),
        "label": pa.array([i % 3 for i in range(rows)], pa.int64()),
        **({"split": pa.array(["test" if i < 9 else "train" for i in range(rows)])} if split else {}),
    })
    features = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog", "emu"], "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path)


@pytest.mark.integration
def test_hugging_face_parquet_with_a_split_column(workdir, write_params):
    hf_parquet(workdir / "hf.parquet")
    out = run_prepare(workdir, write_params, dataset="hf.parquet", labeled=12, unlabeled=6, test=None)
    test = images.read_split(out / "test.parquet")
    assert sorted(test.ids.tolist()) == list(range(9))  # exactly the rows named test
    assert_array_equal(test.y, test.ids % 3)
    assert test.input_shape == [1, 4, 4]
    assert json.loads(metadata(pq.read_schema(out / "test.parquet"))["classes"]) == ["cat", "dog", "emu"]
    labeled = images.read_split(out / "labeled.parquet")
    unlabeled_ids = images.read_split(out / "unlabeled.parquet").ids
    assert set(labeled.ids.tolist()) | set(unlabeled_ids.tolist()) <= set(range(9, 30))
    truth = pq.read_table(out / "unlabeled_truth.parquet").to_pydict()
    assert truth["y"] == [i % 3 for i in truth["id"]]


@pytest.mark.unit
def test_encoded_parquet_with_named_labels_and_bare_bytes(tmp_path):
    names = ["tulip", "rose", None, "rose", "tulip", "rose", None, "tulip"]
    table = pa.table({"id": pa.array(range(100, 108), pa.int64()),
                      "image": pa.array([png_bytes(gray(i, (3, 2))) for i in range(8)], pa.binary()),
                      "label": pa.array(names)})
    pq.write_table(table, tmp_path / "named.parquet")
    source = image_sources.load(PrepareConfig(dataset=str(tmp_path / "named.parquet")))
    assert source.classes == ["rose", "tulip"] and source.preset is None
    assert source.data.y.tolist() == [1, 0, -1, 0, 1, 0, -1, 1]
    assert source.data.ids.tolist() == list(range(100, 108)) and source.data.input_shape == [1, 2, 3]
    assert_array_equal(source.data.x[:, 0], np.arange(8))


@pytest.mark.integration
@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop_columns(["label"]), "no column 'label' beside 'image'"),
    (lambda t: t.set_column(2, "split", pa.array(["train"] * 29 + ["validation"])),
     "column 'split' holds ['validation']; expected train, test, unlabeled"),
    (lambda t: t.set_column(0, "image", pa.array([{"bytes": None, "path": "x.png"}] * 30,
                                                 pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
     "row 0 (id 0) names image"),
    (lambda t: t.set_column(0, "image", pa.array([{"bytes": None, "path": None}] * 30,
                                                 pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
     "column 'image' has neither bytes nor a path in 30 rows"),
    (lambda t: t.set_column(1, "label", pa.array([-2] + [0] * 29, pa.int64())),
     "or -1 or null for unlabeled; ids 0 have other negative labels"),
    (lambda t: t.set_column(1, "label", pa.array([None] * 30, pa.int64())),
     "of the test split have no label"),
])
def test_encoded_parquet_errors(workdir, write_params, change, message):
    hf_parquet(workdir / "hf.parquet")
    pq.write_table(change(pq.read_table(workdir / "hf.parquet")), workdir / "hf.parquet")
    params = write_params(prepare={"dataset": "hf.parquet", "labeled": 5, "unlabeled": 5, "test": None})
    result = invoke(prepare.main, "--params", params, expect=1)
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (workdir / "data").exists()


@pytest.mark.integration
def test_parquet_written_by_hugging_face_datasets_prepares_and_trains(workdir, write_params, monkeypatch):
    """Both routes `datasets` 5 writes image paths, not bytes, by: `Image()` cast from paths (paths
    relative to where it ran) and `load_dataset("imagefolder")` (absolute paths); -1 labels are
    unlabeled rows. Each prepared file then trains a teacher and a student through the CLI."""
    import datasets

    from kd.cli import distill, label, teacher
    for c, name in enumerate(("cat", "dog")):
        (workdir / "datasets" / "pics" / name).mkdir(parents=True)
        for i in range(12):
            gray(10 * c + i, (4, 4)).save(workdir / "datasets" / "pics" / name / f"{i}.png")
    files = sorted((workdir / "datasets" / "pics").rglob("*.png"))
    labels = [-1 if i % 4 == 0 else int(f.parent.name == "dog") for i, f in enumerate(files)]
    monkeypatch.chdir(workdir / "datasets")  # `datasets` takes relative paths from the working directory
    cast = datasets.Dataset.from_dict({"image": [str(f.relative_to(workdir / "datasets")) for f in files],
                                       "label": labels}).cast_column("image", datasets.Image())
    cast.to_parquet(str(workdir / "datasets" / "cast.parquet"))
    folder = datasets.load_dataset("imagefolder", data_dir=str(workdir / "datasets" / "pics"), split="train")
    folder.to_parquet(str(workdir / "datasets" / "folder.parquet"))
    for name in ("cast", "folder"):
        assert pq.read_table(workdir / "datasets" / f"{name}.parquet").column("image")[0]["bytes"].as_py() is None
        monkeypatch.chdir(workdir)
        out = run_prepare(workdir, write_params, dataset=f"datasets/{name}.parquet", labeled=8, unlabeled=6, test=4)
        splits = {s: images.read_split(out / f"{s}.parquet") for s in ("labeled", "unlabeled", "test")}
        assert [len(s.ids) for s in splits.values()] == [8, 6, 4] and splits["labeled"].input_shape == [1, 4, 4]
        if name == "cast":  # the six -1 rows are the unlabeled split, without truth
            assert len(splits["unlabeled"].ids) == 6 and not (out / "unlabeled_truth.parquet").exists()
            for split in ("labeled", "test"):
                assert splits[split].y.tolist() == [labels[i] for i in splits[split].ids], split
        params = write_params(
            prepare={"dataset": f"datasets/{name}.parquet", "labeled": 8, "unlabeled": 6, "test": 4},
            teacher={"arch": "cnn", "arch_kwargs": {"widths": [4], "hidden": 8}, "epochs": 1, "batch_size": 4},
            label={"top_k": 2, "temperatures": [1, 4]},
            students={"s": {"arch": "mlp", "arch_kwargs": {"hidden": [8]}, "epochs": 1, "batch_size": 4,
                            "loss": {"soft": {"weight": 0.9, "temperature": 4}, "hard": {"weight": 0.1}}}})
        for command in (teacher.main, label.main):
            ok(invoke(command, "--params", params, "--no-progress"))
        ok(invoke(distill.main, "s", "--params", params, "--no-progress"))
        assert (workdir / "data" / "students" / "s" / "model.safetensors").is_file()


@pytest.mark.integration
def test_prepared_bytes_per_image_against_png(workdir, write_params):
    """64x64 RGB crops of scikit-learn's two sample photos (real JPEG photos shipped in its wheel):
    prepared uint8 vs the PNG files, the figure in docs/images.md."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photos
    (workdir / "photos" / "china").mkdir(parents=True)
    (workdir / "photos" / "flower").mkdir(parents=True)
    for photo, name in zip(photos, ("china", "flower")):
        for i, (top, left) in enumerate((t, x) for t in range(0, 384, 64) for x in range(0, 576, 64)):
            Image.fromarray(photo[top:top + 64, left:left + 64]).save(workdir / "photos" / name / f"{i}.png")
    png = sum(p.stat().st_size for p in (workdir / "photos").rglob("*.png"))
    out = run_prepare(workdir, write_params, dataset="photos", labeled=60, unlabeled=30, test=18)
    prepared = sum((out / f"{name}.parquet").stat().st_size for name in ("labeled", "unlabeled", "test"))
    ratio = prepared / png
    print(f"\n108 64x64 RGB photo crops: PNG {png / 108:,.0f} B/image, prepared {prepared / 108:,.0f} B/image "
          f"({ratio:.2f}x), float32 x would be {4 * 64 * 64 * 3:,} B/image")
    assert prepared / 108 < 64 * 64 * 3  # at most the raw uint8 pixels (float32 x: 4x that)
    assert ratio < 1.5  # 1.43x here (zstd; snappy: 1.69x): PNG's per-row prediction is what Parquet lacks
    inputs = {name: images.read_split(out / f"{name}.parquet").x for name in ("labeled", "unlabeled", "test")}
    as_png = run_prepare(workdir, write_params, dataset="photos", labeled=60, unlabeled=30, test=18, store="png")
    png_ratio = sum((as_png / f"{name}.parquet").stat().st_size for name in ("labeled", "unlabeled", "test")) / png
    print(f"prepared with store png: {png_ratio:.2f}x the PNG files")
    assert png_ratio <= 1.2  # the bound; 1.00x here
    for name in ("labeled", "unlabeled", "test"):  # the same inputs, whichever form is on disk
        assert_array_equal(images.read_split(as_png / f"{name}.parquet").x, inputs[name])
