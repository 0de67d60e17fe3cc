"""The report's numbers, computed from loaded students alone (pure: no files): the leaderboard,
the methods table and the progressive-distillation table. Every gain between two students is a
per-seed paired difference (same seed, `Score.paired`), summarised as mean +- sample std.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd import divergences, methods
from kd.metrics import mean_std
from kd.report.results import StudentResult, load_metrics
from kd.report.scores import Score, fmt

# methods.csv's columns
METHODS_COLUMNS = ("group", "setup", "student", "method", "role", "reference", "seeds", "accuracy_mean",
                   "accuracy_std", "gain_over_baseline_mean", "gain_over_baseline_std", "gain_over_soft_mean",
                   "gain_over_soft_std", "paired_seeds", "verdict")
PROGRESSIVE = ("student", "assistant", "assistant_params", "assistant_accuracy", "teacher_params", "teacher_accuracy",
               "student_params", "direct", "direct_accuracy_mean", "direct_accuracy_std", "via_accuracy_mean",
               "via_accuracy_std", "difference_mean", "difference_std", "paired_seeds", "verdict",
               "size_ratio", "direct_gain_mean", "direct_gain_std", "via_gain_mean", "via_gain_std")

# What must match for two students to be compared: the architecture and the whole budget.
# (Defaults stand in for checkpoints written before a key existed.)
SETUP_DEFAULTS: dict[str, Any] = {"arch": None, "arch_kwargs": {}, "epochs": None, "batch_size": None, "lr": None,
                                  "weight_decay": 0.0, "transfer": ["labeled", "unlabeled"], "seed": 0, "repeats": 1,
                                  "views": False, "assistant": None}


def leaderboard(results: list[StudentResult], score: Score) -> list[dict[str, Any]]:
    """One row per student (the task's columns), best mean score over seeds first, then the
    first seed's score. The change column is the first seed's change over its twin."""
    rows = []
    for r in results:
        m = r.metrics
        change = score.paired(m[score.key], m[score.baseline_key])
        rows.append({column: r.name if column == "student" else change if column == score.change_column
                     else m[column] for column in score.columns})
    sign = 1.0 if score.lower_is_better else -1.0
    return sorted(rows, key=lambda row: (sign * row[f"{score.key}_mean"], sign * row[score.key], row["student"]))


def method_label(loss: dict[str, Any]) -> str:
    """A student's method named by its loss methods (in METHODS' order), e.g. "soft + hard + rkd",
    "hard (pseudo)" or "soft (jsd 0.5) + hard" (a divergence other than forward KL)."""
    return " + ".join(_term_label(term, loss[term]) for term in methods.METHODS if loss.get(term) is not None) \
        or "none"


def _term_label(term: str, cfg: dict[str, Any]) -> str:
    if term == "hard" and cfg.get("pseudo"):
        return "hard (pseudo)"
    divergence = cfg.get("divergence", "forward_kl") if term in ("soft", "mapped") else "forward_kl"
    if divergence == "forward_kl":
        return term
    key, default = divergences.WEIGHTS.get(divergence, (None, None))
    weight = default if key is None or cfg.get(key) is None else cfg[key]
    return f"{term} ({divergence}{'' if weight is None else f' {weight:g}'})"


def is_soft_only(loss: dict[str, Any]) -> bool:
    """Soft targets with no other method than hard labels (KIND "labels"): the reference a group's
    other methods are measured against."""
    others = [term for term in methods.METHODS if term != "soft" and loss.get(term) is not None]
    return loss.get("soft") is not None and all(methods.METHODS[term].KIND == "labels" for term in others)


def setup(spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The architecture and budget of a student (SETUP_DEFAULTS' keys)."""
    return {**{key: spec.get(key, default) for key, default in SETUP_DEFAULTS.items()}, **changes}


