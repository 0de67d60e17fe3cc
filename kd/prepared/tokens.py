"""Token blocks in the prepared format, and the tokenizer of a prepared directory.

Each split file holds one row per block: `id` int64 (unique across splits) and `tokens`
fixed_size_list<int32>[block_size], and for instruction and chat data `loss_mask`
fixed_size_list<bool>[block_size], True at the response tokens, the only ones a model is
taught to predict (an example's prompt and the padding after it are False). A split that
`kd generate` wrote also holds `logprob` fixed_size_list<float32>[block_size]: at each response
token, the log-probability the model that wrote it gave it (temperature 1), 0 elsewhere. With the
key-value metadata `modality` ("text"),
`dataset`, `block_size`, `vocab_size`, `tokenizer_sha256` and `documents` (how many documents
were dealt to the split); `tokenizer_source` names the directory of a Hugging Face tokenizer
(`prepare.tokenizer`). The directory's tokenizer files are the ones the blocks were cut
with; `load_tokenizer` checks their fingerprint against the splits' metadata.

A tokenizer directory is either kd's own (`tokenizer.json` alone: the byte-level BPE that
`kd prepare` trains, with the special tokens [PAD], <|endoftext|>, [MASK]) or a Hugging Face
one (a `tokenizer_config.json` beside it: loaded with `AutoTokenizer`, local files only, no
remote code, its special tokens as they are). A tokenizer's fingerprint is the sha256 of its
`tokenizers` JSON as `tokenizers` writes it (`to_str(pretty=True)`): for a tokenizer saved by
`tokenizers` or `transformers` that is the sha256 of its `tokenizer.json`, so kd's own keeps
the figure it always had; two directories with the same fingerprint turn text into the same
ids (the ids' tokens, merges, normalisation and added tokens are all in that JSON), whatever
else their files say.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from kd.errors import InputError, MissingInputError
from kd.prepared import ROW_GROUP_ROWS, metadata, open_parquet, read_row_range, write_atomic

TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # beside tokenizer.json: a Hugging Face tokenizer
# The files a Hugging Face tokenizer may be saved as (what `kd prepare` and a student copy, and
# what a teacher's fingerprint covers besides its weights and config).
TOKENIZER_FILES = (TOKENIZER_FILE, HF_TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
# kd's own BPE: [PAD] pads and never takes part in a loss; <|endoftext|> starts every document
# (bos and eos, as in GPT-2); [MASK] is the masked LM's mask. The trainer gives them ids 0, 1, 2.
PAD, EOS, MASK = "[PAD]", "<|endoftext|>", "[MASK]"
SPECIAL_TOKENS = (PAD, EOS, MASK)
LOGPROB = "logprob"  # the column of a written split's per-token log-probabilities (`kd generate`)


class SpecialIds(NamedTuple):
    """The ids a tokenizer gives its special tokens. `eos` separates documents in a prepared
    stream (a Hugging Face tokenizer without an eos token: its sep token); a tokenizer may have
    no pad (full blocks need none) and no mask (a causal LM's)."""

    pad: int | None
    eos: int
    mask: int | None
    bos: int | None = None


def special_ids(tokenizer: Tokenizer, source: str | Path) -> SpecialIds:
    """kd's own BPE: its three special tokens by name."""
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if None in ids:
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
        raise InputError(f"{source}: the tokenizer lacks the special tokens {missing}")
    return SpecialIds(*ids)


@dataclass
class TokenizerDir:
    """A tokenizer read from a directory: what maps text to ids and what identifies it."""

    directory: Path
    backend: Tokenizer  # the `tokenizers` object the ids come from
    special: SpecialIds
    fingerprint: str  # sha256 of backend.to_str(pretty=True) (see the module's docstring)
    vocab_size: int  # how many ids it can give (added tokens included)
    hf: Any = None  # the `transformers` tokenizer, None for kd's own BPE

    def describe(self) -> str:
        """For messages: where it is, its fingerprint (short) and its vocabulary."""
        return f"{self.directory} (sha256 {self.fingerprint[:12]}, vocabulary {self.vocab_size})"

    def encode(self, docs: list[str]) -> list[list[int]]:
        """The ids of each document as they are: no special token added."""
        if self.hf is None:
            return [encoding.ids for encoding in self.backend.encode_batch(docs)]
        return self.hf(docs, add_special_tokens=False)["input_ids"]

    def save(self, directory: Path) -> None:
        """Write it into `directory`: kd's BPE as tokenizer.json, a Hugging Face tokenizer with
        `save_pretrained` (which reads back to the same fingerprint)."""
        if self.hf is None:
            self.backend.save(str(Path(directory) / TOKENIZER_FILE))
        else:
            self.hf.save_pretrained(directory)


def fingerprint_of(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str(pretty=True).encode()).hexdigest()


def read_tokenizer(directory: Path, what: str = "tokenizer") -> TokenizerDir:
    """The tokenizer in `directory`: a Hugging Face one when a tokenizer_config.json is there,
    else kd's own tokenizer.json. `what` names the directory's role in messages."""
    directory = Path(directory)
    if (directory / HF_TOKENIZER_CONFIG).is_file():
        return _read_hf_tokenizer(directory, what)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise MissingInputError(f"{directory}: no tokenizer ({TOKENIZER_FILE} or {HF_TOKENIZER_CONFIG}) in the "
                                f"{what} directory")
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise InputError(f"{path}: not a tokenizers file ({str(exc).splitlines()[0]})") from None
    return TokenizerDir(directory, backend, special_ids(backend, path), fingerprint_of(backend),
                        backend.get_vocab_size())


def _read_hf_tokenizer(directory: Path, what: str) -> TokenizerDir:
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    try:
        hf = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{directory}: cannot load the {what} with AutoTokenizer "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"{directory}: the {what} is a slow (Python) tokenizer; kd needs a fast one "
                         "(`tokenizers`): save it with a transformers that converts it, as tokenizer.json")
    eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    if eos is None:
        raise InputError(f"{directory}: the {what} has no eos (or sep) token to separate documents with")
    special = SpecialIds(pad=hf.pad_token_id, eos=eos, mask=hf.mask_token_id, bos=hf.bos_token_id)
    return TokenizerDir(directory, backend, special, fingerprint_of(backend), len(hf), hf)


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files present in `directory` (TOKENIZER_FILES, in that order)."""
    return [Path(directory) / name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()]


# --- writing ----------------------------------------------------------------------------------


def write_blocks(path: Path, ids: np.ndarray, tokens: np.ndarray, meta: dict[str, str],
                 loss_mask: np.ndarray | None = None, logprob: np.ndarray | None = None) -> None:
    """One split file: `id` int64, `tokens` fixed_size_list<int32>[L] (and `loss_mask`
    fixed_size_list<bool>[L] when given, then the writer's `logprob` fixed_size_list<float32>[L]
    when given: it needs the mask), written atomically."""
    length = tokens.shape[1]
    fields = [pa.field("id", pa.int64(), nullable=False),
              pa.field("tokens", pa.list_(pa.int32(), length), nullable=False)]
    columns = {"id": pa.array(ids, pa.int64()),
               "tokens": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(tokens, np.int32).reshape(-1)),
                                                           length)}
    if loss_mask is not None:
        fields.append(pa.field("loss_mask", pa.list_(pa.bool_(), length), nullable=False))
        columns["loss_mask"] = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(loss_mask, bool).reshape(-1)),
                                                                 length)
    if logprob is not None:
        if loss_mask is None:
            raise ValueError("logprob: the log-probabilities of the response tokens need their loss_mask")
        fields.append(pa.field(LOGPROB, pa.list_(pa.float32(), length), nullable=False))
        columns[LOGPROB] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(logprob, np.float32).reshape(-1)), length)
    write_atomic(pa.table(columns, schema=pa.schema(fields).with_metadata(meta)), path, ROW_GROUP_ROWS)


# --- reading (used by the other stages) -------------------------------------------------------


def modality(path: Path) -> str:
    """"text" or "image": what `kd prepare` wrote in the split file at `path` (footer only)."""
    return metadata(open_parquet(path).schema_arrow).get("modality", "image")


def _dropped(recorded: str) -> dict[str, int]:
    """examples_dropped as written: reason -> count (JSON), or a bare count before reasons were kept."""
    value = json.loads(recorded)
    return {"unknown_reason": value} if isinstance(value, int) else value


def split_info(path: Path) -> dict:
    """rows, block_size, vocab_size, tokenizer_sha256, tokenizer_source (None for kd's own BPE),
    documents, dataset, response_only (a `loss_mask`: instruction or chat data), examples_dropped
    (reason -> count; {} where none or for plain text), from the footer only."""
    file = _open_blocks(path)
    meta = metadata(file.schema_arrow)
    try:
        return {"rows": file.metadata.num_rows, "block_size": int(meta["block_size"]),
                "response_only": "loss_mask" in file.schema_arrow.names,
                "vocab_size": int(meta["vocab_size"]), "tokenizer_sha256": meta["tokenizer_sha256"],
                "tokenizer_source": meta.get("tokenizer_source"),
                "documents": int(meta["documents"]), "dataset": meta["dataset"],
                "examples_dropped": _dropped(meta.get("examples_dropped", "{}"))}
    except (KeyError, ValueError) as exc:
        raise InputError(f"{path}: metadata {exc} missing or not an integer "
                         "(expected what `kd prepare` writes)") from None


def read_blocks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ids (N,) int64 and tokens (N, block_size) int64 of a whole split file."""
    file = _open_blocks(path)
    return _arrays(file.read(columns=["id", "tokens"]), file.schema_arrow.field("tokens").type.list_size)


def read_rows(path: Path, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and tokens of blocks [start, stop), reading only the row groups that hold them."""
    file = _open_blocks(path)
    return _arrays(read_row_range(file, start, stop, columns=["id", "tokens"]),
                   file.schema_arrow.field("tokens").type.list_size)


def writer_logprob(path: Path) -> np.ndarray | None:
    """(N, block_size) float32: at each response token (`loss_mask` True), the log-probability
    the model that wrote the split gave it (0 elsewhere); None for a split no model wrote."""
    file = _open_blocks(path)
    if LOGPROB not in file.schema_arrow.names:
        return None
    length = file.schema_arrow.field(LOGPROB).type.list_size
    column = pa.concat_arrays(file.read(columns=[LOGPROB]).column(LOGPROB).chunks) if file.metadata.num_rows \
        else pa.array([], pa.list_(pa.float32(), length))
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), length)


def predicted(path: Path, start: int = 0, stop: int | None = None) -> np.ndarray | None:
    """(N, block_size - 1) bool for blocks [start, stop) (all by default): whether position t
    is taught to predict token t + 1 (`loss_mask[:, 1:]`); None for plain text, where every
    position is."""
    file = _open_blocks(path)
    if "loss_mask" not in file.schema_arrow.names:
        return None
    length = file.schema_arrow.field("loss_mask").type.list_size
    stop = file.metadata.num_rows if stop is None else stop
    column = read_row_range(file, start, stop, columns=["loss_mask"]).column("loss_mask")
    if isinstance(column, pa.ChunkedArray):
        column = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], pa.list_(pa.bool_(), length))
    mask = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), length)
    return mask[:, 1:]


@dataclass(frozen=True)
class Turn:
    """One assistant turn of an instruction block: a maximal run of predicted tokens (for chats,
    a turn's content and its end-of-turn token; for a prompt/response pair, the response and
    eos). `prompt`: the block's tokens before the run's first; `truth`: the run's tokens; `stop`:
    its last token (the end-of-turn token), None when the run reaches the block's end (cut: no
    end token of its own, the block's end stops it)."""

    block: int  # the block's row in the split
    index: int  # 0 for the block's first turn
    prompt: list[int]
    truth: list[int]
    stop: int | None


def turns(path: Path) -> list[Turn]:
    """Every assistant turn of an instruction split, block by block (`Turn`); InputError for
    plain text, which has none."""
    _, blocks = read_blocks(path)
    keep = predicted(path)
    if keep is None:
        raise InputError(f"{path}: plain text (no loss_mask); turns are those of instruction or chat data "
                         "(prepare.prompt_column + response_column, or messages_column)")
    found = []
    for row, (block, mask) in enumerate(zip(blocks, keep)):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))  # run starts, ends
        for index, (start, end) in enumerate(zip(edges[::2], edges[1::2])):  # targets [start, end): block[start + 1 ..]
            truth = block[start + 1:end + 1].tolist()
            found.append(Turn(row, index, block[:start + 1].tolist(), truth, None if end == len(mask) else truth[-1]))
    return found


