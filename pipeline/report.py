"""The report over every evaluated student: a leaderboard, one sentence each, and plots.

`write_report` reads each student's `metrics.json` (written by `kd eval`), `config.json`,
`baseline/config.json`, `train_log.csv` and, for the best student, `plots/`, and writes

    <out>/leaderboard.csv            one row per student, sorted by accuracy
    <out>/report.md                  teacher and cache, the leaderboard, one sentence per student
    <out>/accuracy_vs_params.png     teacher, students and baselines (log-x)
    <out>/training_curves.png        total loss per epoch of each student
    <out>/per_class.png              per-class accuracy of the best student vs its baseline
    <out>/confusion.png              the best student's confusion matrix

into a temporary directory that replaces `out` only once complete.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline.cache.manifest import lse_column
from pipeline.errors import InputError, MissingInputError
from pipeline.metrics import METRICS_FILE, PLOTS_DIR
from pipeline.models import read_json

NEEDED = ("accuracy", "baseline_accuracy", "teacher_accuracy", "accuracy_retained", "agreement", "kl_to_teacher",
          "ece", "params", "teacher_params", "size_bytes", "throughput", "speedup_vs_teacher")
LEADERBOARD = ("student", "params", "size_bytes", "throughput", "accuracy", "baseline_accuracy", "accuracy_retained",
               "agreement", "kl_to_teacher", "ece", "gain_over_baseline_points", "speedup_vs_teacher")
PLOTS = ("accuracy_vs_params.png", "training_curves.png", "per_class.png", "confusion.png")


@dataclass
class StudentResult:
    name: str
    directory: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    baseline_config: dict[str, Any]
    log: list[dict[str, float]]  # train_log.csv: one dict per epoch


# --- reading ----------------------------------------------------------------------------------


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
                         read_json(directory / "baseline" / "config.json"), read_log(directory / "train_log.csv"))


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "epoch" not in rows[0] or "total" not in rows[0]:
        raise InputError(f"{path}: expected a training log with columns epoch and total")
    try:
        return [{k: float(v) for k, v in row.items()} for row in rows]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: a value is not a number ({exc})") from None


def read_plot_csv(path: Path, name: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise MissingInputError(f"{path}: not found (run `kd eval {name}`)")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- numbers and words ------------------------------------------------------------------------


def leaderboard(results: list[StudentResult]) -> list[dict[str, Any]]:
    """One row per student (LEADERBOARD columns), best accuracy first."""
    rows = []
    for r in results:
        m = r.metrics
        rows.append({
            "student": r.name,
            **{key: m[key] for key in LEADERBOARD[1:-2]},
            "gain_over_baseline_points": 100.0 * (m["accuracy"] - m["baseline_accuracy"]),
            "speedup_vs_teacher": m["speedup_vs_teacher"],
        })
    return sorted(rows, key=lambda row: (-row["accuracy"], row["student"]))


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


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def markdown(rows: list[dict[str, Any]], results: list[StudentResult], manifest: dict[str, Any],
             cache_root: Path) -> str:
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
        "random-weight copy of the teacher's architecture.",
        "",
        "| student | params | size (bytes) | samples/s | accuracy | baseline | retained | agreement | KL | ECE "
        "| gain (points) | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['student']} | {_fmt(row['params'], ',')} | {_fmt(row['size_bytes'], ',')} "
            f"| {_fmt(row['throughput'], ',.0f')} | {_fmt(row['accuracy'], '.4f')} "
            f"| {_fmt(row['baseline_accuracy'], '.4f')} | {_fmt(row['accuracy_retained'], '.3f')} "
            f"| {_fmt(row['agreement'], '.4f')} | {_fmt(row['kl_to_teacher'], '.4f')} | {_fmt(row['ece'], '.4f')} "
            f"| {_fmt(row['gain_over_baseline_points'], '+.1f')} | {_fmt(row['speedup_vs_teacher'], '.1f')}x |")
    if any(not r.metrics.get("kl_exact", True) for r in results):
        lines += ["", "KL is KL(teacher || student) at T=1 over the top-k classes plus one tail bucket: "
                      "a lower bound of the full KL, since the cache holds only the top-k logits."]
    lines += ["", "## Students", ""]
    by_name = {r.name: r for r in results}
    for row in rows:
        lines.append(f"- {sentence(row['student'], by_name[row['student']].metrics)}")
    lines += ["", "## Plots", ""]
    lines += [f"![{name[:-4]}]({name})" for name in PLOTS]
    return "\n".join(lines) + "\n"


# --- plots ------------------------------------------------------------------------------------


def plot_accuracy_vs_params(results: list[StudentResult], path: Path) -> None:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    first = results[0].metrics
    if first.get("teacher_params"):
        ax.scatter([first["teacher_params"]], [first["teacher_accuracy"]], marker="*", s=220, color="black",
                   label="teacher", zorder=3)
    for i, r in enumerate(results):
        color = f"C{i % 10}"
        params, base_params = r.metrics["params"], r.baseline_config.get("params", r.metrics["params"])
        ax.plot([base_params, params], [r.metrics["baseline_accuracy"], r.metrics["accuracy"]], color=color,
                lw=0.8, alpha=0.6)
        ax.scatter([params], [r.metrics["accuracy"]], color=color, marker="o", label=r.name, zorder=3)
        ax.scatter([base_params], [r.metrics["baseline_accuracy"]], color=color, marker="x", zorder=3)
    ax.scatter([], [], color="gray", marker="x", label="baseline twins (labels only)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_training_curves(results: list[StudentResult], path: Path) -> None:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for i, r in enumerate(results):
        ax.plot([row["epoch"] for row in r.log], [row["total"] for row in r.log], marker=".", color=f"C{i % 10}",
                label=r.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("total training loss")
    ax.set_title("Training curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
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
    ax.set_title(f"Per-class accuracy: {best.name} vs its baseline")
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
    ax.set_title(f"Confusion matrix: {best.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- writing ----------------------------------------------------------------------------------


def write_report(students_dir: Path, out: Path, manifest: dict[str, Any], cache_root: Path,
                 names: list[str] | None = None) -> dict[str, Any]:
    """Write the report for `names` (default: every trained student under students_dir)."""
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

    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        with open(tmp / "leaderboard.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(LEADERBOARD))
            writer.writeheader()
            writer.writerows([{k: _csv_value(v) for k, v in row.items()} for row in rows])
        (tmp / "report.md").write_text(markdown(rows, ordered, manifest, cache_root))
        plot_accuracy_vs_params(ordered, tmp / "accuracy_vs_params.png")
        plot_training_curves(ordered, tmp / "training_curves.png")
        plot_per_class(best, per_class, tmp / "per_class.png")
        plot_confusion(best, confusion, tmp / "confusion.png")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"students": [row["student"] for row in rows], "best": best.name, "out": out}


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return round(value, 6) if isinstance(value, float) else value


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace directory `out` by the finished directory `tmp` (two renames)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
