"""Causal language modelling: a student predicts each next token of a block.

Inputs: a block of L tokens gives L - 1 cache rows, one per predicted token (`position`
0..L-2), sample-major. Instruction and chat data (a prepared `loss_mask`) give rows for the
response positions only: position t has a row when token t + 1 is a response token, so the
number of rows varies from block to block, and every loss and score covers those rows alone.
`TokenRows` (`next_token`) wraps a Hugging Face causal LM so that the training loop sees what
it sees for images: a batch of blocks in, one row of logits per predicted token out, lined up
with the cache rows of its `block_set`. The true label of a row is the next token (text is its
own label, on every split); the baseline twin is the same student trained on the same blocks
with the next-token loss alone and the same budget ("the text alone"). A student is any
transformers model_type with a causal LM head (`arch`, `arch_kwargs`), started at random, from
the teacher's layers (`init: teacher`) or from a local pretrained directory (`init: DIR`); it is
a Hugging Face directory (`lm.save`) plus `student.json`, scored by test perplexity and bits
per character, and on instruction data by exact match (`kd.exact_match`). A student with its
own tokenizer is `cross_tokenizer`'s.

What both token tasks share is `lm_common`; the text teacher of either objective is trained by
`kd.lm_training` (`kd teacher` trains a transformers model_type) and loaded by `kd.lm` (`kd
label` loads any local Hugging Face causal or masked LM and refuses data cut with another
tokenizer).
"""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd import exact_match, features, lm, lm_training, loader, metrics
from kd.cache import Cache, Teacher
from kd.cache.batch import Batch
from kd.cache.reader import SoftTargets
from kd.config import EvalConfig, LabelConfig, StudentConfig
from kd.errors import ConfigError, InputError
from kd.files import read_json
from kd.methods import supported
from kd.prepared import data_fingerprint, retokenized, tokens
from kd.tasks import cross_tokenizer, lm_common
from kd.tasks.lm_common import (
    STUDENT_RECORD,
    build_model,
    check_token_student,
    check_tokenizer,
    evaluate_rows,
    init_identity,
    student_tokenizer,
    token_summary,
)
from kd.tasks.next_token import TokenRows, block_set, blocks_and_targets, model_input, next_token_logits, token_rows

NAME, OBJECTIVE = "causal_lm", "causal"
TWIN_LOSS = "next-token"  # what the baseline twin learns from, for messages

# Members of the task that both token tasks share: a student is a Hugging Face directory plus
# student.json (`lm_common.save`; `load`: not an assistant so far); the teacher, of either
# objective, is trained by `lm_training` and loaded by `lm`.
load, save = lm_common.load, lm_common.save
train_teacher, load_teacher = lm_training.train_teacher, lm.load_teacher


# Cache columns between `view` and the soft targets: the predicting token's index in its block.
ROW_COLUMNS: tuple[str, ...] = ("position",)


