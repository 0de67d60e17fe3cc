"""Image splits in the prepared format: write them, read them whole, in batches or by rows.

Each split file holds one row per sample: `id` int64 (unique across splits), `x`
fixed_size_list<float32>[D] (the flattened input), `y` int64 (null in unlabeled.parquet), and
the key-value metadata `input_shape` (JSON, e.g. "[1,28,28]"), `num_classes`, `dataset` and,
where the source named them, `classes` (JSON list: class id -> name).

Pixels may be stored compactly instead: `x` fixed_size_list<uint8>[D] (channel-first, like
the float form) with the metadata `mean` and `std` (JSON lists, one value per channel), or
(`prepare.store: png`) no `x` but an `image` column of binary PNG files, one per row (8-bit
grey, RGB or RGBA, lossless: the same pixels), with the same `input_shape`, `mean` and `std`.
The readers return float32 in every case: x = (pixel / 255 - mean[c]) / std[c], so no consumer
knows which form is on disk. The built-in datasets write float32; image folders and
encoded-image Parquet files write uint8, zstd-compressed (4x smaller than float32; 64x64 photo
crops take 1.4x their PNG files), or PNG (1.0x).
`unlabeled_truth.parquet` (`id`, `y`) holds the unlabeled rows' labels when they are known;
only `kd eval` reads it. Files are written atomically (`prepared.write_atomic`).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from kd.errors import InputError
from kd.prepared import ROW_GROUP_ROWS, metadata, open_parquet, read_row_range, write_atomic

TRUTH_FILE = "unlabeled_truth.parquet"
COLUMN_TYPES = {"id": pa.int64(), "y": pa.int64()}  # `x` is checked on its own (its D varies)
X_TYPES = (pa.float32(), pa.uint8())  # what `x` may hold; uint8 needs `mean` and `std`
STORES = ("pixels", "png")  # how 8-bit pixels are written: uint8 `x`, or PNG files in `image`
PNG_COLUMN = "image"
PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> PIL mode


@dataclass
class Norm:
    """How uint8 pixels become the float32 inputs: (pixel / 255 - mean[c]) / std[c]."""

    mean: list[float]  # one per channel
    std: list[float]

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        # pixels: (N, D) uint8, channel-first -> (N, D) float32
        n, channels = len(pixels), len(self.mean)
        mean = np.asarray(self.mean, np.float32)[:, None]
        std = np.asarray(self.std, np.float32)[:, None]
        x = (pixels.reshape(n, channels, -1).astype(np.float32) / np.float32(255.0) - mean) / std
        return x.reshape(n, -1)


@dataclass
class Split:
    """One prepared split in memory (or one streamed batch of it)."""

    ids: np.ndarray  # (N,) int64
    x: np.ndarray  # (N, D) float32, C-contiguous, read-only when read from a file; uint8 pixels
    y: np.ndarray  # (N,) int64, -1 where the label is null           # before writing, with `norm`
    input_shape: list[int]
    num_classes: int
    norm: Norm | None = None  # for uint8 x: how the readers make float32 of it

    def __len__(self) -> int:
        return max(len(self.ids), len(self.x), len(self.y))

    def take(self, rows: np.ndarray) -> Split:
        return Split(self.ids[rows], self.x[rows], self.y[rows], self.input_shape, self.num_classes, self.norm)


# --- writing ---------------------------------------------------------------------------------


def write_split(path: Path, data: Split, dataset: str, classes: list[str] | None = None,
                row_group_rows: int = ROW_GROUP_ROWS, store: str = "pixels") -> None:
    """One split file in the contract's schema (y = -1 written as null), atomically.

    uint8 `x` (with `data.norm`) is written as uint8 with `mean`/`std`, or with store="png" as
    one PNG file per row in an `image` column; anything else as float32.
    """
    d = math.prod(data.input_shape)
    if data.x.shape != (len(data.ids), d):
        raise ValueError(f"x has shape {data.x.shape}, expected ({len(data.ids)}, {d})")
    meta = {"input_shape": _json(list(data.input_shape)), "num_classes": str(data.num_classes), "dataset": dataset}
    if classes is not None:
        meta["classes"] = json.dumps(list(classes))
    if data.x.dtype == np.uint8:
        if data.norm is None or len(data.norm.mean) != data.input_shape[0] or len(data.norm.std) != data.input_shape[0]:
            raise ValueError(f"uint8 x needs a mean and std per channel ({data.input_shape[0]}), got {data.norm}")
        meta.update(mean=_json(data.norm.mean), std=_json(data.norm.std))
        if store == "png":
            table = pa.table({"id": pa.array(data.ids, pa.int64()),
                              PNG_COLUMN: pa.array(_png_files(data.x, data.input_shape), pa.binary()),
                              "y": pa.array(data.y, pa.int64(), mask=data.y < 0)},
                             schema=png_schema().with_metadata(meta))
            write_atomic(table, path, row_group_rows, "none")  # PNG files are compressed already
            return
        kind, compression = pa.uint8(), ("zstd", 3)  # photos: 1.4x their PNG files (snappy: 1.6x), as fast
    else:
        kind, compression = pa.float32(), ("snappy", None)
    x = np.ascontiguousarray(data.x, dtype=kind.to_pandas_dtype()).reshape(-1)
    schema = split_schema(d, kind).with_metadata(meta)
    table = pa.table({
        "id": pa.array(data.ids, pa.int64()),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x, kind), d),
        "y": pa.array(data.y, pa.int64(), mask=data.y < 0),
    }, schema=schema)
    write_atomic(table, path, row_group_rows, *compression)


def write_truth(path: Path, ids: np.ndarray, y: np.ndarray, num_classes: int, dataset: str) -> None:
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("y", pa.int64(), nullable=False)])
    schema = schema.with_metadata({"num_classes": str(num_classes), "dataset": dataset})
    table = pa.table({"id": pa.array(ids, pa.int64()), "y": pa.array(y, pa.int64())}, schema=schema)
    write_atomic(table, path, ROW_GROUP_ROWS)


def png_schema() -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field(PNG_COLUMN, pa.binary(), nullable=False),
        pa.field("y", pa.int64()),
    ])


def _png_files(pixels: np.ndarray, shape: list[int]) -> list[bytes]:
    """(N, C*H*W) uint8, channel-first -> one lossless PNG file per row."""
    if len(shape) != 3 or shape[0] not in PNG_MODES:
        raise ValueError(f"store png takes (channels, height, width) images of 1, 3 or 4 channels, got {shape}")
    channels, height, width = shape
    files = []
    for row in pixels.reshape(len(pixels), channels, height, width):
        buffer = io.BytesIO()
        picture = row[0] if channels == 1 else row.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(picture), PNG_MODES[channels]).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def _decode_png(column: pa.Array, shape: list[int], path: Path, first_row: int = 0) -> np.ndarray:
    """An `image` column of PNG files -> (N, C*H*W) uint8, channel-first; a file that is not a
    PNG of exactly that shape and mode is refused, naming its row of the file."""
    channels, height, width = shape
    out = np.empty((len(column), channels * height * width), np.uint8)
    for row, blob in enumerate(column.to_pylist(), start=first_row):
        try:
            with Image.open(io.BytesIO(blob)) as picture:
                if picture.format != "PNG" or picture.mode != PNG_MODES[channels] or picture.size != (width, height):
                    raise InputError(f"{path}: row {row} of column {PNG_COLUMN!r} is a {picture.format} "
                                     f"{picture.mode} {picture.size[0]}x{picture.size[1]} image; the file's "
                                     f"input_shape {shape} needs a PNG {PNG_MODES[channels]} {width}x{height}")
                pixels = np.asarray(picture)
        except (OSError, SyntaxError):
            raise InputError(f"{path}: row {row} of column {PNG_COLUMN!r} is not a readable image") from None
        out[row - first_row] = (pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)).reshape(-1)
    return out


def split_schema(d: int, kind: pa.DataType = pa.float32()) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("x", pa.list_(kind, d), nullable=False),
        pa.field("y", pa.int64()),
    ])


# --- reading ---------------------------------------------------------------------------------


def read_split(path: Path, columns: Sequence[str] = ("id", "x", "y")) -> Split:
    """A whole split file; the columns not asked for come back as empty arrays."""
    file = open_parquet(path)
    meta = _check_columns(file.schema_arrow, columns, path)
    table = file.read(columns=_stored(columns, meta))
    return _to_split(dict(zip(columns, table.columns)), meta, path)


def read_rows(path: Path, start: int, stop: int, columns: Sequence[str] = ("id", "x", "y")) -> Split:
    """Rows [start, stop) of a split file, reading only the row groups that hold them."""
    file = open_parquet(path)
    meta = _check_columns(file.schema_arrow, columns, path)
    table = read_row_range(file, start, stop, _stored(columns, meta))
    return _to_split(dict(zip(columns, table.columns)), meta, path, start)


def _stored(columns: Sequence[str], meta: _Meta) -> list[str]:
    # the file's names of the asked-for columns: `x` is `image` in a PNG file
    return [PNG_COLUMN if name == "x" and meta.png else name for name in columns]


def split_info(path: Path) -> dict:
    """rows, input_shape, num_classes, dataset, from the file's footer only."""
    file = open_parquet(path)
    meta = metadata(file.schema_arrow)
    shape = parse_meta_shape(meta["input_shape"], Path(path)) if "input_shape" in meta else None
    return {
        "rows": file.metadata.num_rows,
        "input_shape": shape,
        "num_classes": int(meta["num_classes"]) if "num_classes" in meta else None,
        "dataset": meta.get("dataset"),
    }