def canonical(value: Any) -> str:
    """A key that equal configs share whether a number was written 0 or 0.0 (YAML keeps either)."""
    def norm(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return json.dumps(norm(value), sort_keys=True)


def describe_setup(s: dict[str, Any]) -> str:
    kwargs = f" `{json.dumps(s['arch_kwargs'], sort_keys=True)}`" if s["arch_kwargs"] else ""
    seeds = f"seed {s['seed']}" if s["repeats"] == 1 else f"seeds {s['seed']}..{s['seed'] + s['repeats'] - 1}"
    text = (f"`{s['arch']}`{kwargs}, epochs {s['epochs']}, batch {s['batch_size']}, lr {fmt(s['lr'], 'g')}, "
            f"weight decay {fmt(s['weight_decay'], 'g')}, transfer {'+'.join(s['transfer'])}, {seeds}")
    if s["views"]:
        text += ", cached views"
    if s["assistant"]:
        text += f", through assistant `{s['assistant']}`"
    return text


def verdict(mean: float | None, std: float | None, n: int) -> str:
    """Plain words for a gain of mean +- std points over n paired seeds."""
    if n == 0 or mean is None:
        return "no common seed"
    if abs(mean) <= std + 1e-9:
        words = "no measurable gain"
    elif mean < 0:
        words = "hurts"
    else:
        words = "helps"
    return words + (" (one seed: no spread to judge by)" if n == 1 else "")


def _paired_gain(a: StudentResult, b: StudentResult | None, score: Score, prefix: str) -> dict[str, Any]:
    """`a` against `b` over the seeds both have, each seed's change by `Score.paired`: PREFIX_mean,
    PREFIX_std, paired_seeds and the verdict (all None when there is no `b`)."""
    if b is None:
        return {f"{prefix}_mean": None, f"{prefix}_std": None, "paired_seeds": None, "verdict": None}
    common = sorted(set(a.seeds) & set(b.seeds), key=_seed_order)
    diffs = [score.paired(a.seeds[s][score.key], b.seeds[s][score.key]) for s in common]
    mean, std = mean_std(diffs) if diffs else (None, None)
    return {f"{prefix}_mean": mean, f"{prefix}_std": std, "paired_seeds": len(diffs),
            "verdict": verdict(mean, std, len(diffs))}


def _summary(r: StudentResult, key: str, prefix: str) -> dict[str, Any]:
    """A student's KEY_mean and KEY_std from metrics.json, as PREFIX_mean and PREFIX_std."""
    return {f"{prefix}_mean": r.metrics[f"{key}_mean"], f"{prefix}_std": r.metrics[f"{key}_std"]}


def methods_table(results: list[StudentResult], score: Score) -> list[dict[str, Any]]:
    """METHODS_COLUMNS rows: students grouped by architecture and budget; in each group every student
    against the soft-only reference (the first by name when there are several)."""
    groups: dict[str, list[StudentResult]] = {}
    for r in sorted(results, key=lambda r: r.name):
        groups.setdefault(canonical(setup(r.spec)), []).append(r)
    rows = []  # the largest groups (the most comparisons) first
    for number, members in enumerate(sorted(groups.values(), key=lambda g: (-len(g), g[0].name)), start=1):
        reference = next((r for r in members if is_soft_only(r.spec.get("loss") or {})), None)
        for r in ([reference] if reference else []) + [r for r in members if r is not reference]:
            row = {"group": number, "setup": describe_setup(setup(r.spec)), "student": r.name,
                   "method": method_label(r.spec.get("loss") or {}), "reference": reference.name if reference else None,
                   "seeds": r.metrics["seeds"], **_summary(r, score.key, "accuracy"),
                   **_summary(r, score.change_key, "gain_over_baseline"),
                   **_paired_gain(r, reference if r is not reference else None, score, "gain_over_soft")}
            if reference is None:
                row.update(role="no soft-only reference", verdict="no soft-only reference")
            elif r is reference:
                row.update(role="reference", verdict="reference (soft targets alone)")
            else:
                row["role"] = "compared"
            rows.append(row)
    return rows


def progressive_table(results: list[StudentResult], assistants: dict[str, dict[str, Any]] | None,
                      score: Score) -> list[dict[str, Any]]:
    """PROGRESSIVE rows: each student taught through an assistant (its params and accuracy from
    `assistants`, name -> `results.assistant_info`) against the student with the
    same architecture, budget and loss taught directly by the teacher. For the capacity gap,
    each row also has the teacher/student size ratio and both students' gains over their
    twins (the same twins: same architecture, seed and budget)."""
    rows = []
    ordered = sorted(results, key=lambda r: r.name)
    for r in ordered:
        name = r.spec.get("assistant")
        if not name:
            continue
        wanted = (canonical(setup(r.spec, assistant=None)), canonical(r.spec.get("loss")))
        direct = next((d for d in ordered if d is not r
                       and (canonical(setup(d.spec)), canonical(d.spec.get("loss"))) == wanted), None)
        info = (assistants or {}).get(name) or {"params": None, "accuracy": None}
        row = {"student": r.name, "assistant": name, "assistant_params": info["params"],
               "assistant_accuracy": info["accuracy"], "teacher_params": r.metrics["teacher_params"],
               "teacher_accuracy": r.metrics[score.teacher_key], "student_params": r.metrics["params"],
               "direct": direct.name if direct else None, **_summary(r, score.key, "via_accuracy"),
               **_paired_gain(r, direct, score, "difference"), "size_ratio": _ratio(r.metrics),
               **_summary(r, score.change_key, "via_gain")}
        if direct is None:
            row.update(direct_accuracy_mean=None, direct_accuracy_std=None, direct_gain_mean=None, direct_gain_std=None,
                       verdict="no direct counterpart (same architecture, budget and loss without an assistant)")
        else:
            row.update(**_summary(direct, score.key, "direct_accuracy"),
                       **_summary(direct, score.change_key, "direct_gain"))
        rows.append(row)
    return rows


def _ratio(metrics: dict[str, Any]) -> float | None:
    """The teacher's parameters over the student's (None when either is unknown)."""
    teacher, student = metrics.get("teacher_params"), metrics.get("params")
    return teacher / student if teacher and student else None


def _seed_order(seed: str) -> tuple[int, Any]:
    try:
        return 0, int(seed)
    except ValueError:
        return 1, seed


TEST_SETS = ("student", "test_set", "seeds", "score_mean", "score_std", "baseline_mean", "baseline_std",
             "change_mean", "change_std")


def test_sets_table(results: list[StudentResult], score: Score, test_sets: dict[str, Path]) -> list[dict[str, Any]]:
    """Each student's score, its twins' and the paired change, over seeds, on the cache's own test
    split ("cache") and on every other test set: `kd eval NAME --out DIR/NAME` with another
    `--prepared` and `--cache` (label -> DIR)."""
    rows = []
    for result in results:
        scored = {"cache": result.metrics}
        for label, directory in test_sets.items():
            scored[label] = load_metrics(Path(directory) / result.name, result.name, score)
        for label, metrics in scored.items():
            rows.append({"student": result.name, "test_set": label, "seeds": metrics["seeds"],
                         **{f"{column}_{stat}": metrics.get(f"{key}_{stat}")
                            for column, key in (("score", score.key), ("baseline", score.baseline_key),
                                                ("change", score.change_key)) for stat in ("mean", "std")}})
    return rows
