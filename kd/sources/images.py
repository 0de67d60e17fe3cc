"""Image datasets: a built-in one (`shapes`: rendered as an image folder), a user Parquet file or encoded images, checked, split, written.

`prepare(cfg, out)` loads `cfg.dataset` (a built-in of kind images or image_folder in
`builtin.SOURCES`, a Parquet file with `x`, or
encoded images: an image folder or a Parquet file with an `image` column, `sources.encoded`),
checks it, splits it into labeled / unlabeled / test (stratified by class, seeded; a split
the source names is kept: its test rows are the test split) and writes

    out/labeled.parquet, out/unlabeled.parquet, out/test.parquet
    out/unlabeled_truth.parquet          (only when the unlabeled rows' labels are known)

in the format of `kd.prepared.images` (encoded images as uint8 pixels with the labeled
split's per-channel mean and std, or `prepare.mean`/`prepare.std`). Rows are in a seeded
shuffled order. Everything is written into a directory beside `out` that replaces `out` only
once complete (`files.replacing`).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd.config import SPLITS, PrepareConfig
from kd.errors import ConfigError, InputError
from kd.files import replacing
from kd.prepared import images as image_files
from kd.prepared import metadata, open_parquet
from kd.prepared.images import Norm, Split, check_shape, parse_meta_shape
from kd.sources import encoded
from kd.sources.builtin import SOURCES, kind_of

# The order in which splits are drawn from each class: the test set does not change when the
# labeled or unlabeled sizes do, and the labeled set does not change with the unlabeled size.
# Text documents are dealt in the same order (`sources.text.deal`).
DRAW_ORDER = ("test", "labeled", "unlabeled")
MAX_NAMED = 5  # how many offending ids an error message lists


class Source(NamedTuple):
    """A loaded dataset: its rows, the split each row's source names (or None), class names."""

    data: Split
    preset: np.ndarray | None  # (N,) str in encoded.PRESETS
    classes: list[str] | None


@dataclass
class Prepared:
    """What `prepare` wrote: the splits as on disk (unlabeled y = -1) and the unlabeled truth."""

    splits: dict[str, Split]
    truth: np.ndarray | None  # (len(unlabeled),) int64, aligned with unlabeled's rows
    paths: dict[str, Path]
    classes: list[str] | None = None  # class id -> name, where the source names them


# --- config checks ----------------------------------------------------------------------------


def parse_shape(text: str, option: str = "--input-shape") -> list[int]:
    """'1,28,28' (or '[1, 28, 28]', '1x28x28') -> [1, 28, 28]."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("[]()").strip()) if p]
    try:
        shape = [int(p) for p in parts]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"{option}: {text!r} must be positive integers separated by commas, e.g. 1,28,28")
    return shape


def check_config(cfg: PrepareConfig) -> None:
    if cfg.seed is None:
        raise ConfigError("prepare.seed: null; give a number")
    for key in ("labeled", "unlabeled", "test", "seed"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise ConfigError(f"prepare.{key}: {getattr(cfg, key)} must be >= 0")
    if cfg.samples < 1:
        raise ConfigError(f"prepare.samples: {cfg.samples} must be >= 1")
    if cfg.input_shape is not None and (not cfg.input_shape or any(d < 1 for d in cfg.input_shape)):
        raise ConfigError(f"prepare.input_shape: {cfg.input_shape} must be a non-empty list of integers >= 1")
    if cfg.image_size is not None and (len(cfg.image_size) not in (1, 2) or any(d < 1 for d in cfg.image_size)):
        raise ConfigError(f"prepare.image_size: {cfg.image_size} must be [size] or [height, width], integers >= 1")
    for key in ("mean", "std"):
        if (getattr(cfg, key) is None) != (getattr(cfg, "std" if key == "mean" else "mean") is None):
            raise ConfigError(f"prepare.{key}: give prepare.mean and prepare.std together (or neither)")
    if cfg.std is not None and any(v <= 0 for v in cfg.std):
        raise ConfigError(f"prepare.std: {cfg.std} must all be > 0")
    if cfg.store not in image_files.STORES:
        raise ConfigError(f"prepare.store: {cfg.store!r} must be one of {', '.join(image_files.STORES)}")


def is_user_file(dataset: str) -> bool:
    return dataset not in SOURCES and (dataset.endswith(".parquet") or Path(dataset).is_file())


# --- loading ----------------------------------------------------------------------------------


def load(cfg: PrepareConfig) -> Source:
    """All rows of `cfg.dataset`, checked; y = -1 where a user file's label is null."""
    check_config(cfg)
    preset = classes = None
    size = None if cfg.image_size is None else list(cfg.image_size) * (3 - len(cfg.image_size))
    kind = kind_of(cfg.dataset)
    if kind == "image_folder" or kind is None and (encoded.is_image_folder(cfg.dataset) or (
            is_user_file(cfg.dataset) and encoded.has_image_column(Path(cfg.dataset)))):
        images = load_encoded(cfg.dataset, size)
        data = Split(images.ids, images.x, images.y, images.input_shape, len(images.classes))
        preset, classes = images.preset, images.classes
    elif cfg.image_size is not None:
        raise ConfigError(f"prepare.image_size: {cfg.image_size} resizes encoded images (an image folder or a "
                          f"Parquet file with an `image` column); {cfg.dataset!r} is neither")
    elif kind == "images":
        data = SOURCES[cfg.dataset].make(cfg)
        if cfg.input_shape is not None:  # a built-in may be reshaped (e.g. flat for an MLP)
            check_shape(cfg.input_shape, data.x.shape[1], f"--input-shape / prepare.input_shape {cfg.input_shape}",
                         cfg.dataset, ConfigError)
            data.input_shape = list(cfg.input_shape)
    elif is_user_file(cfg.dataset):
        data = load_parquet(Path(cfg.dataset), cfg.input_shape)
    else:
        raise ConfigError(
            f"prepare.dataset: {cfg.dataset!r} is not a known dataset or an existing file or folder "
            f"(expected one of {', '.join(SOURCES)}, an image folder, or a path to a .parquet or .txt file)"
        )
    validate(data, cfg.dataset)
    return Source(data, preset, classes)


