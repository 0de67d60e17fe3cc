"""The report over every evaluated student: a leaderboard, method comparisons, and plots.

`write_report` reads each student's `metrics.json` and `plots/seeds.csv` (written by
`kd eval`), `config.json`, `baseline/config.json`, `train_log.csv` and, for the best student,
`plots/`; for progressive distillation also each named assistant's `config.json` and cache
manifest under `assistants/`. It writes

    <out>/leaderboard.csv            one row per student, best mean accuracy over seeds first
    <out>/methods.csv                per architecture and budget: each method's gain over soft targets alone
    <out>/progressive.csv            each student taught through an assistant vs the same student taught directly
    <out>/report.md                  teacher and cache, the tables, one sentence per student and per comparison
    <out>/accuracy_vs_params.png     teacher, assistants, students and baselines (mean +- std over seeds, log-x)
    <out>/gains.png                  gains over soft alone and through assistants (mean +- std, points)
    <out>/training_curves.png        every logged loss term per epoch, one panel per student (first seed)
    <out>/per_class.png              per-class accuracy of the best student vs its baseline (first seed)
    <out>/confusion.png              the best student's confusion matrix (first seed)

into a temporary directory that replaces `out` only once complete. Every number comes from
those files; a gain is a per-seed paired difference (same seed), as mean +- sample std.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pipeline.cache.layout import lse_column
from pipeline.errors import InputError, MissingInputError
from pipeline.metrics import METRICS_FILE, PLOTS_DIR, SEED_KEYS, mean_std
from pipeline.files import read_json, swap_into_place

NEEDED = ("accuracy", "baseline_accuracy", "teacher_accuracy", "accuracy_retained", "agreement", "kl_to_teacher",
          "ece", "params", "teacher_params", "size_bytes", "throughput", "speedup_vs_teacher", *SEED_KEYS)
LEADERBOARD = ("student", "params", "size_bytes", "throughput", "accuracy", "baseline_accuracy", "accuracy_retained",
               "agreement", "kl_to_teacher", "ece", "gain_over_baseline_points", "speedup_vs_teacher", "seeds",
               "accuracy_mean", "accuracy_std", "gain_points_mean", "gain_points_std")
METHODS = ("group", "setup", "student", "method", "role", "reference", "seeds", "accuracy_mean", "accuracy_std",
           "gain_over_baseline_mean", "gain_over_baseline_std", "gain_over_soft_mean", "gain_over_soft_std",
           "paired_seeds", "verdict")
PROGRESSIVE = ("student", "assistant", "assistant_params", "assistant_accuracy", "teacher_params", "teacher_accuracy",
               "student_params", "direct", "direct_accuracy_mean", "direct_accuracy_std", "via_accuracy_mean",
               "via_accuracy_std", "difference_mean", "difference_std", "paired_seeds", "verdict")
PLOTS = ("accuracy_vs_params.png", "gains.png", "training_curves.png", "per_class.png", "confusion.png")
SEEDS_FILE = "seeds.csv"

# What must match for two students to be compared: the architecture and the whole budget.
# (Defaults stand in for checkpoints written before a key existed.)
SETUP_DEFAULTS: dict[str, Any] = {"arch": None, "arch_kwargs": {}, "epochs": None, "batch_size": None, "lr": None,
                                  "weight_decay": 0.0, "transfer": ["labeled", "unlabeled"], "seed": 0, "repeats": 1,
                                  "views": False, "assistant": None}
FEATURE_TERMS = ("hint", "attention", "rkd", "cosine")
LOSS_TERMS = ("soft", "hard", *FEATURE_TERMS)
NOT_TERMS = ("epoch", "lr", "seconds")  # train_log.csv columns that are not loss terms


@dataclass
class StudentResult:
    name: str
    directory: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    baseline_config: dict[str, Any]
    log: list[dict[str, float]]  # train_log.csv: one dict per epoch
    seeds: dict[str, dict[str, float]] = field(default_factory=dict)  # seeds.csv: seed -> accuracies

    @property
    def spec(self) -> dict[str, Any]:
        """The StudentConfig the checkpoint was trained with, as a dict."""
        return self.config.get("student") or {}


# --- reading ---------------------------------------------------------------------------------


def student_dirs(students_dir: Path) -> list[str]:
    """Names of the trained students under `students_dir` (directories holding a config.json)."""
    if not students_dir.is_dir():
        return []
    return sorted(p.name for p in students_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".tmp")
                  and (p / "config.json").is_file())


def load_student(students_dir: Path, name: str) -> StudentResult:
    directory = students_dir / name
    if not directory.is_dir():
        raise MissingInputError(f"{directory}: student {name!r} not found (run `kd distill {name}` and `kd eval {name}`)")
    metrics_path = directory / METRICS_FILE
    if not metrics_path.is_file():
        raise MissingInputError(f"{metrics_path}: not found; student {name!r} is not evaluated (run `kd eval {name}`)")
    metrics = read_json(metrics_path)
    missing = [key for key in NEEDED if key not in metrics] if isinstance(metrics, dict) else list(NEEDED)
    if missing:
        raise InputError(f"{metrics_path}: missing key {missing[0]!r} (run `kd eval {name}` again)")
    for path in (directory / "config.json", directory / "baseline" / "config.json", directory / "train_log.csv"):
        if not path.is_file():
            raise MissingInputError(f"{path}: not found (run `kd distill {name}`)")
    return StudentResult(name, directory, metrics, read_json(directory / "config.json"),
                         read_json(directory / "baseline" / "config.json"), read_log(directory / "train_log.csv"),
                         read_seeds(directory / PLOTS_DIR / SEEDS_FILE, name, metrics["seeds"]))


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "epoch" not in rows[0] or "total" not in rows[0]:
        raise InputError(f"{path}: expected a training log with columns epoch and total")
    try:
        return [{k: float(v) for k, v in row.items()} for row in rows]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: a value is not a number ({exc})") from None


def read_seeds(path: Path, name: str, count: int) -> dict[str, dict[str, float]]:
    """seeds.csv of `kd eval`: seed -> {accuracy, baseline_accuracy}; `count` rows, as metrics.json says."""
    rows = read_plot_csv(path, name)
    try:
        seeds = {row["seed"]: {"accuracy": float(row["accuracy"]), "baseline_accuracy": float(row["baseline_accuracy"])}
                 for row in rows}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: expected columns seed, accuracy, baseline_accuracy with numbers ({exc}); "
                         f"run `kd eval {name}` again") from None
    if len(seeds) != len(rows) or len(rows) != count:
        raise InputError(f"{path}: {len(rows)} rows ({len(seeds)} distinct seeds), but its metrics.json counts "
                         f"{count} seeds; run `kd eval {name}` again")
    return seeds


def read_plot_csv(path: Path, name: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise MissingInputError(f"{path}: not found (run `kd eval {name}`)")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assistant_info(assistants: Path | None, name: str) -> dict[str, Any]:
    """An assistant's parameter count (its config.json) and test accuracy (its own cache's
    fidelity statistics); None for what is not there."""
    info: dict[str, Any] = {"params": None, "accuracy": None}
    if assistants is None:
        return info
    config_path = Path(assistants) / name / "config.json"
    manifest_path = Path(assistants) / name / "outputs" / "manifest.json"
    if config_path.is_file():
        info["params"] = read_json(config_path).get("params")
    if manifest_path.is_file():
        info["accuracy"] = read_json(manifest_path).get("fidelity", {}).get("test", {}).get("teacher_accuracy")
    return info


# --- numbers and words ------------------------------------------------------------------------


def leaderboard(results: list[StudentResult]) -> list[dict[str, Any]]:
    """One row per student (LEADERBOARD columns), best mean accuracy over seeds first."""
    rows = []
    for r in results:
        m = r.metrics
        rows.append({
            "student": r.name,
            **{key: m[key] for key in ("params", "size_bytes", "throughput", "accuracy", "baseline_accuracy",
                                       "accuracy_retained", "agreement", "kl_to_teacher", "ece")},
            "gain_over_baseline_points": 100.0 * (m["accuracy"] - m["baseline_accuracy"]),
            "speedup_vs_teacher": m["speedup_vs_teacher"],
            **{key: m[key] for key in LEADERBOARD[12:]},  # over every seed
        })
    return sorted(rows, key=lambda row: (-row["accuracy_mean"], -row["accuracy"], row["student"]))


def sentence(name: str, metrics: dict[str, Any]) -> str:
    """The seed's DistilBERT-style summary of one student, computed from its metrics."""
    parts = []
    if metrics.get("teacher_params"):
        smaller = 100.0 * (1.0 - metrics["params"] / metrics["teacher_params"])
        parts.append(f"{abs(smaller):.0f}% smaller" if smaller >= 0 else f"{abs(smaller):.0f}% larger")
    else:
        parts.append("size vs the teacher unknown")
    speedup = metrics.get("speedup_vs_teacher")
    if speedup is None:
        parts.append("speed vs the teacher unknown")
    elif speedup >= 1:
        parts.append(f"{speedup:.1f}x faster")
    else:
        parts.append(f"{1.0 / speedup:.1f}x slower")
    gain = round(100.0 * (metrics["accuracy"] - metrics["baseline_accuracy"]), 1) + 0.0  # + 0.0: no "-0.0"
    retained = 100.0 * metrics["accuracy_retained"] if metrics.get("accuracy_retained") is not None else None
    keeps = f"keeps {retained:.1f}% of the teacher's accuracy" if retained is not None else "teacher accuracy unknown"
    return f"**{name}**: {', '.join(parts)}, {keeps} ({gain:+.1f} points over training on labels alone)."


