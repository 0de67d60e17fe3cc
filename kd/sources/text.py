"""Text datasets: documents, a byte-level BPE tokenizer, and fixed-length token blocks.

`prepare(cfg, out)` reads the documents of `cfg.dataset`:

    pydoc            the English documentation that ships with CPython (`pydoc_data.topics`,
                     one document per topic; `builtin.pydoc`)
    addition         instruction pairs made here: `cfg.samples` distinct sums of two numbers
                     below 100, "12+85=" -> "97", drawn from `cfg.seed` (`builtin.addition`)
    FILE.txt         UTF-8 text; documents are separated by one or more blank lines
                     (a line holding only whitespace counts as blank)
    FILE.jsonl       one JSON object per line, the document in its string field
                     `cfg.text_column` (blank lines skipped; a null field is an empty document)
    FILE.parquet     one document per row of the string column `cfg.text_column`
                     (a Parquet file with a column `x` is image data; see sources.images)

(pydoc and addition are the built-ins of kind documents and examples in `builtin.SOURCES`.)

Instruction data instead (`cfg.prompt_column` + `cfg.response_column`, or `cfg.messages_column`,
from a .jsonl or Parquet file; or the built-in `addition`): one example per block, padded, with
a `loss_mask` that is True at the response tokens only (`examples`, `encode_example`,
`example_blocks`); examples are dealt to the splits as documents are.

Empty documents (and null rows) are dropped. With `cfg.keep` (a regex), only the documents whose
first line it matches are kept, after the deal: a subset (a "task") keeps the splits its
documents have in the whole, so the task's test documents are never another run's training
text. The documents are shuffled with `cfg.seed` and dealt to the splits by characters (the
shares sum to 1): laid end to end in that order, the first `shares.test` of the text is the test
split, the next `shares.labeled` the labeled split, the rest unlabeled, each document going
whole to the split that holds its middle character. A document is never in two splits, and the
test split does not change when only the other shares do.

Without `cfg.tokenizer`, a byte-level BPE of `cfg.vocab_size` entries is trained on the
labeled documents only (the teacher's training text; all of them, however many blocks
`cfg.labeled` keeps) and written as `out/tokenizer.json`; each document is preceded by
<|endoftext|> (GPT-2's bos = eos). With `cfg.tokenizer` (a local Hugging Face model or
tokenizer directory, read by `kd.prepared.tokens.read_tokenizer`), the documents are
tokenized with it as it is (no token added to it or to a document) and each is preceded by
its eos token (its sep token if it has none); it is saved into `out` with `save_pretrained`.
Each split is one token stream, cut into
blocks of `cfg.block_size` tokens (the tail that does not fill a block is dropped: full blocks
need no pad);
`cfg.labeled` / `unlabeled` / `test` blocks are kept from the start of each stream (null: all
of them). The files

    out/labeled.parquet, out/unlabeled.parquet, out/test.parquet

hold one row per block in the format of `kd.prepared.tokens`; ids are unique across
splits: labeled first, then unlabeled, then test. Same params, same Python: byte-identical
files (pydoc's text is that of the running CPython).

The text-only keys of `prepare` (text_column, shares, tokenizer, vocab_size, block_size) are ignored by the
image datasets, as `samples` is by all but mnist1d; `input_shape` is refused for text, and a
null split size for images.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kd.config import SPLITS, PrepareConfig
from kd.errors import ConfigError, InputError, MissingInputError
from kd.files import replacing
from kd.prepared import tokens as token_files
from kd.prepared.tokens import SPECIAL_TOKENS, TOKENIZER_FILE, TokenizerDir, fingerprint_of, read_tokenizer, special_ids
from kd.sources.builtin import SOURCES, kind_of
from kd.sources.splits import DRAW_ORDER

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # byte-level BPE starts from all 256 bytes
TEXT_KINDS = ("documents", "examples")  # the kinds of built-in (builtin.KINDS) read here


@dataclass
class TextPrepared:
    """What `prepare` wrote: the kept blocks of each split and where they are."""

    blocks: dict[str, np.ndarray]  # split -> (N, block_size) int32
    documents: dict[str, int]  # split -> documents in its stream
    paths: dict[str, Path]
    tokenizer: Path
    vocab_size: int
    masks: dict[str, np.ndarray] | None = None  # split -> (N, block_size) bool loss masks (instruction data)
    # examples dropped, reason -> count: "source" (before dealing: no assistant turn, empty
    # response) and per split (no response token left within the block)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)


# --- sources ----------------------------------------------------------------------------------


def is_text(cfg: PrepareConfig) -> bool:
    """A built-in text dataset (pydoc, addition), a .txt or .jsonl path, or a Parquet file with
    `cfg.text_column` and no `x` column."""
    if kind_of(cfg.dataset) in TEXT_KINDS or cfg.dataset.endswith((".txt", ".jsonl")):
        return True
    path = Path(cfg.dataset)
    if cfg.dataset in SOURCES or not path.is_file() or path.suffix != ".parquet":
        return False
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return False  # sources.images reports the unreadable file
    return "x" not in names and any(column in names for column in text_columns(cfg))


def text_columns(cfg: PrepareConfig) -> list[str]:
    """The columns (JSON fields) a text source is read from: the chat's, the prompt's and the
    response's, or the documents'."""
    if cfg.messages_column is not None:
        if cfg.prompt_column is not None or cfg.response_column is not None:
            raise ConfigError("prepare.messages_column: give either messages_column or prompt_column + "
                              "response_column, not both")
        return [cfg.messages_column]
    if (cfg.prompt_column is None) != (cfg.response_column is None):
        given, missing = (("prompt_column", "response_column") if cfg.response_column is None
                          else ("response_column", "prompt_column"))
        raise ConfigError(f"prepare.{given}: instruction data needs prepare.{missing} too")
    if cfg.prompt_column is not None:
        return [cfg.prompt_column, cfg.response_column]
    return [cfg.text_column]


def is_instruction(cfg: PrepareConfig) -> bool:
    """Prompt/response pairs or chats: only response tokens are predicted."""
    return cfg.messages_column is not None or cfg.prompt_column is not None or kind_of(cfg.dataset) == "examples"


def documents(cfg: PrepareConfig) -> list[str]:
    """The non-empty documents of `cfg.dataset`, in source order."""
    if kind_of(cfg.dataset) == "documents":
        docs = SOURCES[cfg.dataset].make(cfg)
    elif cfg.dataset.endswith(".txt"):
        docs = _txt_documents(Path(cfg.dataset))
    else:
        docs = [row[0] for row in records(cfg, [cfg.text_column])]
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


def records(cfg: PrepareConfig, columns: list[str]) -> list[tuple]:
    """The values of `columns` in every row of a .jsonl or Parquet `cfg.dataset`, in order; a
    missing column names the ones there are."""
    path = Path(cfg.dataset)
    if not path.is_file():
        raise MissingInputError(f"{path}: {'JSON Lines' if cfg.dataset.endswith('.jsonl') else 'Parquet'} file "
                                "not found")
    keys = {column: _key_of(cfg, column) for column in columns}
    strings = [column for column in columns if column != cfg.messages_column]
    read = _jsonl_records if cfg.dataset.endswith(".jsonl") else _parquet_records
    return read(path, keys, strings)


def _key_of(cfg: PrepareConfig, column: str) -> str:
    """The params key that named a column, for messages."""
    for key in ("messages_column", "prompt_column", "response_column", "text_column"):
        if getattr(cfg, key) == column:
            return f"prepare.{key}"
    return "prepare"


def _jsonl_records(path: Path, columns: dict[str, str], strings: list[str]) -> list[tuple]:
    rows = []
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
                                     f"with the fields {', '.join(map(repr, columns))}")
                for column in columns:
                    if column not in row:
                        raise InputError(f"{path}: line {number} has no field {column!r} ({columns[column]}); its "
                                         f"fields: {', '.join(map(repr, row)) or 'none'}")
                    if column in strings and row[column] is not None and not isinstance(row[column], str):
                        raise InputError(f"{path}: line {number}: field {column!r} ({columns[column]}) is a "
                                         f"{type(row[column]).__name__}, expected a string")
                rows.append(tuple(row[column] for column in columns))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return rows


def _parquet_records(path: Path, columns: dict[str, str], strings: list[str]) -> list[tuple]:
    try:
        schema = pq.read_schema(path)
        for column, key in columns.items():
            if column not in schema.names:
                raise InputError(f"{path}: no column {column!r} ({key}); its columns: "
                                 f"{', '.join(map(repr, schema.names))}")
            kind = schema.field(column).type
            if column in strings and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise InputError(f"{path}: column {column!r} ({key}) has type {kind}, expected strings")
        table = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read columns {list(columns)} ({exc})") from None
    return list(zip(*(table.column(column).to_pylist() for column in columns)))


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


# --- instruction and chat data ----------------------------------------------------------------


def examples(cfg: PrepareConfig) -> tuple[list[tuple], dict[str, int]]:
    """The instruction examples of `cfg.dataset`: (prompt, response) pairs, or chats (a list of
    {role, content} with at least one assistant turn), and the rows dropped by reason: a pair
    with an empty response (`empty_response`), a null chat or one without an assistant turn
    (`no_assistant_turn`)."""
    if kind_of(cfg.dataset) == "examples":
        if cfg.messages_column is not None or cfg.prompt_column is not None:
            raise ConfigError(f"prepare.{'messages_column' if cfg.messages_column else 'prompt_column'}: the built-in "
                              f"{cfg.dataset} dataset has its own prompts and responses; set it to null")
        return SOURCES[cfg.dataset].make(cfg), {}
    if kind_of(cfg.dataset) == "documents" or cfg.dataset.endswith(".txt"):
        raise ConfigError(f"prepare.{'messages_column' if cfg.messages_column else 'prompt_column'}: instruction "
                          f"data is read from a .jsonl or Parquet file, not {cfg.dataset}")
    rows = records(cfg, text_columns(cfg))
    if cfg.messages_column is None:
        kept, reason = [(p or "", r) for p, r in rows if r is not None and r.strip()], "empty_response"
    else:
        kept = [(chat,) for number, (chat,) in enumerate(rows, 1) if _chat(cfg, chat, number)]
        reason = "no_assistant_turn"
    if not kept:
        raise InputError(f"{cfg.dataset}: no example with a response (every {text_columns(cfg)[-1]!r} is empty)")
    return kept, ({reason: len(rows) - len(kept)} if len(rows) > len(kept) else {})


def _chat(cfg: PrepareConfig, chat: Any, number: int) -> bool:
    """Whether row `number`'s chat has an assistant turn; refuse one that is not a chat."""
    if chat is None:
        return False
    if not isinstance(chat, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                             and isinstance(m.get("content"), str) for m in chat):
        raise InputError(f"{cfg.dataset}: row {number}: {cfg.messages_column!r} (prepare.messages_column) is not a "
                         "list of {role, content} messages with string values")
    return any(m["role"] == "assistant" for m in chat)


