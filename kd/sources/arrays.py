"""A user's Parquet file of arrays: `id` (integers), `x` (a list of numbers per row), optional `y`.

`load_parquet` reads and checks it (every x of one length, no nulls inside, integral labels
>= 0 and below the `num_classes` metadata) into a `Split`; the input shape comes from the
caller or the file's `input_shape` metadata. Encoded images (an `image` column) are
`sources.encoded`; `sources.images` splits and writes either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd.errors import ConfigError, InputError
from kd.prepared import metadata, open_parquet
from kd.prepared.images import Split, check_shape, parse_meta_shape
from kd.sources.encoded import MAX_NAMED, name_ids


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
                             f"{name_ids(bad)} have larger labels")
    else:
        num_classes = int(labeled.max()) + 1 if len(labeled) else 0
    return Split(ids, x, y, shape, num_classes)


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
        raise InputError(f"{path}: column 'x' is null in {array.null_count} rows, {name_ids(ids[rows])}")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        d = int(np.bincount(lengths).argmax())
        seen = sorted(set(lengths.tolist()))[:MAX_NAMED]
        raise InputError(f"{path}: every x must have the same length; most have {d} values but "
                         f"{name_ids(ids[lengths != d])} differ (lengths {seen})")
    d = int(lengths[0]) if len(lengths) else 0
    values = array.flatten()
    if values.null_count:
        rows = pc.list_parent_indices(array).to_numpy()[values.is_null().to_numpy(zero_copy_only=False)]
        raise InputError(f"{path}: column 'x' has null values inside the lists of {name_ids(ids[np.unique(rows)])}")
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
            raise InputError(f"{path}: labels in 'y' must be integers; {name_ids(ids[bad])} are not "
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
        raise InputError(f"{path}: labels in 'y' must be >= 0; {name_ids(ids[negative])} have negative labels")
    return y
