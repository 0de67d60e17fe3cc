"""The prepared format: the Parquet files `kd prepare` writes and every other stage reads.

A prepared directory holds `labeled.parquet`, `unlabeled.parquet` and `test.parquet`, one
row per sample, in row groups of ROW_GROUP_ROWS rows so readers can stream:

    images.py   image splits: `id`, `x` (the flattened input), `y`; `unlabeled_truth.parquet`
    tokens.py   token blocks: `id`, `tokens`; the directory's `tokenizer.json`

This module holds what both share: opening a split file, its key-value metadata, writing a
file atomically, reading a range of rows, and the data fingerprint the cache records. It
knows no dataset; preparing one from a source is `kd.sources`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kd.errors import InputError, MissingInputError
from kd.files import file_sha256

ROW_GROUP_ROWS = 16384
MISSING = "prepared data file not found (run `kd prepare`)"


def open_parquet(path: Path, missing: str = MISSING) -> pq.ParquetFile:
    """An open Parquet file; a missing or unreadable one is one clear error naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: {missing}")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None


def metadata(schema: pa.Schema) -> dict[str, str]:
    """A schema's key-value metadata, decoded."""
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def write_atomic(table: pa.Table, path: Path, row_group_rows: int = ROW_GROUP_ROWS,
                 compression: str = "snappy", level: int | None = None) -> None:
    """Write `table` under a temporary name, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=row_group_rows, compression=compression,
                       compression_level=level)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def data_fingerprint(path: Path) -> str:
    """sha256 (hex) of the file's bytes."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: {MISSING}")
    return file_sha256(path)