def encode_example(tokenizer: TokenizerDir, example: tuple) -> tuple[list[int], list[bool]]:
    """An example's ids and which of them are response tokens. A pair: the start token (bos,
    else eos), the prompt, the response and eos, the last two the response. A chat: the
    tokenizer's chat template; each assistant turn is the tokens between the conversation
    before it rendered with the generation prompt and the conversation through it."""
    if len(example) == 2:
        prompt, response = tokenizer.encode(list(example))
        special = tokenizer.special
        start = special.bos if special.bos is not None else special.eos
        return [start, *prompt, *response, special.eos], [False] * (1 + len(prompt)) + [True] * (len(response) + 1)
    return chat_tokens(tokenizer, example[0])


def chat_tokens(tokenizer: TokenizerDir, chat: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """A chat's ids and which are assistant tokens: each assistant turn's content and its
    end-of-turn token (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), nothing the template puts
    after that (ChatML's newline). A template with `{% generation %}` marks says it itself (as
    `apply_chat_template(..., return_assistant_tokens_mask=True)` reads them). Otherwise each turn
    is found by rendering prefixes: its tokens follow the conversation before it rendered with
    the generation prompt; what the template adds after an assistant's content is the rendering
    of an empty turn past that prompt, and its first special token ends the turn."""
    hf = tokenizer.hf
    render = functools.partial(hf.apply_chat_template, tokenize=True, return_dict=False)
    if "{% generation %}" in (hf.chat_template or "").replace("{%- generation %}", "{% generation %}"):
        out = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    ids = list(render(chat))
    mask = [False] * len(ids)
    special = set(hf.all_special_ids) | {i for i, token in hf.added_tokens_decoder.items() if token.special}
    for turn, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        before, through = list(render(chat[:turn], add_generation_prompt=True)), list(render(chat[:turn + 1]))
        empty = list(render([*chat[:turn], {**message, "content": ""}]))
        after = empty[len(before):]  # e.g. [<|im_end|>, "\n"]
        if (ids[:len(through)] != through or through[:len(before)] != before or empty[:len(before)] != before
                or through[len(through) - len(after):] != after):
            raise InputError(f"{tokenizer.directory}: the chat template renders a conversation's start differently "
                             "from the whole conversation; kd finds the assistant turns by rendering prefixes")
        ends = [i for i, token in enumerate(after) if token in special]
        taught = len(through) - len(after) + (ends[0] + 1 if ends else len(after))
        mask[len(before):taught] = [True] * (taught - len(before))
    return ids, mask


def example_blocks(encoded: list[tuple[list[int], list[bool]]], block_size: int, pad: int
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """One block per example: (tokens (N, L) int32, loss_mask (N, L) bool, examples dropped by
    reason: `no_response_token`).
    An example longer than the block is cut at its end; the rest of a block is `pad`, never
    predicted. An example left with no response token after its first is dropped (nothing to
    predict: position 0 has no context)."""
    tokens = np.full((len(encoded), block_size), pad, np.int32)
    mask = np.zeros((len(encoded), block_size), bool)
    for row, (ids, is_response) in enumerate(encoded):
        n = min(len(ids), block_size)
        tokens[row, :n], mask[row, :n] = ids[:n], is_response[:n]
    mask[:, 0] = False
    kept = mask.any(1)
    dropped = int((~kept).sum())
    return tokens[kept], mask[kept], ({"no_response_token": dropped} if dropped else {})


# --- writing ----------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig, out: Path) -> TextPrepared:
    """Read, deal, tokenize and write `cfg.dataset` to `out` (replaced as a whole when done)."""
    check_config(cfg)
    instruction = is_instruction(cfg)
    items, source_dropped = examples(cfg) if instruction else (documents(cfg), {})
    texts = [_plain(item) for item in items] if instruction else items
    dealt = deal([len(t) for t in texts], cfg)
    if cfg.keep is not None:
        dealt = {name: [i for i in chosen if kept(cfg, texts[i])] for name, chosen in dealt.items()}
    unit = "example" if instruction else "document"
    if not dealt["labeled"]:
        raise ConfigError(f"prepare.shares.labeled: the labeled split of {cfg.dataset} got no {unit} "
                          f"({len(items)} {unit}s); the tokenizer and the teacher train on it")
    if cfg.tokenizer is None:
        tokenizer = trained_tokenizer([texts[i] for i in dealt["labeled"]], cfg.vocab_size, Path(out))
    else:
        tokenizer = read_tokenizer(Path(cfg.tokenizer), "prepare.tokenizer")
    if cfg.messages_column is not None and getattr(tokenizer.hf, "chat_template", None) is None:
        raise ConfigError(f"prepare.messages_column: chats are rendered with the tokenizer's chat template, and "
                          f"{cfg.tokenizer or 'the BPE kd trains'} has none; set prepare.tokenizer to a directory "
                          "whose tokenizer has one, or give prompt_column + response_column")
    blocks, masks, dropped = {}, {}, {}
    for name in SPLITS:
        if instruction:
            pad = tokenizer.special.pad if tokenizer.special.pad is not None else tokenizer.special.eos
            encoded = [encode_example(tokenizer, items[i]) for i in dealt[name]]
            made, mask, dropped[name] = example_blocks(encoded, cfg.block_size, pad)
        else:
            made, mask = stream_blocks(tokenizer, [items[i] for i in dealt[name]], cfg.block_size), None
        asked = getattr(cfg, name)
        if asked is None and not len(made):
            raise ConfigError(f"prepare.{name}: the {name} {unit}s of {cfg.dataset} hold no "
                              + (f"response within {cfg.block_size} tokens; raise prepare.shares.{name} or "
                                 "prepare.block_size" if instruction else
                                 f"whole block of {cfg.block_size} tokens; raise prepare.shares.{name} or lower "
                                 "prepare.block_size"))
        if asked is not None and asked > len(made):
            raise ConfigError(f"prepare.{name}: asked for {asked} blocks of {cfg.block_size} tokens but the "
                              f"{name} {unit}s of {cfg.dataset} hold {len(made)}; lower it (null = all)")
        blocks[name] = made[:asked]
        masks[name] = None if mask is None else mask[:asked]
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
            extra = {"examples_dropped": json.dumps({**source_dropped, **dropped[name]})} if instruction else {}
            token_files.write_blocks(tmp / f"{name}.parquet", ids, blocks[name],
                                     {**meta, "documents": str(len(dealt[name])), **extra}, masks[name])
            first += len(blocks[name])
    return TextPrepared(blocks, {name: len(dealt[name]) for name in SPLITS},
                        {name: out / f"{name}.parquet" for name in SPLITS}, out / TOKENIZER_FILE,
                        tokenizer.vocab_size, masks if instruction else None,
                        {"source": source_dropped, **dropped} if instruction else {})


def kept(cfg: PrepareConfig, document: str) -> bool:
    """Whether `cfg.keep` matches the document's first line (its title)."""
    try:
        return re.search(cfg.keep, document.split("\n", 1)[0]) is not None
    except re.error as exc:
        raise ConfigError(f"prepare.keep: {cfg.keep!r} is not a regular expression ({exc})") from None


def _plain(example: tuple) -> str:
    """An example's text, to deal it by characters and to train a BPE on."""
    if len(example) == 2:
        return f"{example[0]}\n{example[1]}"
    return "\n".join(message["content"] for message in example[0])