def check_shape(shape: Sequence[int], d: int, what: str, source: str | Path, error: type) -> None:
    """Raise `error` naming `source` and `what` unless `shape` holds exactly d values."""
    if math.prod(shape) != d:
        raise error(f"{source}: {what} has {math.prod(shape)} values but x has {d} per row")


def parse_meta_shape(text: str, path: Path) -> list[int]:
    """The `input_shape` metadata ("[1,28,28]") as a list of integers >= 1."""
    try:
        shape = json.loads(text)
    except json.JSONDecodeError:
        shape = None
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise InputError(f"{path}: metadata input_shape {text!r} must be a JSON list of integers >= 1, e.g. [1,28,28]")
    return shape


def _json(values: list) -> str:
    return json.dumps(values, separators=(",", ":"))


def _parse_norm(meta: dict[str, str], channels: int, path: Path) -> Norm:
    """The `mean`/`std` metadata of a uint8 file: one number per channel, std > 0."""
    values = {}
    for key in ("mean", "std"):
        try:
            value = json.loads(meta[key]) if key in meta else None
        except json.JSONDecodeError:
            value = None
        if not (isinstance(value, list) and len(value) == channels
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
                and (key == "mean" or all(v > 0 for v in value))):
            found = repr(meta[key]) if key in meta else "missing"
            raise InputError(f"{path}: uint8 x needs metadata {key} as a JSON list of {channels} numbers"
                             f"{' > 0' if key == 'std' else ''} (one per channel); found {found}")
        values[key] = [float(v) for v in value]
    return Norm(values["mean"], values["std"])


