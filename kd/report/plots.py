"""The report's PNG plots, drawn from the loaded students and the computed tables.

Each plot is a function of the `results.Report` that returns its figure; `DRAW` maps a PNG name
to its function, and the task's `Score.plots` says which PNGs its report has.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from kd.errors import InputError
from kd.evaluation import PLOTS_DIR
from kd.report.results import Report, plot_table

NOT_TERMS = ("epoch", "lr", "seconds")  # train_log.csv columns that are not loss terms


def _color(i: int, n: int) -> Any:
    return matplotlib.colormaps["tab10" if n <= 10 else "tab20"](i % 20)


def plot_score_vs_params(report: Report) -> Figure:
    """The teacher, the assistants, and each student and its twins: score (mean +- std over
    seeds) against parameters (log-x; log-y when lower is better)."""
    score, results = report.score, report.results
    fig = Figure(figsize=(8.4, 4.8), layout="constrained")
    ax = fig.subplots()
    first = results[0].metrics
    # the teacher and the assistants: (label, params, score, marker, size, color)
    anchors = [("teacher", first.get("teacher_params"), first.get(score.teacher_key), "*", 220, "black")]
    anchors += [(f"assistant {name}", info.get("params"), info.get("accuracy"), "^", 90, "dimgray")
              for name, info in report.assistants.items()]
    for label, params, value, marker, size, color in anchors:
        if params and value is not None:
            ax.scatter([params], [value], marker=marker, s=size, color=color, label=label, zorder=3)
    same_size: dict[Any, list[str]] = {}
    for r in results:
        same_size.setdefault(r.metrics["params"], []).append(r.name)
    mine, twin = score.key, score.baseline_key
    for i, r in enumerate(results):
        color = _color(i, len(results))
        m = r.metrics
        # students of one size side by side (a few % apart on the log axis), so error bars stay readable
        peers = same_size[m["params"]]
        dodge = 1.0 + 0.025 * (peers.index(r.name) - (len(peers) - 1) / 2)
        params = m["params"] * dodge
        base_params = r.baseline_config.get("params", m["params"]) * dodge
        ax.plot([base_params, params], [m[f"{twin}_mean"], m[f"{mine}_mean"]], color=color, lw=0.8, alpha=0.6)
        ax.errorbar([params], [m[f"{mine}_mean"]], yerr=[m[f"{mine}_std"]], color=color, marker="o", capsize=3,
                    label=f"{r.name} ({m['seeds']} seed{'s' if m['seeds'] > 1 else ''})", zorder=3)
        ax.errorbar([base_params], [m[f"{twin}_mean"]], yerr=[m[f"{twin}_std"]], color=color, marker="x",
                    capsize=3, zorder=3)
    ax.scatter([], [], color="gray", marker="x", label="twins (without the teacher)")
    ax.set_xscale("log")
    if score.lower_is_better:
        ax.set_yscale("log")
    ax.set_xlabel("parameters (log scale; students of one size drawn side by side)")
    ax.set_ylabel(f"{score.name} (mean ± std over seeds; {'log scale, lower' if score.lower_is_better else 'higher'} "
                  "is better)")
    ax.set_title(f"{score.name.capitalize()} vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7)
    return fig


def plot_gains(report: Report) -> Figure:
    """Horizontal bars, mean +- std in points: each method over its soft-only reference, and
    each via-assistant student over its direct twin."""
    methods, progressive = report.methods, report.progressive
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
    return fig


def plot_capacity_gap(report: Report) -> Figure:
    """Gain over the twins (mean +- std over seeds, points) against the teacher/student size ratio
    (log-x): each student with a direct counterpart, taught directly and through its assistant."""
    rows = sorted((row for row in report.progressive if row["direct"] and row["size_ratio"]),
                  key=lambda row: row["size_ratio"])
    fig = Figure(figsize=(7.6, 4.6), layout="constrained")
    ax = fig.subplots()
    if rows:
        ratio = np.array([row["size_ratio"] for row in rows])
        for prefix, label, color, marker, dodge in (("direct_gain", "directly from the teacher", "C0", "o", 0.97),
                                                    ("via_gain", "through an assistant", "C1", "s", 1.03)):
            ax.errorbar(ratio * dodge, [row[f"{prefix}_mean"] for row in rows],
                        yerr=[row[f"{prefix}_std"] for row in rows], color=color, marker=marker, capsize=3, lw=1.2,
                        label=label)
        for row in rows:
            ax.annotate(row["direct"], (row["size_ratio"], max(row["direct_gain_mean"], row["via_gain_mean"])),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no student learns through an assistant beside a direct counterpart", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("teacher / student parameters (log scale)")
    ax.set_ylabel("test accuracy gain over the twins, points\n(mean ± std over seeds)")
    ax.set_title("Capacity gap: direct vs through an assistant")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_training_curves(report: Report) -> Figure:
    """Small multiples: one panel per student (its first seed), one line per logged loss term
    (unweighted, log scale) and the weighted total in black; one legend for all panels."""
    results = report.results
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
    return fig


def plot_per_class(report: Report) -> Figure:
    """Per-class test accuracy of the best student and its twin (first seed)."""
    best = report.results[0]
    rows = plot_table(best, "per_class.csv")
    classes = [int(row["class"]) for row in rows]

    def value(text: str) -> float:  # empty: the class is absent from the test split
        return float(text) if text != "" else np.nan

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
    return fig


def plot_confusion(report: Report) -> Figure:
    """The best student's confusion matrix (first seed)."""
    best = report.results[0]
    rows = plot_table(best, "confusion.csv")
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
    return fig


def plot_per_position(report: Report) -> Figure:
    """Each student's and its twin's mean test loss at each position of a block (first seed)."""
    results = report.results
    rows = {r.name: plot_table(r, "per_position.csv", numbers=True) for r in results}
    fig = Figure(figsize=(7.6, 4.4), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(results):
        color = _color(i, len(results))
        positions = [row["position"] for row in rows[r.name]]
        ax.plot(positions, [row["student"] for row in rows[r.name]], color=color, lw=1.2, label=r.name)
        ax.plot(positions, [row["baseline"] for row in rows[r.name]], color=color, lw=1.0, ls="--",
                label=f"{r.name} twin")
    ax.set_xlabel("position in the block (tokens of context)")
    ax.set_ylabel("mean test loss (nats per token)")
    ax.set_title("Loss by position: how much each model gains from context")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7)
    return fig


# PNG name -> what draws it (saved at 110 dpi). A task's Score.plots names the ones its report has.
DRAW: dict[str, Callable[[Report], Figure]] = {
    "accuracy_vs_params.png": plot_score_vs_params,
    "perplexity_vs_params.png": plot_score_vs_params,
    "exact_match_vs_params.png": plot_score_vs_params,
    "bits_per_char_vs_params.png": plot_score_vs_params,
    "gains.png": plot_gains,
    "capacity_gap.png": plot_capacity_gap,
    "training_curves.png": plot_training_curves,
    "per_class.png": plot_per_class,
    "confusion.png": plot_confusion,
    "per_position.png": plot_per_position,
}
