"""Pure metrics of predictions: numpy / torch in, floats and arrays out.

Quality against labels (`accuracy`, `per_class_accuracy`, `confusion_matrix`), against the
teacher (`agreement`, `kl_to_teacher` from its cache rows, `pseudo_label_accuracy`),
calibration (`reliability`, `ece`) and the summary over a student's seeds (`mean_std`,
`seed_summary`). Every task's evaluation (`kd.tasks`) is made of these; the timing is
`kd.speed`, the files `kd.evaluation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kd import losses

# Over every seed of the student (the first one included): accuracies are fractions, gains points.
SEED_KEYS = ("seeds", "accuracy_mean", "accuracy_std", "baseline_accuracy_mean", "baseline_accuracy_std",
             "gain_points_mean", "gain_points_std")


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    # pred, y: (N,) int; rows with y < 0 (no label) do not count
    keep = y >= 0
    if not keep.any():
        raise ValueError("accuracy: no labeled rows")
    return float((pred[keep] == y[keep]).mean())


def agreement(student_pred: np.ndarray, teacher_top1: np.ndarray) -> float:
    # student_pred, teacher_top1: (N,) int -> fraction of rows where the two argmaxes agree
    return float((student_pred == teacher_top1).mean())


def kl_to_teacher(student_logits: torch.Tensor, topk_idx: torch.Tensor, topk_logit: torch.Tensor,
                  lse_t1: torch.Tensor) -> tuple[float, bool]:
    # student_logits: (N, C); topk_idx, topk_logit: (N, k) cache rows; lse_t1: (N,) at T=1
    # -> (mean KL(teacher || student) at T=1, exact). With k == C this is the exact KL; with
    # k < C it is the KL of the coarse-grained distributions (top-k classes + one tail
    # bucket), which by the data-processing inequality is a lower bound of the exact KL.
    # An id of -1 (a student of another tokenizer: no token of the same text) counts in the tail.
    kl = losses.mapped_soft_target_loss_per_row(student_logits.double(), topk_idx, topk_logit, lse_t1, 1.0,
                                                tail="bucket")
    return float(kl.mean()), topk_idx.shape[1] == student_logits.shape[1]


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict[str, Any]]:
    # confidence: (N,) max softmax probability; correct: (N,) bool -> one dict per bin.
    # Equal-width bins over [0, 1], bin m holding confidences in (m/M, (m+1)/M] (Guo et al.
    # 2017); a confidence of exactly 0 goes to the first bin. Empty bins: confidence and
    # accuracy are None.
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges[1:], confidence, side="left"), 0, bins - 1)
    table = []
    for m in range(bins):
        inside = index == m
        count = int(inside.sum())
        table.append({
            "bin": m, "lower": float(edges[m]), "upper": float(edges[m + 1]),
            "confidence": float(confidence[inside].mean()) if count else None,
            "accuracy": float(correct[inside].mean()) if count else None,
            "count": count,
        })
    return table


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    # Expected calibration error: sum over bins of |B_m| / N * |accuracy(B_m) - confidence(B_m)|
    n = len(confidence)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in reliability(confidence, correct, bins) if b["count"]))


def per_class_accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    # pred, y: (N,) -> (accuracy per class (C,) with NaN where a class has no sample, support (C,))
    keep = y >= 0
    support = np.bincount(y[keep], minlength=num_classes)
    hits = np.bincount(y[keep], weights=(pred[keep] == y[keep]).astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / np.maximum(support, 1), np.nan), support


def confusion_matrix(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    # pred, y: (N,) -> (C, C) int64 counts, rows = true class, columns = predicted class
    keep = y >= 0
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y[keep], pred[keep]), 1)
    return matrix


def mean_std(values: list[float]) -> tuple[float, float]:
    # -> (mean, sample standard deviation with ddof = 1); the std of a single value is 0.0
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        raise ValueError("mean_std: no values")
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


def seed_summary(rows: list[dict[str, Any]], key: str = "accuracy", change: str = "gain_points",
                 paired: Callable[[float, float], float] = lambda s, b: 100.0 * (s - b)) -> dict[str, Any]:
    # rows: one {"seed", KEY, "baseline_KEY"} per seed -> seeds, KEY_mean/_std, baseline_KEY_mean/_std
    # and CHANGE_mean/_std (the SEED_KEYS for the defaults). The change of a seed is over its own
    # twin (same seed), so the std is that of paired differences.
    summary: dict[str, Any] = {"seeds": len(rows)}
    for name, values in ((key, [r[key] for r in rows]), (f"baseline_{key}", [r[f"baseline_{key}"] for r in rows]),
                         (change, [paired(r[key], r[f"baseline_{key}"]) for r in rows])):
        summary[f"{name}_mean"], summary[f"{name}_std"] = mean_std(values)
    return summary


def pseudo_label_accuracy(teacher_top1: np.ndarray, ids: np.ndarray, truth_ids: np.ndarray,
                          truth_y: np.ndarray) -> float:
    # teacher_top1, ids: (N,) the teacher's argmax per unlabeled sample (view-0 rows);
    # truth_ids, truth_y: (M,) the known labels. Matched by id; every id needs a truth.
    order = np.argsort(truth_ids, kind="stable")
    sorted_ids = truth_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
    if not found.all():
        missing = ids[~found]
        raise ValueError(f"{len(missing)} ids have no known label (e.g. {missing[:5].tolist()})")
    if not len(ids):
        raise ValueError("no unlabeled samples")
    return float((teacher_top1 == truth_y[order][pos]).mean())