@dataclass
class _Meta:
    input_shape: list[int]
    num_classes: int
    d: int
    norm: Norm | None = None  # uint8 x
    png: bool = False  # x is stored as PNG files in the `image` column


def _check_columns(schema: pa.Schema, columns: Sequence[str], path: Path) -> _Meta:
    """The metadata, after checking the asked-for columns exist with the contract's types."""
    path = Path(path)
    for name in columns:
        if name not in ("id", "x", "y"):
            raise ValueError(f"unknown column {name!r}: a split has id, x, y")
        png = name == "x" and "x" not in schema.names and PNG_COLUMN in schema.names
        if name not in schema.names and not png:
            raise InputError(f"{path}: no column {name!r} (found {', '.join(schema.names)}); "
                             "expected a prepared split with id, x, y")
        kind = schema.field(PNG_COLUMN if png else name).type
        if png:
            ok, expected = kind == pa.binary(), "binary (PNG files)"
        elif name == "x":
            ok = pa.types.is_fixed_size_list(kind) and kind.value_type in X_TYPES
            expected = "fixed_size_list<float32>[D] or fixed_size_list<uint8>[D] with mean/std"
        else:
            ok, expected = kind == COLUMN_TYPES[name], str(COLUMN_TYPES[name])
        if not ok:
            raise InputError(f"{path}: column {name!r} has type {kind}, expected {expected}")
    meta = metadata(schema)
    try:
        num_classes = int(meta.get("num_classes", "0"))
    except ValueError:
        raise InputError(f"{path}: metadata num_classes {meta['num_classes']!r} is not an integer") from None
    if "x" not in schema.names and PNG_COLUMN in schema.names:
        if "input_shape" not in meta:
            raise InputError(f"{path}: no input_shape in the file's metadata (expected e.g. [3,32,32])")
        shape = parse_meta_shape(meta["input_shape"], path)
        if len(shape) != 3 or shape[0] not in PNG_MODES:
            raise InputError(f"{path}: PNG images need an input_shape of (channels, height, width) with 1, 3 or "
                             f"4 channels, got {shape}")
        norm = _parse_norm(meta, shape[0], path) if "x" in columns else None
        return _Meta(shape, num_classes, math.prod(shape), norm, png=True)
    if "x" not in schema.names:
        return _Meta([], num_classes, 0)
    d = schema.field("x").type.list_size
    if "input_shape" not in meta:
        if "x" in columns:
            raise InputError(f"{path}: no input_shape in the file's metadata (expected e.g. [1,28,28])")
        return _Meta([d], num_classes, d)
    shape = parse_meta_shape(meta["input_shape"], path)
    check_shape(shape, d, f"metadata input_shape {shape}", path, InputError)
    pixels = schema.field("x").type.value_type == pa.uint8()
    return _Meta(shape, num_classes, d, _parse_norm(meta, shape[0], path) if pixels and "x" in columns else None)