def load_encoded(dataset: str, size: list[int] | None) -> encoded.Images:
    """An image folder or a Parquet file of encoded images; a built-in image_folder is written
    into a scratch folder first and read like any other."""
    if kind_of(dataset) == "image_folder":
        with tempfile.TemporaryDirectory() as scratch:
            return encoded.load_folder(SOURCES[dataset].make(Path(scratch)), size)
    path = Path(dataset)
    return (encoded.load_folder if path.is_dir() else encoded.load_parquet)(path, size)


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
    meta = metadata(table.schema)

    d = x.shape[1]
    if input_shape is not None:
        check_shape(input_shape, d, f"--input-shape / prepare.input_shape {list(input_shape)}", path, ConfigError)
        shape = list(input_shape)
    elif "input_shape" in meta:
        shape = parse_meta_shape(meta["input_shape"], path)
        check_shape(shape, d, f"metadata input_shape {shape}", path, InputError)
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
    return open_parquet(path, missing="dataset file not found (prepare.dataset / --dataset)").read()


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


def _name_ids(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:MAX_NAMED])
    more = f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else ""
    return f"ids {shown}{more}"


# --- splitting --------------------------------------------------------------------------------


def split(data: Split, cfg: PrepareConfig, source: str | Path,
          preset: np.ndarray | None = None) -> tuple[dict[str, Split], np.ndarray | None]:
    """labeled / unlabeled / test of the sizes in cfg, stratified by class, seeded by cfg.seed.

    Returns the splits (unlabeled with y = -1) and the unlabeled rows' true labels, or None
    when they are unknown (a user file whose unlabeled rows have null y). With `preset` (the
    split the source names for each row) see `split_preset`.
    """
    if preset is not None:
        return split_preset(data, cfg, source, preset)
    sizes = {"labeled": cfg.labeled, "unlabeled": cfg.unlabeled, "test": cfg.test}
    for name, size in sizes.items():
        if size is None:
            raise ConfigError(f"prepare.{name}: null (all rows) needs a source that names its {name} split "
                              "(an image folder's test/ or unlabeled/, a `split` column), as text datasets do; "
                              "give a number of samples")
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


