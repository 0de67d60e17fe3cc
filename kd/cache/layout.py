"""Where everything sits in a cache directory, and how it is cut into files.

    manifest.json
    soft_targets/split=<split>/part-<n>.parquet      row groups of ROW_GROUP_ROWS rows;
                                                      one `lse_t<T>` column per temperature
                                                      (label.sampling: sample_idx_t<T>,
                                                      sample_count_t<T>, entropy_t<T> too)
    features.zarr/<split>/<layer>, features.zarr/<split>/id
                                                      chunks of `chunk_rows` rows (under
                                                      CHUNK_BYTES each), never spanning two parts
    shards/shard-<i>-of-<n>.json                      (only while a sharded `kd label` runs)
    teacher/                                          (label.keep_teacher)

The writer lays the cache out with these; the reader and verify find it with the same ones.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kd.cache.store import Store

MANIFEST = "manifest.json"
SOFT_TARGETS = "soft_targets"
FEATURES = "features.zarr"
SHARDS = "shards"
TEACHER_COPY = "teacher"  # label.keep_teacher: the teacher's weights and config, for students that start from them
ROW_GROUP_ROWS = 16384
CHUNK_BYTES = 4 << 20  # target Zarr chunk size before compression


def temperature_key(temperature: float) -> str:
    """`t4` for 4 or 4.0, `t2_5` for 2.5: the temperature as written in params, as it names the
    columns of a temperature and its fidelity statistics."""
    t = float(temperature)
    text = str(int(t)) if t.is_integer() else repr(t)
    return "t" + text.replace(".", "_")


def lse_column(temperature: float) -> str:
    """`lse_t4` for 4 or 4.0, `lse_t2_5` for 2.5."""
    return "lse_" + temperature_key(temperature)


def sample_columns(temperature: float) -> tuple[str, str, str]:
    """The sampled targets' columns at one temperature (`label.sampling`; kd/cache/sampling.py):
    `sample_idx_t4`, `sample_count_t4`, `entropy_t4`."""
    suffix = temperature_key(temperature)
    return f"sample_idx_{suffix}", f"sample_count_{suffix}", f"entropy_{suffix}"


def part_path(split: str, index: int) -> str:
    return f"{SOFT_TARGETS}/split={split}/part-{index:05d}.parquet"


def feature_path(split: str, layer: str) -> str:
    """A Zarr array of one split: a feature layer, or `id` (the rows' ids, to prove alignment)."""
    return f"{FEATURES}/{split}/{layer}"


def shard_record(shard: int, num_shards: int) -> str:
    return f"{SHARDS}/shard-{shard:05d}-of-{num_shards:05d}.json"


def rows_per_sample(manifest: dict[str, Any]) -> int | None:
    """Cache rows per prepared sample: 1 + its augmented views, a block's predicted tokens, or
    its masked positions in every masking (view) of it; None where it varies (instruction
    data: a row per response token)."""
    text = manifest.get("text")
    if text and text.get("response_only"):
        return None
    return (text["positions"] if text else 1) * (manifest["views"]["count"] + 1)


def sample_starts(ids: np.ndarray) -> np.ndarray:
    """(R,) bool: whether each cache row is the first of its sample (a sample's rows are together,
    in cache order)."""
    return np.concatenate([[True], ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, bool)


def feature_arrays(specs: list[dict[str, Any]]) -> list[tuple[str, list[int], str]]:
    """(name, shape of one row, dtype) of each Zarr array of a split: `id`, then the layers."""
    return [("id", [], "int64"), *[(s["name"], s["shape"], "float16") for s in specs]]


def chunk_rows(part_rows: int, row_bytes: int) -> int:
    """The largest divisor of part_rows whose chunk stays under CHUNK_BYTES: no chunk spans two parts."""
    limit = max(1, CHUNK_BYTES // row_bytes)
    return max(d for d in range(1, min(part_rows, limit) + 1) if part_rows % d == 0)


def chunk_files(manifest: dict[str, Any], split: str, layer: str, first_row: int, rows: int) -> list[str]:
    """The Zarr chunk files (relative paths) holding rows [first_row, first_row + rows) of one array."""
    rows_per_chunk = manifest["splits"][split]["chunk_rows"][layer]
    shape = next((s["shape"] for s in manifest["features"] if s["name"] == layer), [])
    base = f"{feature_path(split, layer)}/c"
    first, last = first_row // rows_per_chunk, math.ceil((first_row + rows) / rows_per_chunk)
    return ["/".join([base, str(i), *["0"] * len(shape)]) for i in range(first, last)]


def chunks_sha256(store: Store, manifest: dict[str, Any], split: str, layer: str, first_row: int, rows: int) -> str:
    """sha256 over the sha256s of the chunk files of one part's rows ("missing:<path>" if one is gone)."""
    digest = hashlib.sha256()
    for rel in chunk_files(manifest, split, layer, first_row, rows):
        if not store.is_file(rel):
            return "missing:" + rel
        digest.update(store.sha256(rel).encode())
    return digest.hexdigest()