class Inputs:
    """Blocks of tokens for a causal language model (a Hugging Face `...ForCausalLM`)."""

    row_columns = ROW_COLUMNS

    def __init__(self, prepared: Path, splits: list[str], cfg: LabelConfig):
        if cfg.views:
            raise ConfigError(f"label.views: {cfg.views}; augmented views are for images, text has none (set 0)")
        self.infos = {s: tokens.split_info(prepared / f"{s}.parquet") for s in splits}
        self.block_size = self.infos["labeled"]["block_size"]
        self.input_shape = [self.block_size]
        self.per_sample = self.block_size - 1  # the most rows a block has
        self.response_only = self.infos["labeled"]["response_only"]
        masks = {s: tokens.predicted(prepared / f"{s}.parquet") for s in splits}
        self.counts = {s: None if m is None else m.sum(1).astype(np.int64) for s, m in masks.items()}
        self.cfg, self.prepared = cfg, prepared

    def samples(self, split: str) -> int:
        return self.infos[split]["rows"]

    def row_counts(self, split: str) -> np.ndarray:
        """Cache rows of each block: its predicted positions (`per_sample` for every block of
        plain text, and of a masked LM's maskings)."""
        if self.counts[split] is None:
            return np.full(self.samples(split), self.per_sample, np.int64)
        return self.counts[split]

    def check_teacher(self, teacher: Teacher, prepared: Path) -> None:
        lm.check_teacher(teacher, prepared, self.infos)

    def header(self) -> dict[str, Any]:
        info = self.infos["labeled"]
        return {"input_shape": self.input_shape,
                "text": {"objective": OBJECTIVE, "block_size": self.block_size, "positions": self.per_sample,
                         "vocab_size": info["vocab_size"], "tokenizer_sha256": info["tokenizer_sha256"],
                         **({"response_only": True} if self.response_only else {})}}

    def teacher_scores(self, model: nn.Module) -> dict[str, float]:
        """Instruction data: the teacher's exact match on the test turns (all, first), greedy,
        in batches of as many blocks as a labeling batch holds (`kd.exact_match`); none for
        plain text."""
        if self.counts["test"] is None:
            return {}
        return exact_match.scores(model, self.prepared, max(1, self.cfg.batch_size // self.per_sample))

    def probe(self) -> torch.Tensor:
        """Two tokens: enough for the number of classes and a layer's width, at a sliver of a
        block's forward (at a 152k vocabulary a block's output layer is most of it)."""
        return torch.zeros(1, 2, dtype=torch.long)

    def logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return teacher_rows(model, tokens.to(lm.device_of(model)))

    def feature_spec(self, layer: str, mode: str, captured: Any) -> dict[str, Any]:
        """One hidden state per token row, cached in full."""
        if mode != "full":
            raise ConfigError(f"label.features.{layer}: mode {mode!r}; token rows cache hidden states "
                              "in full (one vector per token)")
        shape = [lm.hidden(captured).shape[-1]]
        return {"name": layer, "mode": mode, "shape": shape, "dtype": "float16", "source_shape": shape}

    def read(self, source: Path, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, tokens and predicted positions of blocks [first, last), reading only the row
        groups that hold them."""
        ids, blocks = tokens.read_rows(source, first, last)
        predicted = tokens.predicted(source, first, last)
        return ids, blocks, np.ones((len(ids), self.per_sample), bool) if predicted is None else predicted

    def batch(self, model: nn.Module, rows: tuple[np.ndarray, np.ndarray, np.ndarray], start: int, stop: int,
              specs: dict[str, dict]) -> Batch:
        ids, tokens, keep = rows[0][start:stop], torch.from_numpy(rows[1][start:stop]), rows[2][start:stop]
        flat = torch.from_numpy(keep.reshape(-1))
        with torch.no_grad(), features.tap(model, list(specs)) as captured:
            logits = self.logits(model, tokens)  # on the teacher's device, in its dtype (`targets.scan` reads it)
            if not flat.all():  # instruction data: the response positions' rows
                logits = logits[flat.to(logits.device)]
            feats = {name: token_rows(captured[name])[flat.to(lm.device_of(model))].to(torch.float16).cpu().numpy()
                     for name in specs}
        counts = keep.sum(1)
        return Batch(np.repeat(ids, counts), np.zeros(int(counts.sum()), dtype=np.int32),
                     np.nonzero(keep)[1].astype(np.int32), logits, feats, tokens[:, 1:].numpy()[keep],
                     np.ones(int(counts.sum()), dtype=bool))


def teacher_rows(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`next_token_logits` of blocks (B, L), with the output layer applied to the L - 1
    predicting positions alone when the model takes `logits_to_keep` (transformers' causal LMs):
    the rows (B * (L - 1), V) are then the output layer's own tensor, not a copy of a (B, L, V)
    one without its last position (at a 152k vocabulary, a second copy of the largest tensor)."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return next_token_logits(model, tokens)
    keep = torch.arange(tokens.shape[1] - 1, device=tokens.device)
    logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), logits_to_keep=keep).logits
    return logits.reshape(-1, logits.shape[-1])  # (B, L - 1, V) contiguous: a view


# --- training ---------------------------------------------------------------------------------


def check(cfg: StudentConfig, cache: Cache, prepared: Path) -> None:
    """What a causal student cannot do yet, said up front."""
    check_tokenizer(cache, prepared, cfg.transfer)
    check_token_student(cfg, cache, prepared, OBJECTIVE, supported(NAME), [("assistant", cfg.assistant),
                                                                 ("views", cfg.views)])
    own = student_tokenizer(cfg, cache, prepared)
    if own is not None:
        cross_tokenizer.check(cfg, cache, own)


def rows(cache: Cache, prepared: Path, cfg: StudentConfig, memory_mb: float) -> loader.SampleSet | loader.StreamingSet:
    """The student's transfer blocks with the cached top-k, lse and next tokens per row: in
    memory if they fit `memory_mb`, else streamed part by part. A student with its own
    tokenizer gets the same blocks in its tokens (`cross_tokenizer.rows`)."""
    own = student_tokenizer(cfg, cache, prepared)
    if own is not None:
        return cross_tokenizer.rows(cache, prepared, cfg, own, memory_mb)
    return loader.transfer_set(cache, cfg, functools.partial(_split_rows, cache, prepared, cfg),
                               8 * cache.manifest["text"]["block_size"], memory_mb)


def _split_rows(cache: Cache, prepared: Path, cfg: StudentConfig, split: str, row_offset: int,
                parts: list[int] | None = None) -> loader.SampleSet:
    source = prepared / f"{split}.parquet"
    ids, tokens, predicted, truth = blocks_and_targets(source, *loader.sample_range(cache, split, parts))
    cache_rows = loader.read_rows(cache, cfg, split, source, ids, truth.numpy(), parts=parts, row_offset=row_offset)
    return block_set(tokens, ids, cache_rows.targets(cfg), predicted)


def twin_rows(cache: Cache, prepared: Path, cfg: StudentConfig, transfer: Any) -> loader.SampleSet:
    """The same blocks with their next tokens alone: the text the twin learns from (in memory:
    tokens only, a small fraction of the student's rows), in the student's own tokens when it
    has its own tokenizer."""
    sets = []
    own = student_tokenizer(cfg, cache, prepared)
    for split in cfg.transfer:
        if own is not None:
            sets.append(cross_tokenizer.twin_set(own, split))
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
    model = build_model(cfg, cache, prepared, OBJECTIVE) if own is None else cross_tokenizer.build(cfg, own)
    return TokenRows(lm.checkpointing(model, cfg.gradient_checkpointing))


def student_shapes(model: nn.Module, cfg: StudentConfig, layers: list[str], cache: Cache) -> dict[str, list[int]]:
    return {}  # no method taps a causal student's layers yet


# --- evaluation -------------------------------------------------------------------------------


def evaluate(student_dir: Path, cache: Cache, prepared: Path, cfg: EvalConfig, spec: StudentConfig
             ) -> tuple[dict[str, Any], dict[str, tuple[list[str], list[dict[str, Any]]]]]:
    """Test perplexity of the student, its twin and the teacher (its own `kd teacher` figure),
    and against the cached teacher (`evaluate_rows`); bits per character for all three
    (`bits_per_char`), so students of other tokenizers compare; for a student with its own
    tokenizer, in its tokens, and how its positions line up with the teacher's
    (`alignment_scores`)."""
    own = student_tokenizer(spec, cache, prepared)
    teacher_predicted = tokens.predicted(prepared / "test.parquet")
    try:
        teacher_chars = retokenized.teacher_characters(prepared.resolve(), "test")
        teacher_chars = int((teacher_chars if teacher_predicted is None else teacher_chars[teacher_predicted]).sum())
    except InputError:  # a tokenizer whose ids do not spell the text back byte for byte: no bits per character
        teacher_chars = None
    compare = teacher_x = None
    if own is None:
        _, blocks, predicted, truth = blocks_and_targets(prepared / "test.parquet")
        characters = teacher_chars  # (None where the text cannot be recovered)
    else:
        test = retokenized.blocks(own.teacher.directory, own.student.directory, "test")
        blocks, predicted = torch.from_numpy(test.tokens), torch.from_numpy(test.predicted)
        truth = blocks[:, 1:][predicted]
        characters = int(test.characters[test.predicted].sum())
        compare = functools.partial(cross_tokenizer.aligned_teacher_rows, test.teacher_row[test.predicted], own.table)
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

    positions = torch.arange(1, blocks.shape[1]).repeat(len(blocks), 1)
    record, plots = evaluate_rows(student_dir, cache, cfg, TokenRows, model_input(blocks, predicted), truth,
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
        record |= {"test_tokens": tokens_scored,
                   **cross_tokenizer.alignment_scores(test, own.table, cache.soft_targets("test", [1.0])),
                   "student_tokenizer": {"sha256": own.student.fingerprint, "vocab_size": own.student.vocab_size}}
    if teacher_predicted is not None and own is None:  # (greedy answers in the teacher's tokens)
        columns, seeds = plots["seeds.csv"]
        matches = exact_matches(student_dir, prepared, cfg)  # per seed: exact_match(_first_turn), baseline_...
        record |= {**matches[0], **exact_match.teacher_scores(cache.manifest, prepared)}
        for key in exact_match.KEYS:  # exact_match_gain_points, exact_match_first_turn_gain_points
            record[f"{key}_gain_points"] = 100.0 * (matches[0][key] - matches[0][f"baseline_{key}"])
            record |= metrics.seed_summary(matches, key, f"{key}_gain_points")
        plots["seeds.csv"] = ([*columns, "student_exact_match", "baseline_exact_match"],
                              [{**row, "student_exact_match": m["exact_match"],
                                "baseline_exact_match": m["baseline_exact_match"]} for row, m in zip(seeds, matches)])
    return record, plots


def bits_per_char(perplexity: float, tokens: int, characters: int | None) -> float | None:
    """The total next-token loss of `tokens` predicted tokens at this perplexity (nats), over
    ln 2 x the characters those tokens cover: a figure that does not depend on the tokenizer."""
    if characters is None:
        return None
    return math.log(perplexity) * tokens / (math.log(2) * characters)


def exact_matches(student_dir: Path, prepared: Path, cfg: EvalConfig) -> list[dict[str, float]]:
    """Instruction data: the share of test turns that the student and its twin answer exactly
    (greedy, until eos, the turn's end token or the end of the block; all turns and first turns:
    `kd.exact_match`), for every seed in the order `evaluate_rows` lists them."""
    return exact_match.exact_matches(student_dir, read_json(student_dir / STUDENT_RECORD), prepared, cfg.batch_size)


def teacher_perplexity(cache: Cache) -> float | None:
    """The teacher's test perplexity, measured by `kd label` on every predicted test token
    (from its full logits, before the top-k), or from `kd teacher`'s metrics for a cache
    written before kd measured it."""
    loss = cache.manifest["fidelity"].get("test", {}).get("teacher_loss")
    if loss is not None:
        return math.exp(loss)
    return cache.manifest["teacher"]["config"].get("metrics", {}).get("perplexity")


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
