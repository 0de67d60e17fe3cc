"""`kd prepare`, kd.sources and kd.prepared: the prepared files' schema, splits, reader API and errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_array_equal
from polars.testing import assert_frame_equal

from kd import prepared
from kd.cli import prepare
from kd.config import PrepareConfig
from kd.errors import ConfigError, InputError, MissingInputError
from kd.files import replacing
from kd.prepared import images
from kd.sources import images as image_sources
from kd.sources import splits
from tests.helpers import assert_clean_error, files_bytes

SPLIT_FILES = ("labeled.parquet", "unlabeled.parquet", "test.parquet")


def small_split(n: int = 23, shape: tuple[int, ...] = (1, 2, 3), seed: int = 0) -> images.Split:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    y[::5] = -1  # some null labels
    x = rng.standard_normal((n, int(np.prod(shape)))).astype(np.float32)
    return images.Split(rng.permutation(n * 3)[:n].astype(np.int64), x, y, list(shape), 4)


def user_file(path: Path, ids, x, y=None, metadata: dict | None = None, x_type=None) -> Path:
    columns = {"id": pa.array(ids, pa.int64()), "x": pa.array([list(r) for r in x], x_type or pa.list_(pa.float64()))}
    if y is not None:
        columns["y"] = pa.array(y)
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


def run_prepare(run_command, *args):
    result = run_command(prepare.main, *args)
    assert result.exit_code == 0, result.output
    return result


# --- writer / reader ---------------------------------------------------------------------------


@pytest.mark.unit
def test_write_read_round_trip(tmp_path):
    split = small_split()
    path = tmp_path / "s.parquet"
    images.write_split(path, split, dataset="toy", row_group_rows=7)

    back = images.read_split(path)
    assert_array_equal(back.ids, split.ids)
    assert_array_equal(back.x, split.x)
    assert_array_equal(back.y, split.y)
    assert (back.input_shape, back.num_classes) == ([1, 2, 3], 4)
    assert back.x.dtype == np.float32 and back.ids.dtype == np.int64 and back.y.dtype == np.int64
    assert back.x.flags.c_contiguous and not back.x.flags.writeable

    expected = pl.DataFrame({
        "id": split.ids,
        "x": split.x,
        "y": pl.Series(split.y).replace(-1, None),
    })
    assert_frame_equal(pl.read_parquet(path), expected)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4

    ranges = [images.read_rows(path, start, min(start + 5, 23)) for start in range(0, 23, 5)]  # across row groups
    assert_array_equal(np.concatenate([b.ids for b in ranges]), split.ids)
    assert_array_equal(np.concatenate([b.x for b in ranges]), split.x)
    assert_array_equal(np.concatenate([b.y for b in ranges]), split.y)

    assert images.split_info(path) == {"rows": 23, "input_shape": [1, 2, 3], "num_classes": 4, "dataset": "toy"}
    assert prepared.data_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(tmp_path.glob(".*"))  # no temporary file left


@pytest.mark.unit
def test_read_split_some_columns(tmp_path):
    path = tmp_path / "s.parquet"
    split = small_split()
    images.write_split(path, split, dataset="toy")
    only = images.read_split(path, columns=("id", "y"))
    assert_array_equal(only.ids, split.ids)
    assert_array_equal(only.y, split.y)
    assert only.x.shape == (0, 6)
    assert images.read_split(path, columns=("x",)).ids.shape == (0,)


@pytest.mark.unit
def test_read_errors(tmp_path):
    with pytest.raises(MissingInputError, match="nope.parquet"):
        images.read_split(tmp_path / "nope.parquet")
    with pytest.raises(MissingInputError, match="nope.parquet"):
        images.read_rows(tmp_path / "nope.parquet", 0, 10)
    with pytest.raises(MissingInputError, match="nope.parquet"):
        prepared.data_fingerprint(tmp_path / "nope.parquet")

    no_x = tmp_path / "no_x.parquet"
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()), "y": pa.array([0], pa.int64())}), no_x)
    with pytest.raises(InputError, match=r"no_x.parquet: no column 'x'"):
        images.read_split(no_x)
    with pytest.raises(InputError, match=r"no column 'x'"):
        images.read_rows(no_x, 0, 10)

    wrong = user_file(tmp_path / "wrong.parquet", [1], [[0.5, 1.0]], [0], {"input_shape": "[2]"})
    with pytest.raises(InputError, match=r"wrong.parquet: column 'x' has type list<.*expected fixed_size_list"):
        images.read_split(wrong)

    text = tmp_path / "text.parquet"
    text.write_text("not parquet")
    with pytest.raises(InputError, match="text.parquet: not a readable Parquet file"):
        images.read_split(text)


# --- splitting ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_allocation_is_proportional_and_fits():
    y = np.repeat(np.arange(3), [50, 30, 20])
    rows = splits._stratified(y, {"labeled": 10, "unlabeled": 70, "test": 20}, np.random.default_rng(0))
    assert {k: np.bincount(y[v], minlength=3).tolist() for k, v in rows.items()} == {
        "test": [10, 6, 4], "labeled": [5, 3, 2], "unlabeled": [35, 21, 14],
    }
    # every row used: a class running short is topped up from the others
    y = np.repeat(np.arange(3), [7, 2, 1])
    rows = splits._stratified(y, {"labeled": 3, "unlabeled": 4, "test": 3}, np.random.default_rng(1))
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(10))


@pytest.mark.unit
def test_test_split_does_not_depend_on_other_sizes():
    cfg = PrepareConfig(dataset="digits", labeled=100, unlabeled=200, test=150, seed=3)
    data_ = image_sources.load(cfg).data
    first, _ = splits.split(data_, cfg, "digits")
    cfg.unlabeled, cfg.labeled = 900, 300
    second, _ = splits.split(data_, cfg, "digits")
    assert_array_equal(first["test"].ids, second["test"].ids)


# --- the command: built-in datasets -----------------------------------------------------------


@pytest.mark.integration
def test_digits_end_to_end(workdir, write_params, run_command):
    write_params(prepare={"dataset": "digits", "labeled": 50, "unlabeled": 300, "test": 100, "seed": 1})
    result = run_prepare(run_command)
    out = workdir / "data" / "prepared"
    assert sorted(p.name for p in out.iterdir()) == sorted([*SPLIT_FILES, "unlabeled_truth.parquet"])
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [
        ["labeled", "50"], ["unlabeled", "300"], ["test", "100"],
    ]
    assert not [p for p in (workdir / "data").iterdir() if p.name != "prepared"]  # no temporary dirs

    splits = {}
    for name in SPLIT_FILES:
        schema = pq.read_schema(out / name)
        assert schema.names == ["id", "x", "y"]
        assert schema.field("id").type == pa.int64()
        assert schema.field("x").type == pa.list_(pa.float32(), 64)
        assert schema.field("y").type == pa.int64()
        assert schema.metadata[b"input_shape"] == b"[1,8,8]"
        assert schema.metadata[b"num_classes"] == b"10"
        assert schema.metadata[b"dataset"] == b"digits"
        splits[name] = images.read_split(out / name)

    labeled, unlabeled, test = (splits[n] for n in SPLIT_FILES)
    assert (len(labeled), len(unlabeled), len(test)) == (50, 300, 100)
    assert (unlabeled.y == -1).all() and (labeled.y >= 0).all() and (test.y >= 0).all()
    assert pq.read_table(out / "unlabeled.parquet").column("y").null_count == 300
    all_ids = np.concatenate([s.ids for s in splits.values()])
    assert len(np.unique(all_ids)) == len(all_ids) == 450
    assert 0.0 <= labeled.x.min() and labeled.x.max() <= 1.0
    assert not (np.diff(test.ids) > 0).all()  # shuffled, not in dataset order

    truth = pq.read_table(out / "unlabeled_truth.parquet")
    assert truth.schema.names == ["id", "y"] and truth.schema.types == [pa.int64(), pa.int64()]
    assert_array_equal(truth.column("id").to_numpy(), unlabeled.ids)
    # the rows and labels are the dataset's own: id = row index of sklearn's digits
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert_array_equal(test.y, digits.target[test.ids])
    assert_array_equal(truth.column("y").to_numpy(), digits.target[unlabeled.ids])
    assert_array_equal(test.x, (digits.data[test.ids] / 16).astype(np.float32))

    # stratified: each split holds each class in proportion to the whole dataset, within 1
    share = np.bincount(digits.target) / len(digits.target)
    for name, labels in (("labeled", labeled.y), ("unlabeled", truth.column("y").to_numpy()), ("test", test.y)):
        counts = np.bincount(labels, minlength=10)
        assert np.abs(counts - share * len(labels)).max() < 1, (name, counts)


@pytest.mark.integration
def test_seed_determinism(workdir, write_params, run_command):
    write_params(prepare={"dataset": "digits", "labeled": 30, "unlabeled": 60, "test": 30})
    run_prepare(run_command, "--out", "a", "--seed", 7)
    run_prepare(run_command, "--out", "b", "--seed", 7)
    run_prepare(run_command, "--out", "c", "--seed", 8)
    assert files_bytes(workdir / "a") == files_bytes(workdir / "b")
    for name in SPLIT_FILES:
        a, c = images.read_split(workdir / "a" / name), images.read_split(workdir / "c" / name)
        assert set(a.ids.tolist()) != set(c.ids.tolist())


@pytest.mark.integration
def test_params_defaults_and_overrides(workdir, write_params, run_command):
    sizes = {"labeled": 20, "unlabeled": 20, "test": 20}
    params = write_params(workdir / "other.yaml", prepare={"dataset": "digits", **sizes})
    run_prepare(run_command, "--params", params, "--labeled", 40)
    out = workdir / "data" / "prepared"
    assert [images.split_info(out / n)["rows"] for n in SPLIT_FILES] == [40, 20, 20]


@pytest.mark.integration
def test_mnist5k_default_sizes(workdir, write_params, run_command):
    write_params(prepare={})
    run_prepare(run_command)
    out = workdir / "data" / "prepared"
    truth = pq.read_table(out / "unlabeled_truth.parquet").column("y").to_numpy()
    for name, size in (("labeled", 1000), ("unlabeled", 3000), ("test", 1000)):
        split = images.read_split(out / f"{name}.parquet")
        assert split.x.shape == (size, 784) and split.input_shape == [1, 28, 28]
        assert images.split_info(out / f"{name}.parquet")["dataset"] == "mnist5k"
        labels = truth if name == "unlabeled" else split.y
        counts = np.bincount(labels, minlength=10)
        assert counts.max() - counts.min() <= 1 and abs(counts.mean() - size / 10) < 1, (name, counts)
        assert split.x.min() == 0.0 and split.x.max() == 1.0


@pytest.mark.integration
def test_mnist1d(workdir, write_params, run_command):
    write_params(prepare={"dataset": "mnist1d"})
    run_prepare(run_command, "--samples", 205, "--labeled", 40, "--unlabeled", 100, "--test", 60)
    out = workdir / "data" / "prepared"
    split = images.read_split(out / "labeled.parquet")
    assert split.x.shape == (40, 40) and split.input_shape == [40]
    assert np.isfinite(split.x).all() and split.x.std() > 0.1
    assert np.bincount(split.y, minlength=10).tolist() == [4] * 10
    assert (out / "unlabeled_truth.parquet").is_file()
    ids = np.concatenate([images.read_split(out / n).ids for n in SPLIT_FILES])
    assert len(np.unique(ids)) == 200 and ids.max() < 205


@pytest.mark.integration
def test_existing_output_is_replaced_whole(workdir, write_params, run_command):
    write_params(prepare={"dataset": "digits", "labeled": 10, "unlabeled": 10, "test": 10})
    out = workdir / "data" / "prepared"
    run_prepare(run_command)
    (out / "stray.txt").write_text("from an older run")
    before = files_bytes(out)
    # a failing run leaves the previous output as it was
    assert run_command(prepare.main, "--labeled", 100000).exit_code == 1
    assert files_bytes(out) == before
    run_prepare(run_command, "--seed", 1)
    assert not (out / "stray.txt").exists()
    assert sorted(p.name for p in (workdir / "data").iterdir()) == ["prepared"]



@pytest.mark.unit
def test_replacing_builds_aside_and_swaps_in_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".out.tmp-{dead.pid}-0000abcd"  # a killed run's leftover
    running = tmp_path / f".out.tmp-{os.getpid()}-0000abcd"  # another writer still at work
    abandoned.mkdir()
    running.mkdir()
    with pytest.raises(RuntimeError, match="half-way"):
        with replacing(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("half-way")
    assert files_bytes(out) == {"old.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "out"]
    with replacing(out) as tmp:
        assert tmp.parent == tmp_path and not (tmp / "old.txt").exists()
        (tmp / "new.txt").write_text("new")
        assert files_bytes(out) == {"old.txt": b"old"}  # untouched until the block completes
    assert files_bytes(out) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "out"]
    with replacing(tmp_path / "fresh" / "dir") as tmp:
        (tmp / "a").write_text("a")
    assert files_bytes(tmp_path / "fresh" / "dir") == {"a": b"a"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file exists and is not a directory"):
        with replacing(tmp_path / "file"):
            pass

# --- the command: user Parquet files ----------------------------------------------------------


@pytest.mark.integration
def test_user_file_with_metadata_and_null_labels(workdir, write_params, run_command):
    rng = np.random.default_rng(0)
    n = 60
    ids = 1000 + 3 * np.arange(n)
    x = rng.standard_normal((n, 6))
    y = np.tile([0, 1, 2], n // 3).astype(object)
    y[40:] = None  # 20 unlabeled rows, no truth
    path = user_file(workdir / "mine.parquet", ids, x, y.tolist(), {"input_shape": "[2,3]"})
    write_params(prepare={"dataset": "mine.parquet", "labeled": 25, "unlabeled": 15, "test": 15})
    run_prepare(run_command)
    out = workdir / "data" / "prepared"
    assert not (out / "unlabeled_truth.parquet").exists()

    by_id = dict(zip(ids.tolist(), range(n)))
    splits = {name: images.read_split(out / name) for name in SPLIT_FILES}
    for name, split in splits.items():
        assert split.input_shape == [2, 3] and split.num_classes == 3
        assert images.split_info(out / name)["dataset"] == "mine.parquet"
        rows = [by_id[i] for i in split.ids.tolist()]
        assert_array_equal(split.x, x[rows].astype(np.float32))
    assert all(by_id[i] >= 40 for i in splits["unlabeled.parquet"].ids.tolist())  # the null-y rows
    assert all(by_id[i] < 40 for n_ in ("labeled.parquet", "test.parquet") for i in splits[n_].ids.tolist())
    assert (splits["unlabeled.parquet"].y == -1).all()
    assert np.bincount(splits["test.parquet"].y).tolist() == [5, 5, 5]
    assert path.is_file()


@pytest.mark.integration
def test_user_file_without_metadata(workdir, write_params, run_command):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, (30, 4))
    user_file(workdir / "flat.parquet", np.arange(30), x, np.arange(30) % 2, x_type=pa.list_(pa.int64(), 4))
    write_params(prepare={"dataset": "flat.parquet", "labeled": 10, "unlabeled": 10, "test": 10})
    assert_clean_error(run_command(prepare.main), "flat.parquet", "--input-shape")
    run_prepare(run_command, "--input-shape", "2,2")
    out = workdir / "data" / "prepared"
    labeled = images.read_split(out / "labeled.parquet")
    assert labeled.input_shape == [2, 2] and labeled.num_classes == 2
    assert_array_equal(labeled.x, x[labeled.ids].astype(np.float32))
    assert (out / "unlabeled_truth.parquet").is_file()  # every row labeled: the truth is known


# --- the command: errors ----------------------------------------------------------------------


def _ragged(d: Path) -> list:
    user_file(d / "in.parquet", [1, 2, 3], [[0.0, 1.0], [0.0], [1.0, 2.0]], [0, 1, 0])
    return ["--dataset", "in.parquet", "--input-shape", "2"]


def _file(x=None, y=None, ids=None, unlabeled=1):
    """A 4-row user file (x of length 2) with the given column overrides; asks for 1/unlabeled/1."""

    def make(d: Path) -> list:
        xs = x if x is not None else [[0.0, 1.0]] * 4
        user_file(d / "in.parquet", ids if ids is not None else list(range(len(xs))), xs,
                  y if y is not None else [0, 1] * (len(xs) // 2))
        return ["--dataset", "in.parquet", "--input-shape", "2", "--labeled", 1, "--unlabeled", unlabeled, "--test", 1]

    return make


def _no_x(d: Path) -> list:
    pq.write_table(pa.table({"id": [1, 2], "y": [0, 1]}), d / "in.parquet")
    return ["--dataset", "in.parquet"]


def _empty(d: Path) -> list:
    user_file(d / "in.parquet", [], [], [], {"input_shape": "[2]"}, x_type=pa.list_(pa.float32()))
    return ["--dataset", "in.parquet"]


def _not_parquet(d: Path) -> list:
    (d / "in.parquet").write_text("id,x\n1,2\n")
    return ["--dataset", "in.parquet"]


def _bad_params(d: Path) -> list:
    (d / "params.yaml").write_text("prepare:\n  labelled: 10\n")
    return []


ERRORS = {
    "unknown dataset": (lambda d: ["--dataset", "mnist9k"], ["'mnist9k'", "mnist5k, digits, mnist1d"]),
    "missing file": (lambda d: ["--dataset", "nope.parquet"], ["nope.parquet", "not found"]),
    "not parquet": (_not_parquet, ["in.parquet", "not a readable Parquet file"]),
    "no x": (_no_x, ["in.parquet", "no column 'x'"]),
    "shape mismatch": (lambda d: ["--dataset", "digits", "--input-shape", "1,28,28"], ["[1, 28, 28]", "784", "64"]),
    "bad shape text": (lambda d: ["--input-shape", "1,a"], ["--input-shape", "'1,a'"]),
    "ragged x": (_ragged, ["in.parquet", "same length", "ids 2"]),
    "empty": (_empty, ["in.parquet", "no rows"]),
    "null in x": (_file(x=[[0.0, 1.0], [None, 0.0], [0.0, 1.0], [1.0, 1.0]]), ["'x'", "null", "ids 1"]),
    "nan": (_file(x=[[0.0, 1.0], [np.nan, 0.0], [0.0, np.inf], [1.0, 1.0]]), ["NaN or Inf", "ids 1, 2"]),
    "negative label": (_file(y=[0, -3, 1, 0]), ["'y'", ">= 0", "ids 1"]),
    "fractional label": (_file(y=[0.0, 1.5, 1.0, 0.0]), ["'y'", "integers", "ids 1"]),
    "string label": (_file(y=["a", "b", "a", "b"]), ["'y'", "integer class labels", "string"]),
    "duplicate ids": (_file(ids=[5, 6, 5, 7]), ["'id'", "unique", "ids 5"]),
    "too few samples": (lambda d: ["--dataset", "digits", "--labeled", 1500], ["1797 samples", "labeled 1500", "5500"]),
    "too few unlabeled": (_file(y=[0, 1, 0, None], unlabeled=2), ["1 rows with null y", "unlabeled 2"]),
    "negative size": (lambda d: ["--dataset", "digits", "--test", -1], ["prepare.test", "-1", ">= 0"]),
    "unknown params key": (_bad_params, ["prepare.labelled", "unknown key"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", ERRORS)
def test_errors(case, workdir, write_params, run_command):
    write_params(prepare={"dataset": "digits"})
    make, needles = ERRORS[case]
    assert_clean_error(run_command(prepare.main, *make(workdir)), *needles)
    assert not (workdir / "data").exists()


@pytest.mark.unit
def test_config_errors_from_the_library():
    with pytest.raises(ConfigError, match="prepare.labeled: -5"):
        image_sources.load(PrepareConfig(dataset="digits", labeled=-5))
    with pytest.raises(ConfigError, match="prepare.samples: 0"):
        image_sources.load(PrepareConfig(dataset="mnist1d", samples=0))
    assert image_sources.parse_shape("[1, 28, 28]") == image_sources.parse_shape("1x28x28") == [1, 28, 28]
    assert json.loads("[1,28,28]") == image_sources.parse_shape("1,28,28")
