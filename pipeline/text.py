"""Text data: documents, a byte-level BPE tokenizer, and fixed-length token blocks in Parquet.

`prepare(cfg, out)` reads the documents of `cfg.dataset`:

    pydoc            the English documentation that ships with CPython (`pydoc_data.topics`,
                     one document per topic)
    FILE.txt         UTF-8 text; documents are separated by one or more blank lines
                     (a line holding only whitespace counts as blank)
    FILE.parquet     one document per row of the string column `cfg.text_column`
                     (a Parquet file with a column `x` is image data; see pipeline.data)

Empty documents (and null rows) are dropped. The documents are shuffled with `cfg.seed` and dealt
to the splits by characters (the shares sum to 1): laid end to end in that order, the first
`shares.test` of the text is the test split, the next `shares.labeled` the labeled split, the
rest unlabeled, each document going whole to the split that holds its middle character. A
document is never in two splits, and the test split does not change when only the other
shares do.

The tokenizer is trained on the labeled documents only (the teacher's training text; all of
them, however many blocks `cfg.labeled` keeps) and written as `out/tokenizer.json`. Each split
is one token stream, every document preceded by <|endoftext|> (GPT-2's bos = eos), cut into
blocks of `cfg.block_size` tokens (the tail that does not fill a block is dropped);
`cfg.labeled` / `unlabeled` / `test` blocks are kept from the start of each stream (null: all
of them). The files

    out/labeled.parquet, out/unlabeled.parquet, out/test.parquet

hold one row per block: `id` int64 (unique across splits: labeled first, then unlabeled, then
test) and `tokens` fixed_size_list<int32>[block_size], with the key-value metadata `modality`
("text"), `dataset`, `block_size`, `vocab_size`, `tokenizer_sha256` and `documents` (how many
documents were dealt to the split). Same params, same Python: byte-identical files (pydoc's
text is that of the running CPython).

The text-only keys of `prepare` (text_column, shares, vocab_size, block_size) are ignored by the
image datasets, as `samples` is by all but mnist1d; `input_shape` is refused for text, and a
null split size for images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline import data
from pipeline.config import SPLITS, PrepareConfig
from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.files import file_sha256

TOKENIZER_FILE = "tokenizer.json"
# [PAD] pads and never takes part in a loss; <|endoftext|> starts every document (bos and eos,
# as in GPT-2); [MASK] is the masked LM's mask. The trainer gives them ids 0, 1, 2.
PAD, EOS, MASK = "[PAD]", "<|endoftext|>", "[MASK]"
SPECIAL_TOKENS = (PAD, EOS, MASK)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # byte-level BPE starts from all 256 bytes
TEXT_DATASETS = ("pydoc",)


class SpecialIds(NamedTuple):
    pad: int
    eos: int
    mask: int


@dataclass
class TextPrepared:
    """What `prepare` wrote: the kept blocks of each split and where they are."""

    blocks: dict[str, np.ndarray]  # split -> (N, block_size) int32
    documents: dict[str, int]  # split -> documents in its stream
    paths: dict[str, Path]
    tokenizer: Path
    vocab_size: int


# --- sources ----------------------------------------------------------------------------------


def is_text(cfg: PrepareConfig) -> bool:
    """pydoc, a .txt path, or a Parquet file with `cfg.text_column` and no `x` column."""
    if cfg.dataset in TEXT_DATASETS or cfg.dataset.endswith(".txt"):
        return True
    path = Path(cfg.dataset)
    if cfg.dataset in data.DATASETS or not path.is_file() or path.suffix != ".parquet":
        return False
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return False  # pipeline.data reports the unreadable file
    return "x" not in names and cfg.text_column in names


def documents(cfg: PrepareConfig) -> list[str]:
    """The non-empty documents of `cfg.dataset`, in source order."""
    if cfg.dataset == "pydoc":
        from pydoc_data.topics import topics

        docs = [topics[name] for name in sorted(topics)]
    elif cfg.dataset.endswith(".txt"):
        docs = _txt_documents(Path(cfg.dataset))
    else:
        docs = _parquet_documents(Path(cfg.dataset), cfg.text_column)
    docs = [re.sub(r"\A(?:[ \t]*\n)+", "", d).rstrip() for d in docs if d is not None and d.strip()]
    if not docs:
        raise InputError(f"{cfg.dataset}: no text (every document is empty)")
    return docs


def _txt_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingInputError(f"{path}: text file not found")
    try:
        text = path.read_text(encoding="utf-8")  # universal newlines: \r\n -> \n
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return re.split(r"\n\s*\n", text)  # `\s*` may span lines: several blank lines are one break


def _parquet_documents(path: Path, column: str) -> list[str]:
    try:
        table = pq.read_table(path, columns=[column])
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read column {column!r} ({exc})") from None
    kind = table.schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{path}: column {column!r} (prepare.text_column) has type {kind}, expected strings")
    return table.column(column).to_pylist()


def check_config(cfg: PrepareConfig) -> None:
    for key in (*SPLITS, "seed"):
        value = getattr(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"prepare.{key}: {value} must be >= 0 (or null for every block)")
    if cfg.input_shape is not None:
        raise ConfigError(f"prepare.input_shape: {cfg.input_shape} is for image data, not text ({cfg.dataset})")
    if cfg.block_size < 2:
        raise ConfigError(f"prepare.block_size: {cfg.block_size} must be >= 2 (a token and its successor)")
    if cfg.vocab_size < MIN_VOCAB:
        raise ConfigError(f"prepare.vocab_size: {cfg.vocab_size} must be >= {MIN_VOCAB} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    shares = [getattr(cfg.shares, name) for name in SPLITS]
    for name, share in zip(SPLITS, shares):
        if share < 0:
            raise ConfigError(f"prepare.shares.{name}: {share} must be >= 0")
    if abs(sum(shares) - 1) > 1e-9:
        raise ConfigError(f"prepare.shares: {' + '.join(map(str, shares))} = {sum(shares):g} must sum to 1")


# --- splitting and the tokenizer --------------------------------------------------------------


def deal(lengths: list[int], cfg: PrepareConfig) -> dict[str, list[int]]:
    """Document indices per split, in the seeded order: the middle-character rule above."""
    order = np.random.default_rng(cfg.seed).permutation(len(lengths))
    sizes = np.array([lengths[i] for i in order], np.float64)
    middles = (np.cumsum(sizes) - sizes / 2) / sizes.sum()  # each document's middle, in [0, 1]
    bounds = np.cumsum([getattr(cfg.shares, name) for name in data.DRAW_ORDER])[:-1]
    where = np.searchsorted(bounds, middles, side="right")
    return {name: order[where == k].tolist() for k, name in enumerate(data.DRAW_ORDER)}


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's pre-tokenizer) with SPECIAL_TOKENS first; deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(docs, trainer)
    return tokenizer


def special_ids(tokenizer: Tokenizer, source: str | Path) -> SpecialIds:
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if None in ids:
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
        raise InputError(f"{source}: the tokenizer lacks the special tokens {missing}")
    return SpecialIds(*ids)


def stream_blocks(tokenizer: Tokenizer, docs: list[str], block_size: int) -> np.ndarray:
    """(N, block_size) int32: <|endoftext|> + doc, for every doc, cut into whole blocks."""
    eos = tokenizer.token_to_id(EOS)
    pieces = [np.array([eos, *encoding.ids], np.int32) for encoding in tokenizer.encode_batch(docs)]
    stream = np.concatenate(pieces) if pieces else np.empty(0, np.int32)
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size)


# --- writing ----------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig, out: Path) -> TextPrepared:
    """Read, deal, tokenize and write `cfg.dataset` to `out` (replaced as a whole when done)."""
    check_config(cfg)
    docs = documents(cfg)
    dealt = deal([len(d) for d in docs], cfg)
    if not dealt["labeled"]:
        raise ConfigError(f"prepare.shares.labeled: the labeled split of {cfg.dataset} got no document "
                          f"({len(docs)} documents); the tokenizer and the teacher train on it")
    tokenizer = train_tokenizer([docs[i] for i in dealt["labeled"]], cfg.vocab_size)
    blocks = {}
    for name in SPLITS:
        made = stream_blocks(tokenizer, [docs[i] for i in dealt[name]], cfg.block_size)
        asked = getattr(cfg, name)
        if asked is None and not len(made):
            raise ConfigError(f"prepare.{name}: the {name} documents of {cfg.dataset} hold no whole block of "
                              f"{cfg.block_size} tokens; raise prepare.shares.{name} or lower prepare.block_size")
        if asked is not None and asked > len(made):
            raise ConfigError(f"prepare.{name}: asked for {asked} blocks of {cfg.block_size} tokens but the "
                              f"{name} documents of {cfg.dataset} hold {len(made)}; lower it (null = all)")
        blocks[name] = made[:asked]
    out = Path(out)

    def write(tmp: Path) -> None:
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        meta = {"modality": "text", "dataset": cfg.dataset, "block_size": str(cfg.block_size),
                "vocab_size": str(tokenizer.get_vocab_size()), "tokenizer_sha256": file_sha256(tmp / TOKENIZER_FILE)}
        first = 0
        for name in SPLITS:
            ids = np.arange(first, first + len(blocks[name]), dtype=np.int64)
            write_blocks(tmp / f"{name}.parquet", ids, blocks[name], {**meta, "documents": str(len(dealt[name]))})
            first += len(blocks[name])

    data.write_dir(out, write)
    return TextPrepared(blocks, {name: len(dealt[name]) for name in SPLITS},
                        {name: out / f"{name}.parquet" for name in SPLITS}, out / TOKENIZER_FILE,
                        tokenizer.get_vocab_size())


def write_blocks(path: Path, ids: np.ndarray, tokens: np.ndarray, meta: dict[str, str]) -> None:
    """One split file: `id` int64, `tokens` fixed_size_list<int32>[L], written atomically."""
    length = tokens.shape[1]
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False),
                        pa.field("tokens", pa.list_(pa.int32(), length), nullable=False)]).with_metadata(meta)
    flat = pa.array(np.ascontiguousarray(tokens, np.int32).reshape(-1), pa.int32())
    table = pa.table({"id": pa.array(ids, pa.int64()), "tokens": pa.FixedSizeListArray.from_arrays(flat, length)},
                     schema=schema)
    data._write_atomic(table, path, data.ROW_GROUP_ROWS)


# --- reading (used by the other stages) -------------------------------------------------------


def modality(path: Path) -> str:
    """"text" or "image": what `kd prepare` wrote in the split file at `path` (footer only)."""
    return data._metadata(data._open(path).schema_arrow).get("modality", "image")


def split_info(path: Path) -> dict:
    """rows, block_size, vocab_size, tokenizer_sha256, documents, dataset, from the footer only."""
    file = _open_text(path)
    meta = data._metadata(file.schema_arrow)
    try:
        return {"rows": file.metadata.num_rows, "block_size": int(meta["block_size"]),
                "vocab_size": int(meta["vocab_size"]), "tokenizer_sha256": meta["tokenizer_sha256"],
                "documents": int(meta["documents"]), "dataset": meta["dataset"]}
    except (KeyError, ValueError) as exc:
        raise InputError(f"{path}: metadata {exc} missing or not an integer (expected what `kd prepare` writes)") from None


def read_blocks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ids (N,) int64 and tokens (N, block_size) int64 of a whole split file."""
    file = _open_text(path)
    return _arrays(file.read(), file.schema_arrow.field("tokens").type.list_size)


def iter_blocks(path: Path, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, tokens) batches of at most batch_rows rows, in file order."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows: {batch_rows} must be >= 1")
    file = _open_text(path)
    length = file.schema_arrow.field("tokens").type.list_size
    for batch in file.iter_batches(batch_size=batch_rows):
        yield _arrays(batch, length)


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


def _open_text(path: Path) -> pq.ParquetFile:
    file = data._open(path)
    schema = file.schema_arrow
    if data._metadata(schema).get("modality") != "text":
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
