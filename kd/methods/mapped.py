"""Soft targets for a student with another tokenizer: the teacher's cached top-k mapped onto
the student's vocabulary where the token texts match exactly (`align.mapping_table`, applied
once when the rows are read: batch key `mapped_idx`), the rest in the tail bucket, then the
usual top-k divergence at T with T^2. Rows of student positions no teacher row lines up with
(`aligned` False) get no term. With the teacher's own tokenizer it is `soft` exactly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd import losses
from kd.methods.common import Built, Shapes
from kd.methods.soft import SoftTerm


def lse_key(temperature: float) -> str:
    """The batch key of the cached lse at `temperature` for the cross-tokenizer terms."""
    return f"lse@{float(temperature):g}"


def aligned_rows(batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """The rows a teacher row lines up with (all when the batch has no `aligned` key: the
    teacher's own tokenizer), as (the batch's keys, the student's logits) on those rows."""
    if "aligned" not in batch:
        return batch, out["logits"]
    keep = batch["aligned"]
    return {k: v[keep] for k, v in batch.items() if k != "x"}, out["logits"][keep]


def on_aligned_rows(loss: Callable) -> Callable:
    """A term that applies `loss(rows, logits)` to the aligned rows, and is 0 (keeping the
    graph) for a batch with none."""
    def term(batch, out):
        rows, logits = aligned_rows(batch, out)
        return loss(rows, logits) if len(logits) else out["logits"].sum() * 0.0
    return term


def aligned(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The rows `on_aligned_rows` terms average over: (N,) bool, or None (all rows)."""
    return batch.get("aligned")


@dataclass
class MappedTerm(SoftTerm):
    """`soft` through the vocabulary mapping: weight * T^2 * D on the aligned rows (D: soft's
    `divergence`)."""


CONFIG = MappedTerm  # students.NAME.loss.mapped
TASKS = ("causal_lm",)
OWN_TOKENIZER = True
KIND = "logits"
ROWS = aligned


def build(cfg: MappedTerm, shapes: Shapes) -> Built:
    key = lse_key(cfg.temperature)
    term = on_aligned_rows(lambda rows, logits: losses.mapped_soft_target_loss(
        logits, rows["mapped_idx"], rows["topk_logit"], rows[key], cfg.temperature, **cfg.loss_kwargs()))
    return Built({"mapped": (cfg.weight, term)})
