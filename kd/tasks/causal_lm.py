"""Causal language modelling: a student predicts each next token of a block.

Inputs: a block of L tokens gives L - 1 cache rows, one per predicted token (`position`
0..L-2), sample-major. Instruction and chat data (a prepared `loss_mask`) give rows for the
response positions only: position t has a row when token t + 1 is a response token, so the
number of rows varies from block to block, and every loss and score covers those rows alone. `TokenRows` wraps a Hugging Face causal LM so that the training loop
sees what it sees for images: a batch of blocks in, one row of logits per predicted token out,
lined up with the cache rows of its `block_set`. The true label of a row is the next token
(text is its own label, on every split); the baseline twin is the same student trained on the
same blocks with the next-token loss alone and the same budget ("the text alone"). A student
is any transformers model_type with a causal LM head (`arch`, `arch_kwargs`), started at
random, from the teacher's layers (`init: teacher`) or from a local pretrained directory
(`init: DIR`); it is a Hugging Face directory (`lm.save`) plus `student.json`, scored by test
perplexity and bits per character. A student with its own tokenizer (`tokenizer: DIR`, or its
`init` directory's) reads the same blocks in its own tokens (`prepared.retokenized`), each row
carrying the cache row it lines up with through the text (`align`), for the loss terms
`mapped` and `uld`; its twin learns from the same text in the same tokens.

The helpers every token task shares (the checks of a student and of its tokenizer, building
and saving, the seed table, what is measured against the cached teacher) live here too, and
so does the text teacher of either objective (`kd teacher` trains a transformers model_type;
`kd label` loads any local Hugging Face causal or masked LM and refuses data cut with another
tokenizer); `masked_lm` uses them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from kd import evaluation, features, lm, loader, metrics, speed
from kd.prepared import data_fingerprint
from kd.prepared import retokenized
from kd.prepared import tokens as text
from kd.cache import Cache, Teacher
from kd.cache.reader import SoftTargets
from kd.config import EvalConfig, LabelConfig, StudentConfig, TeacherConfig
from kd.errors import CacheError, ConfigError, InputError, MissingInputError
from kd.files import read_json, write_json
from kd.cache.batch import Batch
from kd.methods import chosen, supported
from kd.speed import count_params

NAME, OBJECTIVE = "causal_lm", "causal"
TWIN_LOSS = "next-token"  # what the baseline twin learns from, for messages
STUDENT_RECORD = "student.json"
AUTO_MODEL = AutoModelForCausalLM  # how a directory of this task loads


# Cache columns between `view` and the soft targets: the predicting token's index in its block.
ROW_COLUMNS: tuple[str, ...] = ("position",)


class Inputs:
    """Blocks of tokens for a causal language model (a Hugging Face `...ForCausalLM`)."""

    row_columns = ROW_COLUMNS

    def __init__(self, prepared: Path, splits: list[str], cfg: LabelConfig):
        if cfg.views:
            raise ConfigError(f"label.views: {cfg.views}; augmented views are for images, text has none (set 0)")
        self.infos = {s: text.split_info(prepared / f"{s}.parquet") for s in splits}
        self.block_size = self.infos["labeled"]["block_size"]
        self.input_shape = [self.block_size]
        self.per_sample = self.block_size - 1  # the most rows a block has
        self.response_only = self.infos["labeled"]["response_only"]
        masks = {s: text.predicted(prepared / f"{s}.parquet") for s in splits}
        self.counts = {s: None if m is None else m.sum(1).astype(np.int64) for s, m in masks.items()}
        self.cfg = cfg

    def samples(self, split: str) -> int:
        return self.infos[split]["rows"]

    def row_counts(self, split: str) -> np.ndarray:
        """Cache rows of each block: its predicted positions (`per_sample` for every block of
        plain text, and of a masked LM's maskings)."""
        if self.counts[split] is None:
            return np.full(self.samples(split), self.per_sample, np.int64)
        return self.counts[split]

    def check_teacher(self, teacher: Teacher, prepared: Path) -> None:
        check_teacher(teacher, prepared, self.infos)

    def header(self) -> dict[str, Any]:
        info = self.infos["labeled"]
        return {"input_shape": self.input_shape,
                "text": {"objective": OBJECTIVE, "block_size": self.block_size, "positions": self.per_sample,
                         "vocab_size": info["vocab_size"], "tokenizer_sha256": info["tokenizer_sha256"],
                         **({"response_only": True} if self.response_only else {})}}

    def probe(self) -> torch.Tensor:
        return torch.zeros(1, self.block_size, dtype=torch.long)

    def logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return next_token_logits(model, tokens.to(device_of(model)))

    def feature_spec(self, layer: str, mode: str, captured: Any) -> dict[str, Any]:
        """One hidden state per token row, cached in full."""
        if mode != "full":
            raise ConfigError(f"label.features.{layer}: mode {mode!r}; token rows cache hidden states "
                              "in full (one vector per token)")
        shape = [hidden(captured).shape[-1]]
        return {"name": layer, "mode": mode, "shape": shape, "dtype": "float16", "source_shape": shape}

    def read(self, source: Path, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, tokens and predicted positions of blocks [first, last), reading only the row
        groups that hold them."""
        ids, tokens = text.read_rows(source, first, last)
        predicted = text.predicted(source, first, last)
        return ids, tokens, np.ones((len(ids), self.per_sample), bool) if predicted is None else predicted

    def batch(self, model: nn.Module, rows: tuple[np.ndarray, np.ndarray, np.ndarray], start: int, stop: int,
              specs: dict[str, dict]) -> Batch:
        ids, tokens, keep = rows[0][start:stop], torch.from_numpy(rows[1][start:stop]), rows[2][start:stop]
        flat = torch.from_numpy(keep.reshape(-1))
        with torch.no_grad(), features.tap(model, list(specs)) as captured:
            logits = self.logits(model, tokens).float().cpu()[flat]
            feats = {name: _token_rows(captured[name])[flat.to(device_of(model))].to(torch.float16).cpu().numpy()
                     for name in specs}
        counts = keep.sum(1)
        return Batch(np.repeat(ids, counts), np.zeros(int(counts.sum()), dtype=np.int32),
                     np.nonzero(keep)[1].astype(np.int32), logits, feats, tokens[:, 1:].numpy()[keep],
                     np.ones(int(counts.sum()), dtype=bool))


def check_teacher(teacher: Teacher, prepared: Path, infos: dict[str, dict[str, Any]]) -> None:
    """Refuse a teacher that would read the ids of these prepared splits (`text.split_info` by
    name) as other tokens: data prepared with another tokenizer (whatever the two vocabulary
    sizes), or an id past its vocabulary."""
    tokenizer = teacher.config.get("tokenizer")
    if tokenizer is None:
        raise InputError(f"{teacher.directory}: not a language model (no tokenizer beside it); the text in "
                         f"{prepared} needs one")
    for split, info in infos.items():
        if info["tokenizer_sha256"] != tokenizer["sha256"]:
            raise InputError(f"{prepared / f'{split}.parquet'}: prepared with another tokenizer than the "
                             f"teacher's: {prepared_tokenizer_name(info)} vs the teacher's "
                             f"{teacher.directory} (sha256 {tokenizer['sha256'][:12]}, vocabulary "
                             f"{tokenizer['vocab_size']}); run `kd prepare` with prepare.tokenizer: "
                             f"{teacher.directory}")
    vocab = teacher.config["vocab_size"]
    for split in infos:
        largest = text.max_token(prepared / f"{split}.parquet")
        if largest >= vocab:
            raise InputError(f"{prepared / f'{split}.parquet'}: token id {largest} is outside the teacher's "
                             f"vocabulary of {vocab} ids ({teacher.directory})")


def device_of(model: nn.Module) -> torch.device:
    """Where a model's weights are (the teacher's `label.device`)."""
    return next(model.parameters()).device


def prepared_tokenizer_name(info: dict[str, Any]) -> str:
    """For messages: the tokenizer a prepared split was cut with (`text.split_info`)."""
    source = info["tokenizer_source"] or "the BPE `kd prepare` trained"
    return f"{source} (sha256 {info['tokenizer_sha256'][:12]}, vocabulary {info['vocab_size']})"


def next_token_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits for blocks (B, L) as cache rows (B * (L - 1), V): every position
    but the last, which predicts nothing inside the block."""
    return _token_rows(model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits)  # full blocks


def hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """A layer's hidden states (B, L, H) from its output (a tensor, or a tuple starting with it)."""
    return output[0] if isinstance(output, tuple) else output


def _token_rows(output: torch.Tensor | tuple) -> torch.Tensor:
    # a layer's output (B, L, H) -> (B * (L - 1), H): one row per predicted token
    states = hidden(output)
    return states[:, :-1].reshape(-1, states.shape[-1])


class TokenRows(nn.Module):
    """A causal LM seen row by row: blocks (B, L) -> logits (B * (L - 1), V), the last position
    dropped (it predicts nothing inside the block); or blocks with their loss masks (B, 2, L)
    -> the rows of the response positions only (position t where token t + 1 is masked in),
    in cache order. Right padding needs no attention mask: a causal LM's position t never sees
    the tokens after it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return next_token_logits(self.model, x)
        logits = self.model(input_ids=x[:, 0], attention_mask=torch.ones_like(x[:, 0])).logits
        return logits[:, :-1][x[:, 1, 1:].bool()]


def model_input(tokens: torch.Tensor, predicted: torch.Tensor | None) -> torch.Tensor:
    """What `TokenRows` takes: the blocks (N, L), or with `predicted` (N, L - 1) the blocks and
    their loss masks (N, 2, L)."""
    if predicted is None:
        return tokens
    mask = torch.zeros_like(tokens)
    mask[:, 1:] = predicted.to(tokens.dtype)
    return torch.stack([tokens, mask], 1)


def block_set(tokens: torch.Tensor, ids: np.ndarray, targets: dict[str, torch.Tensor],
              predicted: torch.Tensor | None = None) -> loader.SampleSet:
    """Blocks (N, L) with their rows, one per predicted token (N * (L - 1), or with `predicted`
    (N, L - 1) one per predicted response token); a block is its own input (no views)."""
    if predicted is None:
        return loader.SampleSet({"tokens": tokens}, ids, targets, lambda inputs, ids, view: inputs["tokens"],
                                per_view=tokens.shape[1] - 1)
    return loader.SampleSet({"tokens": model_input(tokens, predicted)}, ids, targets,
                            lambda inputs, ids, view: inputs["tokens"], counts=predicted.sum(1))


def blocks_and_targets(source: Path, first: int | None = None, last: int | None = None
                ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """ids, blocks, predicted positions (None: all) and each row's true next token, of blocks
    [first, last) of a prepared split (all by default)."""
    if first is None:
        ids, blocks = text.read_blocks(source)
        predicted = text.predicted(source)
    else:
        ids, blocks = text.read_rows(source, first, last)
        predicted = text.predicted(source, first, last)
    tokens = torch.from_numpy(blocks)
    keep = None if predicted is None else torch.from_numpy(predicted)
    truth = tokens[:, 1:].reshape(-1) if keep is None else tokens[:, 1:][keep]
    return ids, tokens, keep, truth.long()


def lm_inputs(tokens: torch.Tensor, special: text.SpecialIds, vocab_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (B, L) -> (inputs (B, L), labels (B, L)): position t predicts token t + 1, the
    last predicts nothing (-100)."""
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    return tokens, labels


def token_logits(model: nn.Module, inputs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits (P, V) of the predicted positions (`keep`, (B, L))."""
    return model(input_ids=inputs).logits[keep]


def lm_score(loss: float, accuracy: float) -> dict[str, float]:
    return {"perplexity": math.exp(loss)}


def teacher_scores(scores: dict[str, float], train: np.ndarray, test: np.ndarray, vocab_size: int,
                   train_predicted: torch.Tensor | None = None, test_predicted: torch.Tensor | None = None
                   ) -> dict[str, float]:
    """What a causal teacher's metrics.json adds: its test perplexity and a unigram model's."""
    return {"perplexity": scores["perplexity"],
            "unigram_perplexity": unigram_perplexity(train, test, vocab_size, train_predicted, test_predicted)}


def unigram_perplexity(train: np.ndarray, test: np.ndarray, vocab_size: int,
                       train_predicted: torch.Tensor | None = None, test_predicted: torch.Tensor | None = None) -> float:
    """Perplexity on the tokens a causal LM predicts in test (test[:, 1:], or its predicted
    response tokens) of the frequencies of those of the labeled split, add-one smoothed: the
    bar a model that ignores context would reach."""
    seen = train.reshape(-1) if train_predicted is None else train[:, 1:][train_predicted.numpy()]
    counts = np.bincount(seen, minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    scored = test[:, 1:].reshape(-1) if test_predicted is None else test[:, 1:][test_predicted.numpy()]
    return float(np.exp(-log_p[scored].mean()))


# --- training ---------------------------------------------------------------------------------


def check(cfg: StudentConfig, cache: Cache, prepared: Path) -> None:
    """What a causal student cannot do yet, said up front."""
    check_tokenizer(cache, prepared, cfg.transfer)
    check_token_student(cfg, cache, prepared, OBJECTIVE, supported(NAME), [("assistant", cfg.assistant),
                                                                         ("views", cfg.views)])
    own = student_tokenizer(cfg, cache, prepared)
    if own is None:
        return
    source = "tokenizer" if cfg.tokenizer is not None else "init"
    differs = (f"the student's tokenizer ({source}: {own.student.describe()}) is another tokenizer than the "
               f"cache {cache.root}'s teacher's ({own.teacher.describe()})")
    other = [name for name in chosen(cfg.loss) if name not in supported(NAME, own_tokenizer=True)]
    if other:
        raise ConfigError(f"{cfg.where}.loss.{other[0]}: needs the teacher's vocabulary, but {differs}; use "
                          "loss.mapped (the teacher's top-k mapped by token text) or loss.uld (sorted probabilities)")
    if cfg.init == "teacher":
        raise ConfigError(f"{cfg.where}.init: 'teacher' copies the teacher's embeddings, but {differs}; start at "
                          "random (null) or from a directory of the student's tokenizer")
    if cfg.loss.hard is not None and cfg.loss.hard.pseudo:
        raise ConfigError(f"{cfg.where}.loss.hard.pseudo: the teacher's argmax is a teacher token, but {differs}; "
                          "use labels: true")
    check_own_tokenizer(cfg, own)


def student_tokenizer(cfg: StudentConfig, cache: Cache, prepared: Path) -> retokenized.Pair | None:
    """The student's own tokenizer (`tokenizer`, else its `init` directory's) with the
    teacher's, when it is not the teacher's; None when the student reads the teacher's tokens."""
    if cfg.tokenizer is not None:
        directory = Path(cfg.tokenizer)
    elif cfg.init not in (None, "teacher"):
        directory = Path(cfg.init)
    else:
        return None
    found = text.read_tokenizer(directory, f"{cfg.where}.tokenizer")
    if found.fingerprint == cache.manifest["text"]["tokenizer_sha256"]:
        return None
    return retokenized.pair(Path(prepared).resolve(), directory.resolve())


def check_tokenizer(cache: Cache, prepared: Path, splits: list[str]) -> None:
    """Refuse prepared splits cut with another tokenizer than the cache's (the teacher's), whatever
    the two vocabulary sizes: one line naming both."""
    ours = cache.manifest["text"]
    for split in splits:
        info = text.split_info(prepared / f"{split}.parquet")
        if info["tokenizer_sha256"] != ours["tokenizer_sha256"]:
            raise InputError(f"{prepared / f'{split}.parquet'}: prepared with another tokenizer than the cache's "
                             f"teacher: {prepared_tokenizer_name(info)} vs the cache {cache.root}'s (sha256 "
                             f"{ours['tokenizer_sha256'][:12]}, vocabulary {ours['vocab_size']}); prepare the data "
                             "with the teacher's tokenizer (prepare.tokenizer)")


def check_token_student(cfg: StudentConfig, cache: Cache, prepared: Path, objective: str, allowed: tuple[str, ...],
                        unsupported: list[tuple[str, Any]]) -> None:
    """A token task's refusals: its architecture (a transformers model_type with the objective's
    head), its start (`check_init`), its loss methods, the keys it cannot use."""
    if cfg.section == "assistants":
        raise ConfigError(f"{cfg.where}: teacher assistants are for image students so far")
    if cfg.init in (None, "teacher"):
        lm.check_arch(cfg.arch, objective, cfg.where)
    check_init(cfg, cache, objective)
    if student_tokenizer(cfg, cache, prepared) is None:
        check_student_tokenizer(cfg, cache, prepared)
    elif objective != OBJECTIVE:
        raise ConfigError(f"{cfg.where}.tokenizer: a student with another tokenizer than the teacher's is for "
                          f"causal LM students so far (this is a {objective} LM cache)")
    extra = [name for name in chosen(cfg.loss) if name not in allowed]
    if extra:
        raise ConfigError(f"{cfg.where}.loss: {', '.join(extra)} not supported for {objective} LM students yet "
                          f"({', '.join(allowed)})")
    for key, value in unsupported:
        if value:
            raise ConfigError(f"{cfg.where}.{key}: not supported for {objective} LM students yet")


def check_init(cfg: StudentConfig, cache: Cache, objective: str) -> None:
    """`init: teacher` needs the teacher's copy in the cache (`label.keep_teacher`); `init: DIR`
    a local pretrained LM of this objective, cut with the cache's tokenizer, whose model_type
    `arch` names (its config.json sets the rest: no `arch_kwargs`)."""
    if cfg.init is None:
        return
    if cfg.init == "teacher":
        if "teacher_files" not in cache.manifest:
            raise ConfigError(f"{cfg.where}.init: 'teacher' needs the teacher's weights in the cache; set "
                              "label.keep_teacher: true and run `kd label` again")
        return
    directory = Path(cfg.init)
    if not (directory / lm.CONFIG).is_file():
        raise MissingInputError(f"{cfg.where}.init: {directory / lm.CONFIG} not found (init is 'teacher', null or "
                                "a local pretrained model directory)")
    tokenizer = text.read_tokenizer(directory, "init directory's tokenizer")
    own = text.read_tokenizer(Path(cfg.tokenizer), f"{cfg.where}.tokenizer") if cfg.tokenizer else tokenizer
    if tokenizer.fingerprint != own.fingerprint:
        raise InputError(f"{cfg.where}.init: {tokenizer.describe()} has another tokenizer than the student's "
                         f"{own.describe()}; a student starts from a model of its own tokenizer (leave "
                         f"{cfg.where}.tokenizer empty to take the init directory's)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{directory}: cannot read its config ({str(exc).splitlines()[0]})") from None
    if config.model_type != cfg.arch:
        raise ConfigError(f"{cfg.where}.arch: {cfg.arch!r}, but init {directory} holds a {config.model_type!r}; "
                          "name its model_type")
    if cfg.arch_kwargs:
        raise ConfigError(f"{cfg.where}.arch_kwargs: set by {directory / lm.CONFIG} (a student started from a "
                          "pretrained directory keeps its architecture); leave it empty")
    if lm.objective(config) != objective:
        raise ConfigError(f"{cfg.where}.init: {directory} is a {lm.objective(config)} LM; a student of a "
                          f"{objective} LM cache must be one too")


def check_student_tokenizer(cfg: StudentConfig, cache: Cache, prepared: Path) -> None:
    """The student's directory must read back as the tokenizer its data was cut with. AutoTokenizer
    picks its class from the directory's model_type too: in transformers 5 a qwen2 directory
    always gets Qwen2Tokenizer, which rebuilds the pre-tokenizer from the vocabulary and adds a
    pad token. So the prepared tokenizer files are put beside the student's config and read
    back. (kd's own BPE has no tokenizer_config.json; transformers reads it as its model_type's
    class, as it always did.)"""
    if not (prepared / text.HF_TOKENIZER_CONFIG).is_file():
        return
    config, found = read_back(cfg, prepared)
    ours = cache.manifest["text"]
    if found.fingerprint != ours["tokenizer_sha256"]:
        raise ConfigError(f"{cfg.where}.arch: in a {config.model_type} directory transformers reads the teacher's "
                          f"tokenizer as {type(found.hf).__name__} (sha256 {found.fingerprint[:12]}, vocabulary "
                          f"{found.vocab_size}), another tokenizer than the cache {cache.root}'s (sha256 "
                          f"{ours['tokenizer_sha256'][:12]}, vocabulary {ours['vocab_size']}): the student would "
                          "not read its own text as it learned it; choose another model_type (the teacher's "
                          f"{cache.manifest['teacher']['config'].get('arch')} keeps it)")


def read_back(cfg: StudentConfig, tokenizer_dir: Path) -> tuple[Any, text.TokenizerDir]:
    """The student's config and the tokenizer of `tokenizer_dir` as AutoTokenizer reads it
    beside that config (`check_student_tokenizer`)."""
    if cfg.init in (None, "teacher"):
        config = AutoConfig.for_model(cfg.arch)
    else:
        config = AutoConfig.from_pretrained(cfg.init, local_files_only=True, trust_remote_code=False)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        for source in text.tokenizer_files(tokenizer_dir):
            shutil.copyfile(source, Path(tmp) / source.name)
        return config, text.read_tokenizer(Path(tmp), "student's tokenizer")


def check_own_tokenizer(cfg: StudentConfig, own: retokenized.Pair) -> None:
    """A student with its own Hugging Face tokenizer: its directory must read it back as itself
    (the same rule as `check_student_tokenizer`)."""
    if not (own.student.directory / text.HF_TOKENIZER_CONFIG).is_file():
        return
    config, found = read_back(cfg, own.student.directory)
    if found.fingerprint != own.student.fingerprint:
        raise ConfigError(f"{cfg.where}.arch: in a {config.model_type} directory transformers reads the student's "
                          f"tokenizer {own.student.describe()} as {type(found.hf).__name__} (sha256 "
                          f"{found.fingerprint[:12]}, vocabulary {found.vocab_size}): the student would not read its "
                          "own text as it learned it; choose the model_type its tokenizer comes from")


def init_identity(cfg: StudentConfig, cache: Cache) -> Any:
    """What a student's start is, for its twin's key: the teacher copy's digests, the pretrained
    directory's fingerprint, or None (random)."""
    if cfg.init is None:
        return None
    return cache.manifest.get("teacher_files") if cfg.init == "teacher" else lm.fingerprint(Path(cfg.init))


def rows(cache: Cache, prepared: Path, cfg: StudentConfig, memory_mb: float) -> loader.SampleSet | loader.StreamingSet:
    """The student's transfer blocks with the cached top-k, lse and next tokens per row: in
    memory if they fit `memory_mb`, else streamed part by part. A student with its own
    tokenizer gets the same blocks in its tokens (`retokenized`), one row per taught position."""
    own = student_tokenizer(cfg, cache, prepared)
    if own is not None:
        read = functools.partial(_cross_split_rows, cache, prepared, cfg, own)
        return loader.transfer_set(cache, cfg, read, 16 * retokenized.block_size(own.teacher.directory,
                                                                                 own.student.directory), memory_mb)
    return loader.transfer_set(cache, cfg, functools.partial(_split_rows, cache, prepared, cfg),
                               8 * cache.manifest["text"]["block_size"], memory_mb)


def _split_rows(cache: Cache, prepared: Path, cfg: StudentConfig, split: str, row_offset: int,
                parts: list[int] | None = None) -> loader.SampleSet:
    source = prepared / f"{split}.parquet"
    ids, tokens, predicted, truth = blocks_and_targets(source, *loader.sample_range(cache, split, parts))
    cache_rows = loader.read_rows(cache, cfg, split, source, ids, truth.numpy(), parts=parts, row_offset=row_offset)
    return block_set(tokens, ids, cache_rows.targets(cfg), predicted)


def _cross_split_rows(cache: Cache, prepared: Path, cfg: StudentConfig, own: retokenized.Pair, split: str,
                      row_offset: int, parts: list[int] | None = None) -> loader.SampleSet:
    """A transfer split's blocks in the student's tokens, one row per taught position: its next
    student token (`label`), whether a cached teacher row lines up with it (`aligned`) and that
    row's top-k logits, lse and top-k ids mapped to the student's vocabulary (`mapped_idx`)."""
    source = prepared / f"{split}.parquet"
    first, last = loader.sample_range(cache, split, parts)
    ids, _, _, truth = blocks_and_targets(source, first, last)
    cache_rows = loader.read_rows(cache, cfg, split, source, ids, truth.numpy(), parts=parts, row_offset=row_offset)
    found = retokenized.blocks(own.teacher.directory, own.student.directory, split, first, last)
    keep = found.predicted
    teacher_row = torch.from_numpy(found.teacher_row[keep])
    aligned = teacher_row >= 0
    at = teacher_row.clamp(min=0)
    teacher = cache_rows.targets(cfg)
    # `row`: the student row's index over the transfer splits (student rows, not the cache's)
    before = sum(int(retokenized.blocks(own.teacher.directory, own.student.directory, s).predicted.sum())
                 for s in cfg.transfer[:cfg.transfer.index(split)])
    before += int(retokenized.blocks(own.teacher.directory, own.student.directory, split, 0, first).predicted.sum())
    targets = {"label": torch.from_numpy(found.tokens[:, 1:][keep]), "aligned": aligned,
               "row": torch.arange(len(teacher_row)) + before,
               **{key: value[at] for key, value in teacher.items() if key not in ("label", "row", "topk_idx")}}
    if "mapped_idx" in targets:
        targets["mapped_idx"] = torch.from_numpy(own.table)[targets["mapped_idx"]]
    return block_set(torch.from_numpy(found.tokens), ids, targets, torch.from_numpy(keep))


def twin_rows(cache: Cache, prepared: Path, cfg: StudentConfig, transfer: Any) -> loader.SampleSet:
    """The same blocks with their next tokens alone: the text the twin learns from (in memory:
    tokens only, a small fraction of the student's rows), in the student's own tokens when it
    has its own tokenizer."""
    sets = []
    own = student_tokenizer(cfg, cache, prepared)
    for split in cfg.transfer:
        if own is not None:
            found = retokenized.blocks(own.teacher.directory, own.student.directory, split)
            sets.append(block_set(torch.from_numpy(found.tokens), found.ids,
                                  {"label": torch.from_numpy(found.tokens[:, 1:][found.predicted])},
                                  torch.from_numpy(found.predicted)))
            continue
        ids, tokens, predicted, truth = blocks_and_targets(prepared / f"{split}.parquet")
        sets.append(block_set(tokens, ids, {"label": truth}, predicted))
    return loader.concat(sets)


def twin_decided_by(cfg: StudentConfig, cache: Cache, prepared: Path) -> dict[str, Any]:
    """What decides a causal twin besides its budget and seed: the task, the transfer blocks and
    its start when it has one (`init`)."""
    own = student_tokenizer(cfg, cache, prepared)
    return {"task": NAME, "data": {s: data_fingerprint(prepared / f"{s}.parquet") for s in cfg.transfer},
            **({"init": init_identity(cfg, cache)} if cfg.init is not None else {}),
            **({"tokenizer": own.student.fingerprint} if own is not None else {})}


def build(cfg: StudentConfig, cache: Cache, prepared: Path) -> TokenRows:
    """A fresh student (seed torch first), sized by the prepared tokenizer and blocks (or by its
    own tokenizer and its blocks in it)."""
    own = student_tokenizer(cfg, cache, prepared)
    if own is None:
        return TokenRows(build_model(cfg, cache, prepared, OBJECTIVE))
    length = retokenized.block_size(own.teacher.directory, own.student.directory)
    if cfg.init is not None:
        model = lm.load(Path(cfg.init))
        for key, least in (("vocab_size", own.student.vocab_size), ("max_position_embeddings", length)):
            if getattr(model.config, key, least) < least:
                raise ConfigError(f"{cfg.where}.init: {cfg.init} has {key} {getattr(model.config, key)}, fewer "
                                  f"than the student's tokens need ({least})")
        return TokenRows(model)
    return TokenRows(lm.build(cfg.arch, cfg.arch_kwargs, own.student.vocab_size, length, own.student.special,
                              where=cfg.where, objective=OBJECTIVE))


def build_model(cfg: StudentConfig, cache: Cache, prepared: Path, objective: str) -> nn.Module:
    """A token task's student (seed torch first): `init: DIR` loaded from the directory (float32,
    on the CPU); otherwise `arch`/`arch_kwargs` built at random with the tokenizer's special ids
    and a vocabulary covering the tokenizer's and the teacher's ids, then with `init: teacher`
    started from the teacher's layers (the copy `label.keep_teacher` put in the cache)."""
    info = cache.manifest["text"]
    classes = max(info["vocab_size"], cache.manifest["num_classes"])
    if cfg.init not in (None, "teacher"):
        model = lm.load(Path(cfg.init))
        for key, least in (("vocab_size", classes), ("max_position_embeddings", info["block_size"])):
            if getattr(model.config, key, least) < least:
                raise ConfigError(f"{cfg.where}.init: {cfg.init} has {key} {getattr(model.config, key)}, fewer "
                                  f"than the cache needs ({least})")
        return model
    _, special = text.load_tokenizer(prepared)
    model = lm.build(cfg.arch, cfg.arch_kwargs, classes, info["block_size"], special, where=cfg.where,
                     objective=objective)
    if cfg.init == "teacher":
        with torch.random.fork_rng():  # loading the teacher's copy leaves the student's random stream alone
            start = teacher_start(cache)
        lm.init_from_teacher(model, start, where=f"{cfg.where}.init")
    return model


def teacher_start(cache: Cache) -> nn.Module:
    """The teacher's copy in the cache (`label.keep_teacher`), checked against the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        for rel, digest in cache.manifest["teacher_files"].items():
            blob = cache.store.read_bytes(cache.store.safe(rel))
            if hashlib.sha256(blob).hexdigest() != digest:
                raise CacheError(f"{cache.store.show(rel)}: sha256 differs from the manifest; run "
                                 f"`kd cache verify {cache.root}`")
            (Path(tmp) / Path(rel).name).write_bytes(blob)
        return lm.load(Path(tmp))


def student_shapes(model: nn.Module, cfg: StudentConfig, layers: list[str], cache: Cache) -> dict[str, list[int]]:
    return {}  # no method taps a causal student's layers yet


def save(directory: Path, model: nn.Module, cfg: StudentConfig, cache: Cache, record: dict[str, Any],
         prepared: Path) -> None:
    """A Hugging Face directory (weights, config, tokenizer: the student's own, or the prepared
    data's) plus `student.json`, the record."""
    own = student_tokenizer(cfg, cache, prepared)
    lm.save(directory, model.model, prepared if own is None else own.student.directory)
    write_json(directory / STUDENT_RECORD, {**record, "objective": cache.manifest["text"]["objective"]})


# --- evaluation -------------------------------------------------------------------------------


def evaluate(student_dir: Path, cache: Cache, prepared: Path, cfg: EvalConfig, spec: StudentConfig
             ) -> tuple[dict[str, Any], dict[str, tuple[list[str], list[dict[str, Any]]]]]:
    """Test perplexity of the student, its twin and the teacher (its own `kd teacher` figure),
    and against the cached teacher (`evaluate_rows`); bits per character for all three
    (`bits_per_char`), so students of other tokenizers compare; for a student with its own
    tokenizer, in its tokens, and how its positions line up with the teacher's
    (`alignment_scores`)."""
    own = student_tokenizer(spec, cache, prepared)
    teacher_predicted = text.predicted(prepared / "test.parquet")
    try:
        teacher_chars = retokenized.teacher_characters(prepared.resolve(), "test")
        teacher_chars = int((teacher_chars if teacher_predicted is None else teacher_chars[teacher_predicted]).sum())
    except InputError:  # a tokenizer whose ids do not spell the text back byte for byte: no bits per character
        teacher_chars = None
    compare = teacher_x = None
    if own is None:
        _, tokens, predicted, truth = blocks_and_targets(prepared / "test.parquet")
        characters = teacher_chars  # (None where the text cannot be recovered)
    else:
        test = retokenized.blocks(own.teacher.directory, own.student.directory, "test")
        tokens, predicted = torch.from_numpy(test.tokens), torch.from_numpy(test.predicted)
        truth = tokens[:, 1:][predicted]
        characters = int(test.characters[test.predicted].sum())
        compare = functools.partial(aligned_teacher_rows, test.teacher_row[test.predicted], own.table)
        _, teacher_tokens, teacher_predicted, _ = blocks_and_targets(prepared / "test.parquet")
        teacher_x = model_input(teacher_tokens, teacher_predicted)
    teacher = teacher_perplexity(cache)
    tokens_scored = len(truth)

    def perplexity(logits: torch.Tensor, truth: torch.Tensor) -> float:
        return math.exp(float(F.cross_entropy(logits, truth, reduction="none").mean()))

    def keys(student: float, twin: float, losses: dict[str, torch.Tensor], soft: SoftTargets) -> dict[str, Any]:
        return {"perplexity": student, "baseline_perplexity": twin, "teacher_perplexity": teacher,
                "perplexity_gain": twin - student, "perplexity_reduction": 1 - student / twin,
                "bits_per_char": bits_per_char(student, tokens_scored, characters),
                "baseline_bits_per_char": bits_per_char(twin, tokens_scored, characters),
                "teacher_bits_per_char": None if teacher is None or teacher_chars is None else bits_per_char(
                    teacher, len(soft.ids), teacher_chars),
                "test_characters": characters}

    positions = torch.arange(1, tokens.shape[1]).repeat(len(tokens), 1)
    record, plots = evaluate_rows(student_dir, cache, cfg, TokenRows, model_input(tokens, predicted), truth,
                                  positions.reshape(-1) if predicted is None else positions[predicted], perplexity,
                                  keys, ("perplexity", "perplexity_reduction", lambda s, b: 1 - s / b), compare,
                                  teacher_x)
    if characters is not None:  # every seed in bits per character too (`kd report --score bits_per_char`)
        columns, seeds = plots["seeds.csv"]
        bits = [{"bits_per_char": bits_per_char(row["student"], tokens_scored, characters),
                 "baseline_bits_per_char": bits_per_char(row["baseline"], tokens_scored, characters)} for row in seeds]
        record |= {"bits_per_char_reduction": 1 - record["bits_per_char"] / record["baseline_bits_per_char"],
                   **metrics.seed_summary(bits, "bits_per_char", "bits_per_char_reduction", lambda s, b: 1 - s / b)}
        plots["seeds.csv"] = ([*columns, "student_bits_per_char", "baseline_bits_per_char"],
                              [{**row, "student_bits_per_char": b["bits_per_char"],
                                "baseline_bits_per_char": b["baseline_bits_per_char"]} for row, b in zip(seeds, bits)])
    if own is not None:  # (against_teacher counted the aligned rows)
        record |= {"test_tokens": tokens_scored, **alignment_scores(test, own.table, cache.soft_targets("test", [1.0])),
                   "student_tokenizer": {"sha256": own.student.fingerprint, "vocab_size": own.student.vocab_size}}
    if teacher_predicted is not None and own is None:  # (greedy answers in the teacher's tokens)
        columns, seeds = plots["seeds.csv"]
        matches = exact_matches(student_dir, prepared, cfg)
        record |= {"exact_match": matches[0]["student"], "baseline_exact_match": matches[0]["baseline"],
                   "teacher_exact_match": teacher_exact_match(prepared),
                   "exact_match_gain_points": 100.0 * (matches[0]["student"] - matches[0]["baseline"]),
                   **metrics.seed_summary([{"exact_match": m["student"], "baseline_exact_match": m["baseline"]}
                                           for m in matches], "exact_match", "exact_match_gain_points")}
        plots["seeds.csv"] = ([*columns, "student_exact_match", "baseline_exact_match"],
                              [{**row, "student_exact_match": m["student"], "baseline_exact_match": m["baseline"]}
                               for row, m in zip(seeds, matches)])
    return record, plots


def bits_per_char(perplexity: float, tokens: int, characters: int | None) -> float | None:
    """The total next-token loss of `tokens` predicted tokens at this perplexity (nats), over
    ln 2 x the characters those tokens cover: a figure that does not depend on the tokenizer."""
    if characters is None:
        return None
    return math.log(perplexity) * tokens / (math.log(2) * characters)


def aligned_teacher_rows(teacher_row: np.ndarray, table: np.ndarray, logits: torch.Tensor, soft: SoftTargets
                         ) -> tuple[torch.Tensor, SoftTargets]:
    """A student of its own tokenizer against the cached teacher: its rows that line up with a
    teacher row (`teacher_row` >= 0, one per row of `logits`), with those teacher rows, their
    top-k ids mapped to the student's vocabulary (-1: no token of the same text)."""
    keep = teacher_row >= 0
    at = teacher_row[keep]
    return logits[torch.from_numpy(keep)], SoftTargets(soft.ids[at], soft.view[at], table[soft.topk_idx[at]],
                                                       soft.topk_logit[at], {t: v[at] for t, v in soft.lse.items()})


def alignment_scores(test: retokenized.Blocks, table: np.ndarray, soft: SoftTargets) -> dict[str, float]:
    """How a student's own tokens line up with the teacher's on the test blocks: the share of
    its predicted positions with a teacher row (`aligned_positions`) and with one whose
    predicted token is the same text span (`aligned_one_to_one`); the share of the teacher's
    cached top-k mass at T=1 on tokens with a student token of the same text
    (`mapped_kept_mass`, over the aligned rows), and of the whole distribution
    (`mapped_mass`)."""
    rows = test.teacher_row[test.predicted]
    at = rows[rows >= 0]
    p = np.exp(soft.topk_logit[at].astype(np.float64) - soft.lse[1.0][at, None])
    mapped = (table[soft.topk_idx[at]] >= 0) * p
    return {"aligned_positions": float((rows >= 0).mean()),
            "aligned_one_to_one": float(test.one_to_one[test.predicted].mean()),
            "mapped_kept_mass": float((mapped.sum(1) / p.sum(1)).mean()), "mapped_mass": float(mapped.sum(1).mean())}


def exact_matches(student_dir: Path, prepared: Path, cfg: EvalConfig) -> list[dict[str, float]]:
    """Instruction data: the share of test prompts that the student and its twin answer exactly
    (greedy, until eos or the end of the block; `generate.exact_match`), for every seed in the
    order `evaluate_rows` lists them."""
    from kd import generate

    _, prompts, truths = generate.prompts_and_responses(prepared / "test.parquet")
    pad, eos = generate.special_of(prepared)
    block = text.split_info(prepared / "test.parquet")["block_size"]

    def score(directory: Path) -> float:
        found = generate.answers(lm.load(directory), prompts, batch_size=cfg.batch_size, max_new_tokens=block,
                                 block_size=block, pad=pad, eos=eos)
        return generate.exact_match(found, truths)

    record = read_json(student_dir / STUDENT_RECORD)
    directories = [student_dir] + [directory for _, directory in evaluation.seed_dirs(student_dir, record)]
    return [{"student": score(d), "baseline": score(d / "baseline")} for d in directories]


def teacher_exact_match(prepared: Path) -> float | None:
    """The teacher's exact match on the test prompts, as `kd generate` measured it when it wrote
    `prepared` (None for data it did not write)."""
    from kd import generate

    manifest = prepared / generate.MANIFEST
    return read_json(manifest).get("teacher_exact_match") if manifest.is_file() else None


def teacher_perplexity(cache: Cache) -> float | None:
    """The teacher's test perplexity, measured by `kd label` on every predicted test token
    (from its full logits, before the top-k), or from `kd teacher`'s metrics for a cache
    written before kd measured it."""
    loss = cache.manifest["fidelity"].get("test", {}).get("teacher_loss")
    if loss is not None:
        return math.exp(loss)
    return cache.manifest["teacher"]["config"].get("metrics", {}).get("perplexity")


def evaluate_rows(student_dir: Path, cache: Cache, cfg: EvalConfig, wrap: Callable[[nn.Module], nn.Module],
                  x: torch.Tensor, truth: torch.Tensor, position: torch.Tensor,
                  score: Callable[[torch.Tensor, torch.Tensor], float], keys: Callable[..., dict[str, Any]],
                  seeds_as: tuple[str, str, Callable[[float, float], float]],
                  compare: Callable[[torch.Tensor, SoftTargets], tuple[torch.Tensor, SoftTargets]] | None = None,
                  teacher_x: torch.Tensor | None = None) -> tuple[dict[str, Any], dict[str, tuple[list[str], list[dict[str, Any]]]]]:
    """What every token task measures on the test rows: the student (wrapped by `wrap`) and its
    twin on the inputs `x`, one logits row per cache row with its `truth` and block `position`;
    `score(logits, truth)` for them and every further seed; the task's `keys(student score, twin
    score, per-row losses, the cache's test rows)`; `ece` and `baseline_ece` (the top-1 token's
    probability against whether it is the truth), with their mean and std over seeds
    (`ece_mean`, `ece_change_mean`: student minus twin, ...); `against_teacher`; the seed summary
    (`seeds_as`: the key, the change's key, the change). Plots: the mean loss of the student and
    its twin at each block position (how each uses its context), and one row per seed.
    `compare(logits, test rows)`: the student's rows and the teacher's they are measured against
    (a student of its own tokenizer: the rows that line up); by default row for row. `teacher_x`:
    the teacher's input for its speed, when it is not `x` (the same blocks in its own tokens)."""
    student = wrap(lm.load(student_dir))
    logits = predict(student, x, cfg.batch_size)
    twin_logits = predict(wrap(lm.load(student_dir / "baseline")), x, cfg.batch_size)
    losses = {"student": F.cross_entropy(logits, truth, reduction="none"),
              "baseline": F.cross_entropy(twin_logits, truth, reduction="none")}
    first, twin = score(logits, truth), score(twin_logits, truth)

    def ece(logits: torch.Tensor) -> float:  # calibration of the predicted token
        confidence, predicted = logits.softmax(1).max(1)
        return metrics.ece(confidence.numpy(), (predicted == truth).numpy(), cfg.ece_bins)

    seeds = [{"seed": read_json(student_dir / STUDENT_RECORD)["student"]["seed"], "student": first,
              "baseline": twin}]
    eces = [{"ece": ece(logits), "baseline_ece": ece(twin_logits)}]
    for seed, directory in evaluation.seed_dirs(student_dir, read_json(student_dir / STUDENT_RECORD)):
        seeds.append({"seed": seed})
        eces.append({})
        for who, path in (("student", directory), ("baseline", directory / "baseline")):
            seed_logits = predict(wrap(lm.load(path)), x, cfg.batch_size)
            seeds[-1][who] = score(seed_logits, truth)
            eces[-1]["ece" if who == "student" else "baseline_ece"] = ece(seed_logits)
    soft = cache.soft_targets("test", [1.0])
    key, change, paired = seeds_as
    compared, teacher_rows = (logits, soft) if compare is None else compare(logits, soft)
    record = {"objective": cache.manifest["text"]["objective"], **keys(first, twin, losses, soft), **eces[0],
              **metrics.seed_summary(eces, "ece", "ece_change", lambda s, b: s - b),
              **against_teacher(student, compared, x, teacher_rows, student_dir, cache, cfg,
                                teacher_copy(cache, wrap), teacher_x),
              **metrics.seed_summary([{key: r["student"], f"baseline_{key}": r["baseline"]} for r in seeds],
                                     key, change, paired)}
    flat = position.numpy()
    counts = np.bincount(flat)
    sums = {k: np.bincount(flat, v.double().numpy()) for k, v in losses.items()}
    return record, {"per_position.csv": (["position", "student", "baseline"],
                                         [{"position": int(p), **{k: float(sums[k][p] / counts[p]) for k in sums}}
                                          for p in np.flatnonzero(counts)]),
                    "seeds.csv": (["seed", "student", "baseline"], seeds)}


def check_rows(path: str, table: Any, manifest: dict[str, Any], views: int) -> list[str]:
    """`kd cache verify`: each block's rows are positions 0..L-2, in order (instruction data:
    some of them, ascending), all of view 0."""
    from kd.cache.layout import sample_starts
    from kd.cache.verify import in_order

    if views is not None:
        problems = in_order(path, table, "position", views)
    else:
        position = table["position"].to_numpy()
        same = ~sample_starts(table["id"].to_numpy())[1:]  # row i + 1 continues row i's block
        problems = [] if not len(position) or ((np.diff(position)[same] > 0).all() and position.min() >= 0
                                               and position.max() < manifest["text"]["positions"]) else [
            f"{path}: position column out of order (expected ascending response positions per block)"]
    if table["view"].to_numpy().any():
        problems.append(f"{path}: view column not 0 (token rows have no views)")
    return problems


def rows_description(summary: dict[str, Any]) -> str:
    """`kd cache info`: what one cache row is."""
    t = summary["text"]
    which = "response tokens only" if t.get("response_only") else f"positions 0..{t['positions'] - 1}"
    return (f"one per predicted token: {t['objective']} LM, blocks of {t['block_size']} tokens, {which}, "
            f"vocabulary {t['vocab_size']}")


def summary(name: str, m: dict[str, Any]) -> str:
    teacher = f"{m['teacher_perplexity']:.1f}" if m["teacher_perplexity"] else "unknown"
    line = f"test perplexity {m['perplexity']:.1f} (baseline twin {m['baseline_perplexity']:.1f}, teacher {teacher})"
    over = (f"perplexity {m['perplexity_mean']:.1f} +- {m['perplexity_std']:.1f}, "
            f"{100 * m['perplexity_reduction_mean']:.1f} +- {100 * m['perplexity_reduction_std']:.1f}% lower "
            "than the twins")
    return token_summary(name, m, line, over)


def token_summary(name: str, m: dict[str, Any], line: str, over: str) -> str:
    return (f"student {name}: {line}" + (f"; over {m['seeds']} seeds: {over}" if m["seeds"] > 1 else "")
            + f", agreement {m['agreement']:.4f}, KL {m['kl_to_teacher']:.4f}, {m['params']:,} params")


def teacher_copy(cache: Cache, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module | None:
    """A random-weight copy of the teacher's architecture (weights do not change its speed),
    seen row by row as `wrap` sees the student; None without the teacher's HF config."""
    teacher = cache.manifest["teacher"]["config"]
    if "hf_config" not in teacher:
        return None
    from kd import tasks

    auto = tasks.for_cache(cache).AUTO_MODEL
    return wrap(auto.from_config(AutoConfig.for_model(**teacher["hf_config"])))


def against_teacher(student: nn.Module, logits: torch.Tensor, x: torch.Tensor, soft: SoftTargets,
                    student_dir: Path, cache: Cache, cfg: EvalConfig, teacher: nn.Module | None,
                    teacher_x: torch.Tensor | None = None) -> dict[str, Any]:
    """What every text student reports beside its own score: top-1 agreement with the cached
    teacher and KL at T=1 (top-k plus a tail bucket: a lower bound when k < V) against the test
    rows `soft` (with lse at T=1), one per row of `logits`; size; and tokens/s against the
    teacher's copy (`teacher_copy`), on the student's input `x` (the teacher on `teacher_x`, the
    same blocks in its tokens, when given)."""
    kl, exact = metrics.kl_to_teacher(logits, torch.tensor(soft.topk_idx, dtype=torch.long),
                                      torch.tensor(soft.topk_logit, dtype=torch.float32), torch.tensor(soft.lse[1.0]))
    with speed.torch_threads(cfg.threads):
        inputs = [x[:cfg.batch_size], (x if teacher_x is None else teacher_x)[:cfg.batch_size]]
        blocks_per_s = speed.throughputs([student] + ([teacher] if teacher is not None else []),
                                         inputs[:1 + (teacher is not None)], cfg.throughput_runs)
    return {
        "agreement": metrics.agreement(logits.argmax(1).numpy(), soft.topk_idx[:, 0]),
        "kl_to_teacher": kl, "kl_exact": exact,
        "kept_mass_t1": cache.manifest["fidelity"]["test"].get("t1", {}).get("kept_mass"),
        "top_k": cache.manifest["top_k"],
        "params": count_params(student), "teacher_params": cache.manifest["teacher"]["config"].get("params"),
        "size_bytes": (student_dir / lm.WEIGHTS).stat().st_size,
        "throughput_tokens_per_s": blocks_per_s[0] * x.shape[-1],
        "speedup_vs_teacher": blocks_per_s[0] / blocks_per_s[1] if len(blocks_per_s) > 1 else None,
        "test_tokens": len(logits),
    }


def predict(rows: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """One row of logits per predicted token of every block, in batches of blocks."""
    rows.eval()
    with torch.no_grad():
        return torch.cat([rows(chunk) for chunk in x.split(batch_size)])


# --- the teacher (of either objective: `arch` gpt2 is causal, bert masked) --------------------


def train_teacher(cfg: TeacherConfig, prepared: Path, out: Path, *, progress: bool = True) -> str:
    """`kd teacher` on text: a Hugging Face language model (`lm.train_teacher`) written into
    `out` with its tokenizer, `training.json` (where it came from) and `metrics.json`; its score."""
    model, provenance, scores = lm.train_teacher(cfg, prepared, progress=progress)
    lm.save(out, model, prepared)
    write_json(out / "training.json", provenance)
    write_json(out / "metrics.json", scores)
    return (f"test perplexity {scores['perplexity']:.2f} (unigram {scores['unigram_perplexity']:.1f})"
            if "perplexity" in scores else f"test masked-token accuracy {scores['masked_accuracy']:.4f}")


def load_teacher(directory: Path, arch: str | None = None, arch_kwargs: dict | None = None, *,
                 dtype: str = "auto", device: str = "auto") -> Teacher:
    """A Hugging Face language model directory (causal or masked; `dtype` a `lm.DTYPES` name,
    `device` auto|cpu|cuda), with the fingerprint that identifies it, its tokenizer's (which
    the prepared data must have been cut with) and its provenance and test scores when
    `kd teacher` made it."""
    tokenizer = text.read_tokenizer(directory, "teacher's tokenizer")
    model = lm.load(directory, dtype=dtype, device=lm.resolve_device(device))
    config = {"arch": model.config.model_type, "objective": lm.objective(model), "params": count_params(model),
              "vocab_size": model.config.vocab_size, "hf_config": model.config.to_dict(),
              "tokenizer": {"sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    for name in ("training", "metrics"):
        if (directory / f"{name}.json").is_file():
            config[name] = read_json(directory / f"{name}.json")
    files = tuple(path.name for path in lm.weight_files(directory)) + (lm.CONFIG,)
    return Teacher(model, lm.fingerprint(directory), config, directory, files)
