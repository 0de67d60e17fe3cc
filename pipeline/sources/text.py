"""Text datasets: documents, a byte-level BPE tokenizer, and fixed-length token blocks.

`prepare(cfg, out)` reads the documents of `cfg.dataset`:

    pydoc            the English documentation that ships with CPython (`pydoc_data.topics`,
                     one document per topic)
    FILE.txt         UTF-8 text; documents are separated by one or more blank lines
                     (a line holding only whitespace counts as blank)
    FILE.jsonl       one JSON object per line, the document in its string field
                     `cfg.text_column` (blank lines skipped; a null field is an empty document)
    FILE.parquet     one document per row of the string column `cfg.text_column`
                     (a Parquet file with a column `x` is image data; see sources.images)

Empty documents (and null rows) are dropped. The documents are shuffled with `cfg.seed` and dealt
to the splits by characters (the shares sum to 1): laid end to end in that order, the first
`shares.test` of the text is the test split, the next `shares.labeled` the labeled split, the
rest unlabeled, each document going whole to the split that holds its middle character. A
document is never in two splits, and the test split does not change when only the other
shares do.

Without `cfg.tokenizer`, a byte-level BPE of `cfg.vocab_size` entries is trained on the
labeled documents only (the teacher's training text; all of them, however many blocks
`cfg.labeled` keeps) and written as `out/tokenizer.json`; each document is preceded by
<|endoftext|> (GPT-2's bos = eos). With `cfg.tokenizer` (a local Hugging Face model or
tokenizer directory, read by `pipeline.prepared.tokens.read_tokenizer`), the documents are
tokenized with it as it is (no token added to it or to a document) and each is preceded by
its eos token (its sep token if it has none); it is saved into `out` with `save_pretrained`.
Each split is one token stream, cut into
blocks of `cfg.block_size` tokens (the tail that does not fill a block is dropped: full blocks
need no pad);
`cfg.labeled` / `unlabeled` / `test` blocks are kept from the start of each stream (null: all
of them). The files

    out/labeled.parquet, out/unlabeled.parquet, out/test.parquet

hold one row per block in the format of `pipeline.prepared.tokens`; ids are unique across
splits: labeled first, then unlabeled, then test. Same params, same Python: byte-identical
files (pydoc's text is that of the running CPython).

The text-only keys of `prepare` (text_column, shares, tokenizer, vocab_size, block_size) are ignored by the
image datasets, as `samples` is by all but mnist1d; `input_shape` is refused for text, and a
null split size for images.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config import SPLITS, PrepareConfig
from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.files import replacing
from pipeline.prepared import tokens as token_files
from pipeline.prepared.tokens import SPECIAL_TOKENS, TOKENIZER_FILE, TokenizerDir, fingerprint_of, read_tokenizer, special_ids
from pipeline.sources.images import DATASETS, DRAW_ORDER

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # byte-level BPE starts from all 256 bytes
TEXT_DATASETS = ("pydoc",)


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
    """pydoc, a .txt or .jsonl path, or a Parquet file with `cfg.text_column` and no `x` column."""
    if cfg.dataset in TEXT_DATASETS or cfg.dataset.endswith((".txt", ".jsonl")):
        return True
    path = Path(cfg.dataset)
    if cfg.dataset in DATASETS or not path.is_file() or path.suffix != ".parquet":
        return False
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return False  # sources.images reports the unreadable file
    return "x" not in names and cfg.text_column in names


def documents(cfg: PrepareConfig) -> list[str]:
    """The non-empty documents of `cfg.dataset`, in source order."""
    if cfg.dataset == "pydoc":
        from pydoc_data.topics import topics

        docs = [topics[name] for name in sorted(topics)]
    elif cfg.dataset.endswith(".txt"):
        docs = _txt_documents(Path(cfg.dataset))
    elif cfg.dataset.endswith(".jsonl"):
        docs = _jsonl_documents(Path(cfg.dataset), cfg.text_column)
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


def _jsonl_documents(path: Path, column: str) -> list[str | None]:
    """The `column` field of every line's object; a line without it names the fields it has."""
    if not path.is_file():
        raise MissingInputError(f"{path}: JSON Lines file not found")
    docs = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise InputError(f"{path}: line {number} is not JSON") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}: line {number} is a JSON {type(row).__name__}, expected an object "
                                     f"with a {column!r} field")
                if column not in row:
                    raise InputError(f"{path}: line {number} has no field {column!r} (prepare.text_column); its "
                                     f"fields: {', '.join(map(repr, row)) or 'none'}")
                if row[column] is not None and not isinstance(row[column], str):
                    raise InputError(f"{path}: line {number}: field {column!r} (prepare.text_column) is a "
                                     f"{type(row[column]).__name__}, expected a string")
                docs.append(row[column])
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return docs


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
    if cfg.tokenizer is None and cfg.vocab_size < MIN_VOCAB:
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
    bounds = np.cumsum([getattr(cfg.shares, name) for name in DRAW_ORDER])[:-1]
    where = np.searchsorted(bounds, middles, side="right")
    return {name: order[where == k].tolist() for k, name in enumerate(DRAW_ORDER)}


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's pre-tokenizer) with SPECIAL_TOKENS first; deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(docs, trainer)
    return tokenizer


def trained_tokenizer(docs: list[str], vocab_size: int, out: Path) -> TokenizerDir:
    """`train_tokenizer`'s BPE as the tokenizer `prepare` writes into `out`."""
    backend = train_tokenizer(docs, vocab_size)
    return TokenizerDir(Path(out), backend, special_ids(backend, "the trained BPE"), fingerprint_of(backend),
                        backend.get_vocab_size())


def stream_blocks(tokenizer: TokenizerDir, docs: list[str], block_size: int) -> np.ndarray:
    """(N, block_size) int32: eos + doc, for every doc, cut into whole blocks."""
    eos = tokenizer.special.eos
    pieces = [np.array([eos, *ids], np.int32) for ids in tokenizer.encode(docs)]
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
    if cfg.tokenizer is None:
        tokenizer = trained_tokenizer([docs[i] for i in dealt["labeled"]], cfg.vocab_size, Path(out))
    else:
        tokenizer = read_tokenizer(Path(cfg.tokenizer), "prepare.tokenizer")
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
    with replacing(out) as tmp:
        tokenizer.save(tmp)
        if read_tokenizer(tmp).fingerprint != tokenizer.fingerprint:
            raise InputError(f"{cfg.tokenizer}: the tokenizer reads back from {out} as another tokenizer "
                             "(save_pretrained changed it); save it with this transformers first")
        meta = {"modality": "text", "dataset": cfg.dataset, "block_size": str(cfg.block_size),
                "vocab_size": str(tokenizer.vocab_size), "tokenizer_sha256": tokenizer.fingerprint}
        if cfg.tokenizer is not None:
            meta["tokenizer_source"] = str(cfg.tokenizer)
        first = 0
        for name in SPLITS:
            ids = np.arange(first, first + len(blocks[name]), dtype=np.int64)
            token_files.write_blocks(tmp / f"{name}.parquet", ids, blocks[name],
                                     {**meta, "documents": str(len(dealt[name]))})
            first += len(blocks[name])
    return TextPrepared(blocks, {name: len(dealt[name]) for name in SPLITS},
                        {name: out / f"{name}.parquet" for name in SPLITS}, out / TOKENIZER_FILE,
                        tokenizer.vocab_size)