def split_preset(data: Split, cfg: PrepareConfig, source: str | Path,
                 preset: np.ndarray) -> tuple[dict[str, Split], np.ndarray | None]:
    """The splits when the source names some: a named split is kept.

    The source's `test` rows are the test split and its `unlabeled` rows the unlabeled split;
    its `train` rows give the labeled split and any split the source does not name (drawn by
    class in DRAW_ORDER, as `split` does). A size counts within its pool; null takes the whole
    pool, which only a pool serving one split allows. The unlabeled truth is known when the
    unlabeled rows all have labels.
    """
    pools = {name: np.flatnonzero(preset == name) for name in encoded.PRESETS}
    if not len(pools["train"]):
        raise InputError(f"{source}: no train rows (the source names splits {sorted(set(preset.tolist()))})")
    serves = {"test": "test" if len(pools["test"]) else "train", "labeled": "train",
              "unlabeled": "unlabeled" if len(pools["unlabeled"]) else "train"}
    rng = np.random.default_rng(cfg.seed)
    rows: dict[str, np.ndarray] = {}
    for pool in ("test", "unlabeled", "train"):
        names = [name for name in DRAW_ORDER if serves[name] == pool]
        if not names:
            continue
        where = pools[pool]
        sizes = {name: getattr(cfg, name) for name in names}
        if len(names) == 1 and sizes[names[0]] is None:
            sizes[names[0]] = len(where)
        for name, size in sizes.items():
            if size is None:
                raise ConfigError(f"prepare.{name}: null (all rows) needs its own split in {source}; its "
                                  f"{name} rows are drawn from the {pool} rows with {', '.join(names)}, "
                                  "so give a number")
        _check_enough(len(where), sizes, names, f"{source}: its {pool} split has {len(where)} samples")
        if pool == "unlabeled":
            rows["unlabeled"] = rng.permutation(where)[: sizes["unlabeled"]]
            continue
        unlabeled = where[data.y[where] < 0]
        if len(unlabeled):
            raise InputError(f"{source}: {_name_ids(data.ids[unlabeled])} of the {pool} split have no label "
                             "(unlabeled rows belong in the unlabeled split)")
        drawn = _stratified(data.y[where], {**dict.fromkeys(SPLITS, 0), **sizes}, rng)
        rows.update({name: where[drawn[name]] for name in names})
    known = data.y[rows["unlabeled"]]
    truth = known if (known >= 0).all() else None
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


def prepare(cfg: PrepareConfig, out: Path) -> Prepared:
    """Load, check, split and write `cfg.dataset` to `out` (replaced as a whole when done)."""
    out = Path(out)
    data, preset, classes = load(cfg)
    splits, truth = split(data, cfg, cfg.dataset, preset)
    if data.x.dtype == np.uint8:  # pixels: stored as they are, with the normalisation to apply
        norm = normalisation(splits["labeled"], cfg)
        for part in splits.values():
            part.norm = norm
    elif cfg.store != "pixels":
        raise ConfigError(f"prepare.store: {cfg.store!r} stores 8-bit pixels; {cfg.dataset!r} has float inputs "
                          "(store: pixels)")
    meta = {"dataset": cfg.dataset, "classes": classes, "store": cfg.store}
    with replacing(out) as tmp:
        for name, part in splits.items():
            image_files.write_split(tmp / f"{name}.parquet", part, **meta)
        if truth is not None:
            image_files.write_truth(tmp / image_files.TRUTH_FILE, splits["unlabeled"].ids, truth, data.num_classes,
                                    cfg.dataset)
    paths = {name: out / f"{name}.parquet" for name in splits}
    if truth is not None:
        paths["unlabeled_truth"] = out / image_files.TRUTH_FILE
    return Prepared(splits, truth, paths, classes)


def normalisation(labeled: Split, cfg: PrepareConfig) -> Norm:
    """`prepare.mean`/`std` if given, else the labeled split's per-channel mean and std of
    pixel / 255 (a constant channel gets std 1)."""
    channels = labeled.input_shape[0]
    if cfg.mean is not None:
        for key in ("mean", "std"):
            if len(getattr(cfg, key)) != channels:
                raise ConfigError(f"prepare.{key}: {getattr(cfg, key)} has {len(getattr(cfg, key))} values; the "
                                  f"images have {channels} channel(s)")
        return Norm([float(v) for v in cfg.mean], [float(v) for v in cfg.std])
    if not len(labeled.x):
        raise ConfigError("prepare.labeled: 0 rows leave no pixels to normalise by; set prepare.mean and prepare.std")
    pixels = labeled.x.reshape(len(labeled.x), channels, -1).transpose(1, 0, 2).reshape(channels, -1)
    mean = pixels.mean(axis=1, dtype=np.float64) / 255.0
    std = pixels.std(axis=1, dtype=np.float64) / 255.0
    return Norm([round(float(m), 6) for m in mean], [round(float(s), 6) if s > 0 else 1.0 for s in std])