def max_token(path: Path) -> int:
    """The largest token id in a split file (-1 when it has no block)."""
    tokens = _open_blocks(path).read(columns=["tokens"]).column("tokens")
    flat = pa.chunked_array([chunk.flatten() for chunk in tokens.chunks], pa.int32())
    largest = pc.max(flat).as_py()
    return -1 if largest is None else int(largest)


def load_tokenizer(prepared: Path) -> tuple[Tokenizer, SpecialIds]:
    """The prepared directory's tokenizer (its `tokenizers` object and special ids), checked
    against the fingerprint its splits were cut with."""
    found = prepared_tokenizer(prepared)
    return found.backend, found.special


def prepared_tokenizer(prepared: Path) -> TokenizerDir:
    """The prepared directory's tokenizer, checked against the fingerprint its splits were cut with."""
    prepared = Path(prepared)
    if not (prepared / TOKENIZER_FILE).is_file():
        raise MissingInputError(f"{prepared / TOKENIZER_FILE}: tokenizer not found "
                                "(run `kd prepare` on a text dataset)")
    expected = split_info(prepared / "labeled.parquet")["tokenizer_sha256"]
    found = read_tokenizer(prepared, "prepared data's tokenizer")
    if found.fingerprint != expected:
        raise InputError(f"{prepared / TOKENIZER_FILE}: not the tokenizer labeled.parquet was cut with (sha256 "
                         "differs); run `kd prepare` again")
    return found


