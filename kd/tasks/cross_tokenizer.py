"""A causal student with its own tokenizer: the teacher's text read in the student's tokens.

A student whose tokenizer (`tokenizer: DIR`, or its `init` directory's) is not the teacher's
reads the same blocks in its own tokens (`prepared.retokenized`), each row carrying the cache
row it lines up with through the text (`align`), for the loss terms `mapped` and `uld`; its
twin learns from the same text in the same tokens. Here: what such a student cannot do
(`check`), its rows (`rows`, `twin_set`), its build (`build`), and how its rows are measured
against the teacher's (`aligned_teacher_rows`, `alignment_scores`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd import lm, loader
from kd.cache import Cache
from kd.cache.reader import SoftTargets
from kd.config import StudentConfig
from kd.errors import ConfigError
from kd.methods import chosen, supported
from kd.prepared import retokenized, tokens
from kd.tasks.lm_common import read_back
from kd.tasks.next_token import block_set, blocks_and_targets


def check(cfg: StudentConfig, cache: Cache, own: retokenized.Pair) -> None:
    """What a student with its own tokenizer (`own`, the pair `lm_common.student_tokenizer`
    found) cannot do: the loss terms that need the teacher's vocabulary, a start from the
    teacher's layers, the teacher's argmax as its label; and its directory must read its
    tokenizer back as itself."""
    source = "tokenizer" if cfg.tokenizer is not None else "init"
    differs = (f"the student's tokenizer ({source}: {own.student.describe()}) is another tokenizer than the "
               f"cache {cache.root}'s teacher's ({own.teacher.describe()})")
    other = [name for name in chosen(cfg.loss) if name not in supported("causal_lm", own_tokenizer=True)]
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


def check_own_tokenizer(cfg: StudentConfig, own: retokenized.Pair) -> None:
    """A student with its own Hugging Face tokenizer: its directory must read it back as itself
    (the same rule as `lm_common.check_student_tokenizer`)."""
    if not (own.student.directory / tokens.HF_TOKENIZER_CONFIG).is_file():
        return
    config, found = read_back(cfg, own.student.directory)
    if found.fingerprint != own.student.fingerprint:
        raise ConfigError(f"{cfg.where}.arch: in a {config.model_type} directory transformers reads the student's "
                          f"tokenizer {own.student.describe()} as {type(found.hf).__name__} (sha256 "
                          f"{found.fingerprint[:12]}, vocabulary {found.vocab_size}): the student would not read its "
                          "own text as it learned it; choose the model_type its tokenizer comes from")


def rows(cache: Cache, prepared: Path, cfg: StudentConfig, own: retokenized.Pair, memory_mb: float
         ) -> loader.SampleSet | loader.StreamingSet:
    """The student's transfer blocks in its own tokens, one row per taught position, in memory
    if they fit `memory_mb`, else streamed part by part (`split_rows`)."""
    read = functools.partial(split_rows, cache, prepared, cfg, own)
    return loader.transfer_set(cache, cfg, read, 16 * retokenized.block_size(own.teacher.directory,
                                                                             own.student.directory), memory_mb)


def split_rows(cache: Cache, prepared: Path, cfg: StudentConfig, own: retokenized.Pair, split: str,
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


def twin_set(own: retokenized.Pair, split: str) -> loader.SampleSet:
    """A transfer split's blocks in the student's tokens with their next tokens alone (in
    memory): what the twin of a student with its own tokenizer learns from."""
    found = retokenized.blocks(own.teacher.directory, own.student.directory, split)
    predicted = torch.from_numpy(found.predicted)
    return block_set(torch.from_numpy(found.tokens), found.ids,
                     {"label": torch.from_numpy(found.tokens[:, 1:][found.predicted])}, predicted)


def build(cfg: StudentConfig, own: retokenized.Pair) -> nn.Module:
    """A fresh student of its own tokenizer (seed torch first): from its `init` directory, whose
    vocabulary and context must cover its tokens and blocks, or built at random to fit them."""
    length = retokenized.block_size(own.teacher.directory, own.student.directory)
    if cfg.init is not None:
        model = lm.load(Path(cfg.init))
        for key, least in (("vocab_size", own.student.vocab_size), ("max_position_embeddings", length)):
            if getattr(model.config, key, least) < least:
                raise ConfigError(f"{cfg.where}.init: {cfg.init} has {key} {getattr(model.config, key)}, fewer "
                                  f"than the student's tokens need ({least})")
        return model
    return lm.build(cfg.arch, cfg.arch_kwargs, own.student.vocab_size, length, own.student.special,
                    where=cfg.where, objective="causal")


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