def seeds_sentence(metrics: dict[str, Any]) -> str:
    """Mean +- std over seeds, when there is more than the first."""
    n = metrics["seeds"]
    if n < 2:
        return ""
    return (f" Over {n} seeds: accuracy {metrics['accuracy_mean']:.4f} ± {metrics['accuracy_std']:.4f}, "
            f"{_signed(metrics['gain_points_mean'])} ± {metrics['gain_points_std']:.2f} points over the baseline "
            "twins.")


def method_label(loss: dict[str, Any]) -> str:
    """A student's method named by its loss terms, e.g. "soft + hard + rkd" or "hard (pseudo)"."""
    names = []
    for term in LOSS_TERMS:
        cfg = loss.get(term)
        if cfg is None:
            continue
        if term == "hard" and cfg.get("pseudo"):
            names.append("hard (pseudo)")
        else:
            names.append(term)
    return " + ".join(names) or "none"


def is_soft_only(loss: dict[str, Any]) -> bool:
    """Soft targets without any feature term: the reference a group's other methods are measured against."""
    return loss.get("soft") is not None and all(loss.get(term) is None for term in FEATURE_TERMS)


def setup(spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The architecture and budget of a student (SETUP_DEFAULTS' keys)."""
    return {**{key: spec.get(key, default) for key, default in SETUP_DEFAULTS.items()}, **changes}


def canonical(value: Any) -> str:
    """A key that equal configs share whether a number was written 0 or 0.0 (YAML keeps either)."""
    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v
    return json.dumps(norm(value), sort_keys=True)


def describe_setup(s: dict[str, Any]) -> str:
    kwargs = f" `{json.dumps(s['arch_kwargs'], sort_keys=True)}`" if s["arch_kwargs"] else ""
    seeds = f"seed {s['seed']}" if s["repeats"] == 1 else f"seeds {s['seed']}..{s['seed'] + s['repeats'] - 1}"
    text = (f"`{s['arch']}`{kwargs}, epochs {s['epochs']}, batch {s['batch_size']}, lr {_fmt(s['lr'], 'g')}, "
            f"weight decay {_fmt(s['weight_decay'], 'g')}, transfer {'+'.join(s['transfer'])}, {seeds}")
    if s["views"]:
        text += ", cached views"
    if s["assistant"]:
        text += f", through assistant `{s['assistant']}`"
    return text


def paired_points(a: StudentResult, b: StudentResult) -> list[float]:
    """Per-seed test accuracy of `a` minus that of `b`, in points, over the seeds both have."""
    common = sorted(set(a.seeds) & set(b.seeds), key=_seed_order)
    return [100.0 * (a.seeds[s]["accuracy"] - b.seeds[s]["accuracy"]) for s in common]


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


def _gain(a: StudentResult, b: StudentResult) -> tuple[float | None, float | None, int]:
    diffs = paired_points(a, b)
    if not diffs:
        return None, None, 0
    mean, std = mean_std(diffs)
    return mean, std, len(diffs)


def methods_table(results: list[StudentResult]) -> list[dict[str, Any]]:
    """METHODS rows: students grouped by architecture and budget; in each group every student
    against the soft-only reference (the first by name when there are several)."""
    groups: dict[str, list[StudentResult]] = {}
    for r in sorted(results, key=lambda r: r.name):
        groups.setdefault(canonical(setup(r.spec)), []).append(r)
    rows = []  # the largest groups (the most comparisons) first
    for number, members in enumerate(sorted(groups.values(), key=lambda g: (-len(g), g[0].name)), start=1):
        references = [r for r in members if is_soft_only(r.spec.get("loss") or {})]
        reference = references[0] if references else None
        ordered = ([reference] if reference else []) + [r for r in members if r is not reference]
        for r in ordered:
            m = r.metrics
            row = {"group": number, "setup": describe_setup(setup(r.spec)), "student": r.name,
                   "method": method_label(r.spec.get("loss") or {}), "reference": reference.name if reference else None,
                   "seeds": m["seeds"], "accuracy_mean": m["accuracy_mean"], "accuracy_std": m["accuracy_std"],
                   "gain_over_baseline_mean": m["gain_points_mean"], "gain_over_baseline_std": m["gain_points_std"],
                   "gain_over_soft_mean": None, "gain_over_soft_std": None, "paired_seeds": None}
            if reference is None:
                row.update(role="no soft-only reference", verdict="no soft-only reference")
            elif r is reference:
                row.update(role="reference", verdict="reference (soft targets alone)")
            else:
                mean, std, n = _gain(r, reference)
                row.update(role="compared", gain_over_soft_mean=mean, gain_over_soft_std=std, paired_seeds=n,
                           verdict=verdict(mean, std, n))
            rows.append(row)
    return rows


def progressive_table(results: list[StudentResult], assistants: Path | None) -> list[dict[str, Any]]:
    """PROGRESSIVE rows: each student taught through an assistant against the student with the
    same architecture, budget and loss taught directly by the teacher."""
    rows = []
    for r in sorted(results, key=lambda r: r.name):
        name = r.spec.get("assistant")
        if not name:
            continue
        wanted = (canonical(setup(r.spec, assistant=None)), canonical(r.spec.get("loss")))
        direct = next((d for d in sorted(results, key=lambda d: d.name) if d is not r
                       and (canonical(setup(d.spec)), canonical(d.spec.get("loss"))) == wanted), None)
        info = assistant_info(assistants, name)
        row = {"student": r.name, "assistant": name, "assistant_params": info["params"],
               "assistant_accuracy": info["accuracy"], "teacher_params": r.metrics["teacher_params"],
               "teacher_accuracy": r.metrics["teacher_accuracy"], "student_params": r.metrics["params"],
               "direct": None, "direct_accuracy_mean": None, "direct_accuracy_std": None,
               "via_accuracy_mean": r.metrics["accuracy_mean"], "via_accuracy_std": r.metrics["accuracy_std"],
               "difference_mean": None, "difference_std": None, "paired_seeds": None,
               "verdict": "no direct counterpart (same architecture, budget and loss without an assistant)"}
        if direct is not None:
            mean, std, n = _gain(r, direct)
            row.update(direct=direct.name, direct_accuracy_mean=direct.metrics["accuracy_mean"],
                       direct_accuracy_std=direct.metrics["accuracy_std"], difference_mean=mean,
                       difference_std=std, paired_seeds=n, verdict=verdict(mean, std, n))
        rows.append(row)
    return rows


def _seed_order(seed: str) -> tuple[int, Any]:
    try:
        return 0, int(seed)
    except ValueError:
        return 1, seed


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _signed(points: float) -> str:
    return format(round(points, 2) + 0.0, "+.2f")  # + 0.0: no "-0.00"


def _pm(mean: Any, std: Any, spec: str = ".4f") -> str:
    # "mean ± std": accuracies as fractions formatted by `spec`, gains as signed points ("points")
    if mean is None:
        return "n/a"
    if spec == "points":
        return f"{_signed(mean)} ± {std:.2f}"
    return f"{format(mean, spec)} ± {format(std, spec)}"


def markdown(rows: list[dict[str, Any]], results: list[StudentResult], manifest: dict[str, Any],
             cache_root: Path, methods: list[dict[str, Any]] | None = None,
             progressive: list[dict[str, Any]] | None = None) -> str:
    teacher = manifest.get("teacher", {})
    config = teacher.get("config") or {}
    first = results[0].metrics
    teacher_accuracy = manifest.get("fidelity", {}).get("test", {}).get("teacher_accuracy", first["teacher_accuracy"])
    kwargs = f" `{json.dumps(config['arch_kwargs'])}`" if config.get("arch_kwargs") else ""
    params = first.get("teacher_params")
    kept = []
    for t in manifest.get("temperatures", []):
        name = lse_column(t).removeprefix("lse_")  # fidelity keys: t1, t4, t2_5
        per_split = [f"{split} {stats[name]['kept_mass']:.4f}" for split, stats in manifest.get("fidelity", {}).items()
                     if name in stats]
        kept.append(f"T={t}: {', '.join(per_split)}")
    lines = [
        "# Distillation report",
        "",
        f"Teacher: `{config.get('arch', '?')}`{kwargs}, {_fmt(params, ',')} parameters, "
        f"test accuracy {_fmt(teacher_accuracy, '.4f')} (fingerprint `{str(teacher.get('fingerprint', '?'))[:12]}`).",
        f"Cache `{cache_root}`: the teacher's top-{manifest.get('top_k')} of {manifest.get('num_classes')} logits per row "
        f"({manifest.get('logit_dtype')}), temperatures {manifest.get('temperatures')}, "
        f"{manifest.get('views', {}).get('count', 0)} augmented views per sample.",
        f"Mean probability mass the top-k keeps: {'; '.join(kept) or 'n/a'}.",
        "",
        "Each student is compared with its baseline twin: the same architecture, seed and training budget, "
        "trained on the labeled split's hard labels only. Speed is measured on CPU side by side with a "
        "random-weight copy of the teacher's architecture. The columns up to speedup are the first seed's; "
        "the last is the mean ± sample std of the test accuracy over every seed.",
        "",
        "| student | params | size (bytes) | samples/s | accuracy | baseline | retained | agreement | KL | ECE "
        "| gain (points) | speedup | accuracy over seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['student']} | {_fmt(row['params'], ',')} | {_fmt(row['size_bytes'], ',')} "
            f"| {_fmt(row['throughput'], ',.0f')} | {_fmt(row['accuracy'], '.4f')} "
            f"| {_fmt(row['baseline_accuracy'], '.4f')} | {_fmt(row['accuracy_retained'], '.3f')} "
            f"| {_fmt(row['agreement'], '.4f')} | {_fmt(row['kl_to_teacher'], '.4f')} | {_fmt(row['ece'], '.4f')} "
            f"| {_fmt(row['gain_over_baseline_points'], '+.1f')} | {_fmt(row['speedup_vs_teacher'], '.1f')}x "
            f"| {_pm(row['accuracy_mean'], row['accuracy_std'])} ({row['seeds']}) |")
    if any(not r.metrics.get("kl_exact", True) for r in results):
        lines += ["", "KL is KL(teacher || student) at T=1 over the top-k classes plus one tail bucket: "
                      "a lower bound of the full KL, since the cache holds only the top-k logits."]
    lines += ["", "## Students", ""]
    by_name = {r.name: r for r in results}
    for row in rows:
        metrics = by_name[row["student"]].metrics
        lines.append(f"- {sentence(row['student'], metrics)}{seeds_sentence(metrics)}")
    if methods is not None:
        lines += methods_markdown(methods)
    if progressive is not None:
        lines += progressive_markdown(progressive)
    lines += ["", "## Plots", ""]
    lines += [f"![{name[:-4]}]({name})" for name in PLOTS]
    return "\n".join(lines) + "\n"


def methods_markdown(methods: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Methods: gain over soft targets alone", "",
             "Students are grouped by architecture and budget (architecture, epochs, batch size, learning rate, "
             "weight decay, transfer set, seeds, views, assistant). In each group the reference is the student "
             "trained with soft targets and no feature term; every other student's gain over it is the paired "
             "difference of test accuracy on the same seed, as mean ± sample std in points over the seeds both "
             "have. A mean within one std of zero is no measurable gain; a negative one beyond it hurts.", ""]
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in methods:
        groups.setdefault(row["group"], []).append(row)
    for number, members in groups.items():
        lines += [f"Group {number}: {members[0]['setup']}.", "",
                  "| student | terms | seeds | accuracy | vs baseline twin (points) | vs soft alone (points) | verdict |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for row in members:
            vs_soft = {"reference": "reference", "no soft-only reference": "n/a"}.get(
                row["role"], _pm(row["gain_over_soft_mean"], row["gain_over_soft_std"], "points")
                + f" ({row['paired_seeds']} paired)")
            lines.append(f"| {row['student']} | {row['method']} | {row['seeds']} "
                         f"| {_pm(row['accuracy_mean'], row['accuracy_std'])} "
                         f"| {_pm(row['gain_over_baseline_mean'], row['gain_over_baseline_std'], 'points')} "
                         f"| {vs_soft} | {row['verdict']} |")
        sentences = []
        for row in members:
            if row["role"] == "compared":
                sentences.append(
                    f"- **{row['student']}** ({row['method']}) vs **{row['reference']}** (soft alone): "
                    f"{_pm(row['gain_over_soft_mean'], row['gain_over_soft_std'], 'points')} points "
                    f"over {row['paired_seeds']} paired seeds: {row['verdict']}.")
            elif row["role"] == "no soft-only reference":
                sentences.append(
                    f"- **{row['student']}** ({row['method']}): no soft-only reference with the same architecture "
                    f"and budget; accuracy {_pm(row['accuracy_mean'], row['accuracy_std'])}, "
                    f"{_pm(row['gain_over_baseline_mean'], row['gain_over_baseline_std'], 'points')} points "
                    f"over its baseline twins.")
        lines += ["", *sentences, ""] if sentences else [""]
    return lines[:-1]


def progressive_markdown(progressive: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Progressive distillation", ""]
    if not progressive:
        return lines + ["No student learns through a teacher assistant."]
    lines += ["Each student taught through a teacher assistant against the same student (architecture, budget, "
              "loss) taught directly by the teacher; the difference is paired by seed, via minus direct, in points.",
              "",
              "| student | assistant (params, accuracy) | teacher (params, accuracy) | direct | direct accuracy "
              "| via-assistant accuracy | difference (points) | verdict |",
              "|---|---|---|---|---:|---:|---:|---|"]
    for row in progressive:
        difference = (f"{_pm(row['difference_mean'], row['difference_std'], 'points')} ({row['paired_seeds']} paired)"
                      if row["direct"] else "n/a")
        lines.append(f"| {row['student']} | {row['assistant']} ({_fmt(row['assistant_params'], ',')}, "
                     f"{_fmt(row['assistant_accuracy'], '.4f')}) | {_fmt(row['teacher_params'], ',')}, "
                     f"{_fmt(row['teacher_accuracy'], '.4f')} | {row['direct'] or 'none'} "
                     f"| {_pm(row['direct_accuracy_mean'], row['direct_accuracy_std'])} "
                     f"| {_pm(row['via_accuracy_mean'], row['via_accuracy_std'])} | {difference} | {row['verdict']} |")
    lines.append("")
    for row in progressive:
        if row["direct"]:
            lines.append(f"- **{row['student']}** ({_fmt(row['student_params'], ',')} parameters) through "
                         f"**{row['assistant']}** ({_fmt(row['assistant_params'], ',')}) vs **{row['direct']}** "
                         f"directly from the teacher ({_fmt(row['teacher_params'], ',')}): "
                         f"{_pm(row['difference_mean'], row['difference_std'], 'points')} points over "
                         f"{row['paired_seeds']} paired seeds: {row['verdict']}.")
        else:
            lines.append(f"- **{row['student']}** through **{row['assistant']}**: no student with the same "
                         "architecture, budget and loss is taught directly by the teacher, so there is nothing "
                         "to compare with.")
    return lines


# --- plots ------------------------------------------------------------------------------------


def _color(i: int, n: int) -> Any:
    return matplotlib.colormaps["tab10" if n <= 10 else "tab20"](i % 20)


def plot_accuracy_vs_params(results: list[StudentResult], path: Path,
                            assistants: dict[str, dict[str, Any]] | None = None) -> None:
    fig = Figure(figsize=(8.4, 4.8), layout="constrained")
    ax = fig.subplots()
    first = results[0].metrics
    if first.get("teacher_params"):
        ax.scatter([first["teacher_params"]], [first["teacher_accuracy"]], marker="*", s=220, color="black",
                   label="teacher", zorder=3)
    for name, info in (assistants or {}).items():
        if info.get("params") and info.get("accuracy") is not None:
            ax.scatter([info["params"]], [info["accuracy"]], marker="^", s=90, color="dimgray", zorder=3,
                       label=f"assistant {name}")
    same_size: dict[Any, list[str]] = {}
    for r in results:
        same_size.setdefault(r.metrics["params"], []).append(r.name)
    for i, r in enumerate(results):
        color = _color(i, len(results))
        m = r.metrics
        # students of one size side by side (a few % apart on the log axis), so error bars stay readable
        peers = same_size[m["params"]]
        dodge = 1.0 + 0.025 * (peers.index(r.name) - (len(peers) - 1) / 2)
        params = m["params"] * dodge
        base_params = r.baseline_config.get("params", m["params"]) * dodge
        ax.plot([base_params, params], [m["baseline_accuracy_mean"], m["accuracy_mean"]], color=color, lw=0.8,
                alpha=0.6)
        ax.errorbar([params], [m["accuracy_mean"]], yerr=[m["accuracy_std"]], color=color, marker="o", capsize=3,
                    label=f"{r.name} ({m['seeds']} seed{'s' if m['seeds'] > 1 else ''})", zorder=3)
        ax.errorbar([base_params], [m["baseline_accuracy_mean"]], yerr=[m["baseline_accuracy_std"]], color=color,
                    marker="x", capsize=3, zorder=3)
    ax.scatter([], [], color="gray", marker="x", label="baseline twins (labels only)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale; students of one size drawn side by side)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("Accuracy vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7)
    fig.savefig(path, dpi=110)


def plot_gains(methods: list[dict[str, Any]], progressive: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars, mean +- std in points: each method over its soft-only reference, and
    each via-assistant student over its direct twin."""
    bars = [(f"{row['student']} vs {row['reference']}", row["gain_over_soft_mean"], row["gain_over_soft_std"], "C0")
            for row in methods if row["role"] == "compared" and row["gain_over_soft_mean"] is not None]
    bars += [(f"{row['student']} vs {row['direct']}", row["difference_mean"], row["difference_std"], "C1")
             for row in progressive if row["difference_mean"] is not None]
    fig = Figure(figsize=(7.2, max(2.4, 0.42 * len(bars) + 1.4)), layout="constrained")
    ax = fig.subplots()
    if bars:
        y = np.arange(len(bars))[::-1]
        ax.barh(y, [b[1] for b in bars], xerr=[b[2] for b in bars], color=[b[3] for b in bars], capsize=3)
        ax.set_yticks(y, [b[0] for b in bars], fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.legend(handles=[Patch(color="C0", label="over soft targets alone"),
                           Patch(color="C1", label="through the assistant vs directly")], fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no method has a soft-only reference or a direct counterpart", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("test accuracy gain, points (paired by seed, mean ± std)")
    ax.set_title("Gains")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)


def plot_training_curves(results: list[StudentResult], path: Path) -> None:
    """Small multiples: one panel per student (its first seed), one line per logged loss term
    (unweighted, log scale) and the weighted total in black; one legend for all panels."""
    terms = list(dict.fromkeys(k for r in results for k in r.log[0] if k not in NOT_TERMS and k != "total"))
    cols = min(4, len(results))
    rows = math.ceil(len(results) / cols)
    fig = Figure(figsize=(3.1 * cols + 0.4, 2.4 * rows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=False, squeeze=False)).ravel()
    handles: dict[str, Any] = {}
    for ax, r in zip(axes, results):
        epochs = [row["epoch"] for row in r.log]
        for j, term in enumerate(terms):
            if term in r.log[0]:
                (line,) = ax.plot(epochs, [row[term] for row in r.log], color=f"C{j % 10}", lw=1.2, marker=".", ms=3)
                handles.setdefault(term, line)
        (line,) = ax.plot(epochs, [row["total"] for row in r.log], color="black", lw=1.6, marker=".", ms=3)
        handles.setdefault("total (weighted)", line)
        ax.set_yscale("log", nonpositive="mask")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(r.name, fontsize=9)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(results):]:
        ax.set_visible(False)
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("training loss (log scale)", fontsize=9)
    fig.suptitle("Training curves (first seed)", fontsize=10)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
    fig.savefig(path, dpi=110)


def plot_per_class(best: StudentResult, rows: list[dict[str, str]], path: Path) -> None:
    classes = [int(row["class"]) for row in rows]
    value = lambda text: float(text) if text != "" else np.nan  # noqa: E731 (empty: class absent from test)
    student = [value(row["student"]) for row in rows]
    baseline = [value(row["baseline"]) for row in rows]
    fig = Figure(figsize=(max(6.4, 0.45 * len(classes)), 4.4))
    ax = fig.subplots()
    x = np.arange(len(classes))
    ax.bar(x - 0.2, student, width=0.4, label=best.name)
    ax.bar(x + 0.2, baseline, width=0.4, label="baseline twin")
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Per-class accuracy: {best.name} vs its baseline (first seed)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_confusion(best: StudentResult, rows: list[dict[str, str]], path: Path) -> None:
    num_classes = int(best.config["num_classes"])
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    try:
        for row in rows:
            matrix[int(row["actual"]), int(row["predicted"])] += 1
    except (KeyError, ValueError, IndexError) as exc:
        raise InputError(f"{best.directory / PLOTS_DIR / 'confusion.csv'}: bad row ({exc}); "
                         f"run `kd eval {best.name}` again") from None
    fig = Figure(figsize=(5.6, 5.0))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if num_classes <= 20:
        ax.set_xticks(range(num_classes))
        ax.set_yticks(range(num_classes))
        for (i, j), n in np.ndenumerate(matrix):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="white" if n > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: {best.name} (first seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- writing ----------------------------------------------------------------------------------


def write_report(students_dir: Path, out: Path, manifest: dict[str, Any], cache_root: Path,
                 names: list[str] | None = None, assistants: Path | None = None) -> dict[str, Any]:
    """Write the report for `names` (default: every trained student under students_dir);
    assistants named by students are looked up under `assistants`."""
    students_dir, out = Path(students_dir), Path(out)
    names = student_dirs(students_dir) if names is None else list(names)
    if not names:
        raise MissingInputError(f"{students_dir}: no students to report on (run `kd distill NAME` and `kd eval NAME`)")
    results = [load_student(students_dir, name) for name in names]
    rows = leaderboard(results)
    by_name = {r.name: r for r in results}
    best = by_name[rows[0]["student"]]
    per_class = read_plot_csv(best.directory / PLOTS_DIR / "per_class.csv", best.name)
    confusion = read_plot_csv(best.directory / PLOTS_DIR / "confusion.csv", best.name)
    ordered = [by_name[row["student"]] for row in rows]
    methods = methods_table(results)
    progressive = progressive_table(results, assistants)
    assistant_points = {name: assistant_info(assistants, name)
                        for name in sorted({r.spec["assistant"] for r in results if r.spec.get("assistant")})}

    with building(out) as tmp:
        write_csv(tmp / "leaderboard.csv", LEADERBOARD, rows)
        write_csv(tmp / "methods.csv", METHODS, methods)
        write_csv(tmp / "progressive.csv", PROGRESSIVE, progressive)
        (tmp / "report.md").write_text(markdown(rows, ordered, manifest, cache_root, methods, progressive))
        plot_accuracy_vs_params(ordered, tmp / "accuracy_vs_params.png", assistant_points)
        plot_gains(methods, progressive, tmp / "gains.png")
        plot_training_curves(ordered, tmp / "training_curves.png")
        plot_per_class(best, per_class, tmp / "per_class.png")
        plot_confusion(best, confusion, tmp / "confusion.png")
    return {"students": [row["student"] for row in rows], "best": best.name, "out": out,
            "methods": len(methods), "progressive": len(progressive)}


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out` to write the report into; it replaces `out` whole
    once the block completes, and is removed if it fails."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows([{k: _csv_value(row[k]) for k in columns} for row in rows])


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return round(value, 6) if isinstance(value, float) else value