def _open_blocks(path: Path) -> pq.ParquetFile:
    file = open_parquet(path)
    schema = file.schema_arrow
    if metadata(schema).get("modality") != "text":
        raise InputError(f"{path}: not a text split (no modality 'text' in its metadata)")
    kind = schema.field("tokens").type if "tokens" in schema.names else None
    mask = schema.field("loss_mask").type if "loss_mask" in schema.names else None
    logprob = schema.field(LOGPROB).type if LOGPROB in schema.names else None
    if schema.names[:2] != ["id", "tokens"] or schema.names[2:] not in ([], ["loss_mask"], ["loss_mask", LOGPROB]) \
            or schema.field("id").type != pa.int64() \
            or not (pa.types.is_fixed_size_list(kind) and kind.value_type == pa.int32()) \
            or (mask is not None and mask != pa.list_(pa.bool_(), kind.list_size)) \
            or (logprob is not None and logprob != pa.list_(pa.float32(), kind.list_size)):
        raise InputError(f"{path}: expected columns id int64, tokens fixed_size_list<int32>[L] (and loss_mask "
                         f"fixed_size_list<bool>[L], then {LOGPROB} fixed_size_list<float>[L]); "
                         f"got {', '.join(f'{f.name} {f.type}' for f in schema)}")
    return file


def _arrays(table: pa.Table | pa.RecordBatch, length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = table.column("tokens")
    if isinstance(tokens, pa.ChunkedArray):
        tokens = pa.concat_arrays(tokens.chunks) if tokens.num_chunks else pa.array([], pa.list_(pa.int32(), length))
    flat = tokens.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return table.column("id").to_numpy(), flat.reshape(len(tokens), length)