def _to_split(cols: dict[str, pa.Array | pa.ChunkedArray], meta: _Meta, path: Path, first_row: int = 0) -> Split:
    for name, column in cols.items():
        if name != "y" and column.null_count:
            raise InputError(f"{path}: column {name!r} has {column.null_count} null values")
    ids = cols["id"].to_numpy() if "id" in cols else np.empty(0, np.int64)
    y = pc.fill_null(cols["y"], -1).to_numpy() if "y" in cols else np.empty(0, np.int64)
    if "x" not in cols:
        x = np.empty((0, meta.d), np.float32)
    elif meta.png:
        x = meta.norm.apply(_decode_png(cols["x"], meta.input_shape, path, first_row))
        x.flags.writeable = False
    else:
        x = _x_view(cols["x"], meta.d, meta.norm)
    return Split(ids, x, y, list(meta.input_shape), meta.num_classes)


def _x_view(column: pa.Array | pa.ChunkedArray, d: int, norm: Norm | None) -> np.ndarray:
    """(N, D) float32, read-only: over Arrow's buffer (no copy for a single float32 chunk), or
    uint8 pixels normalised by `norm`."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.empty((0, d), np.float32)
        column = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    x = column.flatten().to_numpy().reshape(len(column), d)
    if norm is not None:
        x = norm.apply(x)
    x.flags.writeable = False
    return x
