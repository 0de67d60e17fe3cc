"""How a cache row's top-k is stored in Parquet: `topk` (as computed) or `compact` (`label.encoding`).

`topk` (the default) stores `topk_idx` (int32, descending logit) and `topk_logit` (float16 or
float32, minus the row's largest logit). `compact` stores the same k entries in id order:

    topk_gap   fixed_size_list<uint8|uint16|uint32>[k]   the ids ascending, as gaps: ids = cumsum(gap)
    topk_code  fixed_size_list<uint8>[k]                 the shifted logits, one byte each:
                                                          logit = -step / growth * expm1(growth * code)

The codes' levels are `step` apart near the row's maximum (code 0, exactly 0, held by the
top entry alone) and `step + growth * |logit|` apart below it, since an error in a
log-probability costs in proportion to the probability (about 0.05 near the top, 0.25 at
-10, the last level at -408). Each entry takes the nearest level, so its error is at most
half the spacing there (one step for an entry within half a step of the maximum, kept off
code 0 so that the first entry stays the teacher's top-1); the largest error written is
recorded in the manifest. Both columns use Parquet's BYTE_STREAM_SPLIT encoding under zstd,
so the gaps' and codes' high bytes cost next to nothing. The reader decodes a compact row
into exactly what a `topk` row gives (`decode`): the ids in descending-logit order (stable,
so equal codes keep ascending ids) and the shifted logits as float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

STEP = 0.05  # compact: the spacing of the codes' levels near the row's maximum logit
GROWTH = 0.02  # compact: how much the spacing grows per unit of logit below the maximum
CODES = 256
SCHEMA_VERSIONS = {"topk": 1, "compact": 2}  # per label.encoding: a kd that knows only topk refuses compact


def header(name: str) -> dict[str, Any]:
    """The manifest's `encoding`: its name and what decoding needs (`max_abs_error` comes last)."""
    return {"name": name, "step": STEP, "growth": GROWTH} if name == "compact" else {"name": name}


def of(manifest: dict[str, Any]) -> dict[str, Any]:
    """A cache's encoding (caches written before `label.encoding` are `topk`)."""
    return manifest.get("encoding", {"name": "topk"})


def levels(encoding: dict[str, Any]) -> np.ndarray:
    """(CODES,) float32: the shifted logit of each code, 0 then descending."""
    step, growth = encoding["step"], encoding["growth"]
    return (-step / growth * np.expm1(growth * np.arange(CODES))).astype(np.float32)


def id_type(num_classes: int) -> pa.DataType:
    """The narrowest unsigned integer that holds every class id."""
    return next(t for t in (pa.uint8(), pa.uint16(), pa.uint32())
                if num_classes - 1 <= np.iinfo(t.to_pandas_dtype()).max)


def columns(encoding: dict[str, Any]) -> list[str]:
    """The Parquet columns that hold a row's top-k."""
    return ["topk_gap", "topk_code"] if encoding["name"] == "compact" else ["topk_idx", "topk_logit"]


def fields(encoding: dict[str, Any], k: int, logit_dtype: str, num_classes: int | None) -> list[pa.Field]:
    """The top-k's Parquet fields (`num_classes`: compact's id type; unused by topk)."""
    if encoding["name"] == "compact":
        return [pa.field("topk_gap", pa.list_(id_type(num_classes), k), nullable=False),
                pa.field("topk_code", pa.list_(pa.uint8(), k), nullable=False)]
    return [pa.field("topk_idx", pa.list_(pa.int32(), k), nullable=False),
            pa.field("topk_logit", pa.list_(pa.from_numpy_dtype(np.dtype(logit_dtype)), k), nullable=False)]


def writer_options(encoding: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """pyarrow.parquet.ParquetWriter keywords: compact's columns byte-stream-split, not dictionary-encoded."""
    if encoding["name"] != "compact":
        return {}
    compact = columns(encoding)
    return {"use_dictionary": [name for name in schema.names if name not in compact],
            "column_encoding": {f"{name}.list.element": "BYTE_STREAM_SPLIT" for name in compact}}


def encode(cols: dict[str, np.ndarray], encoding: dict[str, Any]) -> dict[str, np.ndarray]:
    """A batch's stored top-k columns from `targets.soft_targets`'s (float32 logits, descending)."""
    if encoding["name"] != "compact":
        return {"topk_idx": cols["topk_idx"], "topk_logit": cols["topk_logit"]}
    idx, logit = cols["topk_idx"], cols["topk_logit"].astype(np.float32)
    table = levels(encoding)
    # The nearest level: -table ascends, so searchsorted finds the level at or below each value.
    above = np.clip(np.searchsorted(-table, -logit), 1, CODES - 1)
    codes = np.where(np.abs(table[above - 1] - logit) <= np.abs(table[above] - logit), above - 1, above)
    codes[:, 1:] = np.maximum(codes[:, 1:], 1)  # code 0 is the top entry's alone
    order = np.argsort(idx, axis=1, kind="stable")
    ids = np.take_along_axis(idx, order, 1)
    gaps = np.diff(ids, axis=1, prepend=0)
    return {"topk_gap": gaps, "topk_code": np.take_along_axis(codes, order, 1).astype(np.uint8)}


def decode(stored: dict[str, np.ndarray], encoding: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(topk_idx int32, topk_logit) in descending-logit order, from a batch's stored columns
    ((R, k) each): for `topk` as stored, for `compact` decoded to float32."""
    if encoding["name"] != "compact":
        return stored["topk_idx"], stored["topk_logit"]
    ids = np.cumsum(stored["topk_gap"], axis=1, dtype=np.int64)
    order = np.argsort(stored["topk_code"], axis=1, kind="stable")  # ascending code = descending logit
    codes = np.take_along_axis(stored["topk_code"], order, 1)
    return np.take_along_axis(ids, order, 1).astype(np.int32), levels(encoding)[codes]


def describe(encoding: dict[str, Any]) -> str:
    """One line for `kd cache info`."""
    if encoding["name"] != "compact":
        return "topk"
    error = encoding.get("max_abs_error")
    return (f"compact (ids as gaps, logits in {CODES} levels {encoding['step']:g} + {encoding['growth']:g}|z| apart"
            + (f", largest error {error:.3g})" if error is not None else ")"))
