"""Token blocks in the prepared format, and the tokenizer file of a prepared directory.

Each split file holds one row per block: `id` int64 (unique across splits) and `tokens`
fixed_size_list<int32>[block_size], with the key-value metadata `modality` ("text"),
`dataset`, `block_size`, `vocab_size`, `tokenizer_sha256` and `documents` (how many documents
were dealt to the split). The directory's `tokenizer.json` is the one the blocks were cut
with; `load_tokenizer` checks its sha256 against the splits' metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from pipeline.errors import InputError, MissingInputError
from pipeline.files import file_sha256
from pipeline.prepared import ROW_GROUP_ROWS, metadata, open_parquet, read_row_range, write_atomic

TOKENIZER_FILE = "tokenizer.json"
# [PAD] pads and never takes part in a loss; <|endoftext|> starts every document (bos and eos,
# as in GPT-2); [MASK] is the masked LM's mask. The trainer gives them ids 0, 1, 2.
PAD, EOS, MASK = "[PAD]", "<|endoftext|>", "[MASK]"
SPECIAL_TOKENS = (PAD, EOS, MASK)


class SpecialIds(NamedTuple):
    pad: int
    eos: int
    mask: int


def special_ids(tokenizer: Tokenizer, source: str | Path) -> SpecialIds:
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if None in ids:
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
        raise InputError(f"{source}: the tokenizer lacks the special tokens {missing}")
    return SpecialIds(*ids)


# --- writing ----------------------------------------------------------------------------------


def write_blocks(path: Path, ids: np.ndarray, tokens: np.ndarray, meta: dict[str, str]) -> None:
    """One split file: `id` int64, `tokens` fixed_size_list<int32>[L], written atomically."""
    length = tokens.shape[1]
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False),
                        pa.field("tokens", pa.list_(pa.int32(), length), nullable=False)]).with_metadata(meta)
    flat = pa.array(np.ascontiguousarray(tokens, np.int32).reshape(-1), pa.int32())
    table = pa.table({"id": pa.array(ids, pa.int64()), "tokens": pa.FixedSizeListArray.from_arrays(flat, length)},
                     schema=schema)
    write_atomic(table, path, ROW_GROUP_ROWS)


# --- reading (used by the other stages) -------------------------------------------------------


def modality(path: Path) -> str:
    """"text" or "image": what `kd prepare` wrote in the split file at `path` (footer only)."""
    return metadata(open_parquet(path).schema_arrow).get("modality", "image")


def split_info(path: Path) -> dict:
    """rows, block_size, vocab_size, tokenizer_sha256, documents, dataset, from the footer only."""
    file = _open_blocks(path)
    meta = metadata(file.schema_arrow)
    try:
        return {"rows": file.metadata.num_rows, "block_size": int(meta["block_size"]),
                "vocab_size": int(meta["vocab_size"]), "tokenizer_sha256": meta["tokenizer_sha256"],
                "documents": int(meta["documents"]), "dataset": meta["dataset"]}
    except (KeyError, ValueError) as exc:
        raise InputError(f"{path}: metadata {exc} missing or not an integer (expected what `kd prepare` writes)") from None


def read_blocks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ids (N,) int64 and tokens (N, block_size) int64 of a whole split file."""
    file = _open_blocks(path)
    return _arrays(file.read(), file.schema_arrow.field("tokens").type.list_size)


def read_rows(path: Path, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and tokens of blocks [start, stop), reading only the row groups that hold them."""
    file = _open_blocks(path)
    return _arrays(read_row_range(file, start, stop), file.schema_arrow.field("tokens").type.list_size)


def load_tokenizer(prepared: Path) -> tuple[Tokenizer, SpecialIds]:
    """The prepared directory's tokenizer, checked against the sha256 its splits were cut with."""
    path = Path(prepared) / TOKENIZER_FILE
    if not path.is_file():
        raise MissingInputError(f"{path}: tokenizer not found (run `kd prepare` on a text dataset)")
    expected = split_info(Path(prepared) / "labeled.parquet")["tokenizer_sha256"]
    if file_sha256(path) != expected:
        raise InputError(f"{path}: not the tokenizer labeled.parquet was cut with (sha256 differs); "
                         "run `kd prepare` again")
    tokenizer = Tokenizer.from_file(str(path))
    return tokenizer, special_ids(tokenizer, path)


def _open_blocks(path: Path) -> pq.ParquetFile:
    file = open_parquet(path)
    schema = file.schema_arrow
    if metadata(schema).get("modality") != "text":
        raise InputError(f"{path}: not a text split (no modality 'text' in its metadata)")
    kind = schema.field("tokens").type if "tokens" in schema.names else None
    if schema.names != ["id", "tokens"] or schema.field("id").type != pa.int64() or not (
            pa.types.is_fixed_size_list(kind) and kind.value_type == pa.int32()):
        raise InputError(f"{path}: expected columns id int64, tokens fixed_size_list<int32>[L]; "
                         f"got {', '.join(f'{f.name} {f.type}' for f in schema)}")
    return file


def _arrays(table: pa.Table | pa.RecordBatch, length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = table.column("tokens")
    if isinstance(tokens, pa.ChunkedArray):
        tokens = pa.concat_arrays(tokens.chunks) if tokens.num_chunks else pa.array([], pa.list_(pa.int32(), length))
    flat = tokens.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return table.column("id").to_numpy(), flat.reshape(len(tokens), length)
