"""The report over the text students of a per-token cache: `kd report` on a language model's cache.

Reads each student's `metrics.json`, `train_log.csv` and `plots/per_position.csv` (written by
`kd distill` and `kd eval` on text) and the cache's manifest. Writes

    <out>/leaderboard.csv              one row per student, best test quality first
    <out>/report.md                    teacher and cache (with the kept mass per temperature),
                                       the table, one sentence per student
    <out>/perplexity_vs_params.png     teacher, students and their twins (log-log); for masked LMs
                                       accuracy_vs_params.png (masked-token accuracy)
    <out>/training_curves.png          every logged loss term per epoch, one panel per student
    <out>/per_position.png             each student's and its twin's mean test loss at each position

into a temporary directory that replaces `out` only once complete. Every number comes from
those files. A causal student is measured by test perplexity (lower is better) against its
twin: the same student trained on the same blocks with the next-token loss alone; a masked
student by masked-token accuracy on the cache's test masks against its twin: the same
student, start and masks with the masked-LM loss alone.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from pipeline.cache.layout import lse_column
from pipeline.errors import InputError, MissingInputError
from pipeline.files import read_json
from pipeline.metrics import METRICS_FILE, PLOTS_DIR
from pipeline.report import StudentResult, _color, _fmt, building, plot_training_curves, read_log, write_csv

# Per objective: the quality keys (student, twin, teacher), how it reads, and what "better" is.
QUALITY = {
    "causal": {"keys": ("perplexity", "baseline_perplexity", "teacher_perplexity"), "name": "test perplexity",
               "lower_is_better": True, "format": ".1f", "plot": "perplexity_vs_params.png"},
    "masked": {"keys": ("masked_accuracy", "baseline_masked_accuracy", "teacher_masked_accuracy"),
               "name": "masked-token accuracy", "lower_is_better": False, "format": ".4f",
               "plot": "accuracy_vs_params.png"},
}
NEEDED = ("objective", "agreement", "kl_to_teacher", "params", "size_bytes", "throughput_tokens_per_s",
          "speedup_vs_teacher")
COMMON = ("agreement", "kl_to_teacher", "speedup_vs_teacher")
PER_POSITION = "per_position.csv"


def load_text_student(students_dir: Path, name: str) -> StudentResult:
    directory = Path(students_dir) / name
    metrics_path = directory / METRICS_FILE
    if not metrics_path.is_file():
        raise MissingInputError(f"{metrics_path}: not found; text student {name!r} is not evaluated "
                                f"(run `kd eval {name}` on the text cache)")
    metrics = read_json(metrics_path)
    needed = [*NEEDED, *QUALITY.get(metrics.get("objective"), QUALITY["causal"])["keys"][:2]] \
        if isinstance(metrics, dict) else list(NEEDED)
    missing = [key for key in needed if key not in metrics] if isinstance(metrics, dict) else needed
    if missing:
        raise InputError(f"{metrics_path}: missing key {missing[0]!r} (is it a text student's? run `kd eval {name}` "
                         "on the text cache again)")
    log_path = directory / "train_log.csv"
    if not log_path.is_file():
        raise MissingInputError(f"{log_path}: not found (run `kd distill {name}`)")
    return StudentResult(name, directory, metrics, {}, {}, read_log(log_path))


def per_position(result: StudentResult) -> list[dict[str, float]]:
    path = result.directory / PLOTS_DIR / PER_POSITION
    if not path.is_file():
        raise MissingInputError(f"{path}: not found (run `kd eval {result.name}` again)")
    with open(path, newline="") as handle:
        try:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: a value is not a number ({exc})") from None


def change_key(objective: str) -> str:
    """The per-seed comparison with the twin: perplexity_reduction or accuracy_gain_points."""
    return "perplexity_reduction" if objective == "causal" else "accuracy_gain_points"


def leaderboard_columns(objective: str) -> tuple[str, ...]:
    key, change = QUALITY[objective]["keys"][0], change_key(objective)
    return ("student", "params", "size_bytes", "throughput_tokens_per_s", *QUALITY[objective]["keys"], change,
            *COMMON, "seeds", f"{key}_mean", f"{key}_std", f"{change}_mean", f"{change}_std")


def over_seeds(m: dict[str, Any]) -> str:
    """The score and the change over the twins as mean +- sample std over seeds, with the count."""
    q, change = QUALITY[m["objective"]], change_key(m["objective"])
    key = q["keys"][0]
    if m.get("seeds") is None:
        return "n/a"
    if m["objective"] == "causal":
        delta = f"{100 * m[f'{change}_mean']:+.1f} ± {100 * m[f'{change}_std']:.1f}%"
    else:
        delta = f"{m[f'{change}_mean']:+.2f} ± {m[f'{change}_std']:.2f}"
    return f"{m[f'{key}_mean']:{q['format']}} ± {m[f'{key}_std']:{q['format']}}, {delta} ({m['seeds']})"


def sentence(name: str, m: dict[str, Any]) -> str:
    """One student in words: its score against its twin's and the teacher's, size and speed."""
    q = QUALITY[m["objective"]]
    mine, twin, teacher = (m.get(k) for k in q["keys"])
    size = (f"{m['params']:,} parameters, {100 * m['params'] / m['teacher_params']:.0f}% of the teacher's"
            if m.get("teacher_params") else f"{m['params']:,} parameters")
    if m["objective"] == "causal":
        change = m["perplexity_reduction"]
        direction = f"{100 * change:.1f}% lower" if change >= 0 else f"{-100 * change:.1f}% higher"
        versus = f"{direction} than its twin's {twin:.1f}"
    else:
        versus = f"{m['accuracy_gain_points']:+.1f} points over its twin's {twin:.4f}"
    twin_is = ("the same student on the same text alone, same budget" if m["objective"] == "causal" else
               "the same student, start, masks and budget with the masked-LM loss alone")
    of_teacher = f"; the teacher has {teacher:{q['format']}}" if teacher is not None else ""
    if m["objective"] == "masked" and teacher:
        of_teacher += f", so the student keeps {100 * mine / teacher:.1f}% of the teacher's accuracy"
    speed = (f", runs {m['speedup_vs_teacher']:.1f}x the teacher's tokens/s" if m.get("speedup_vs_teacher") else "")
    seeds = f" Over {m['seeds']} seeds: {over_seeds(m)}." if (m.get("seeds") or 1) > 1 else ""
    return (f"**{name}** ({size}): {q['name']} {mine:{q['format']}}, {versus} ({twin_is}){of_teacher}. "
            f"It agrees with the teacher's top token on {100 * m['agreement']:.1f}% of test tokens{speed}.{seeds}")


def markdown(results: list[StudentResult], manifest: dict[str, Any], cache_root: Any) -> str:
    teacher = manifest.get("teacher", {})
    config = teacher.get("config") or {}
    info = manifest.get("text", {})
    objective = info.get("objective", "causal")
    q = QUALITY[objective]
    test = manifest.get("fidelity", {}).get("test", {})
    first = results[0].metrics
    kept = []
    for t in manifest.get("temperatures", []):
        stats = test.get(lse_column(t).removeprefix("lse_"))
        if stats:
            kept.append(f"T={t}: {100 * stats['kept_mass']:.1f}% (KL(full || cached) "
                        f"{stats['kl_full_to_cached']:.3f})")
    rows = (f"one row per predicted token ({info.get('positions')} per block of {info.get('block_size')} tokens)"
            if objective == "causal" else
            f"one row per masked token ({info.get('positions')} per masking of a block of {info.get('block_size')} "
            f"tokens, {manifest.get('views', {}).get('count', 0) + 1} masking(s) per block, recorded)")
    twin = ("trained on the text alone (the next-token loss)" if objective == "causal" else
            "trained from the same start on the same masks with the masked-LM loss alone. Scores are on every "
            "cached masking of the test split; the teacher's is its cached top-1 on the same masked tokens")
    lines = [
        "# Text distillation report",
        "",
        f"Teacher: `{config.get('arch', '?')}` ({objective} LM), {_fmt(first.get('teacher_params'), ',')} "
        f"parameters, {q['name']} {_fmt(first.get(q['keys'][2]), q['format'])} "
        f"(fingerprint `{str(teacher.get('fingerprint', '?'))[:12]}`).",
        f"Cache `{cache_root}`: {rows}, the teacher's top-{manifest.get('top_k')} of {info.get('vocab_size')} "
        f"token logits per row ({manifest.get('logit_dtype')}).",
        f"Probability mass the top-{manifest.get('top_k')} keeps on the test split: {'; '.join(kept) or 'n/a'}.",
        "",
        f"Each student is compared with its twin: the same architecture, seed and budget, {twin}. Speed is "
        "tokens/s on CPU, measured side by side with a random-weight copy of the teacher's architecture. KL is "
        "KL(teacher || student) at T=1 over the top-k tokens plus one tail bucket: a lower bound of the full KL.",
        "",
        "The columns up to speedup are the first seed's; the last gives the mean ± sample std over every "
        "trained seed of the score and of the paired change against each seed's own twin (seeds in brackets).",
        "",
        f"| student | params | size (bytes) | tokens/s | {q['name']} | twin | "
        f"{'reduction' if objective == 'causal' else 'gain (points)'} | agreement | KL | speedup | over seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r.metrics
        change = (f"{_fmt(100 * m['perplexity_reduction'], '+.1f')}%" if objective == "causal"
                  else _fmt(m["accuracy_gain_points"], "+.1f"))
        lines.append(f"| {r.name} | {_fmt(m['params'], ',')} | {_fmt(m['size_bytes'], ',')} "
                     f"| {_fmt(m['throughput_tokens_per_s'], ',.0f')} | {_fmt(m[q['keys'][0]], q['format'])} "
                     f"| {_fmt(m[q['keys'][1]], q['format'])} | {change} "
                     f"| {_fmt(m['agreement'], '.4f')} | {_fmt(m['kl_to_teacher'], '.4f')} "
                     f"| {_fmt(m['speedup_vs_teacher'], '.1f')}x | {over_seeds(m)} |")
    lines += ["", "## Students", ""]
    lines += [f"- {sentence(r.name, r.metrics)}" for r in results]
    lines += ["", "## Plots", ""]
    lines += [f"![{name[:-4]}]({name})" for name in (q["plot"], "training_curves.png", "per_position.png")]
    return "\n".join(lines) + "\n"


def plot_quality_vs_params(results: list[StudentResult], objective: str, path: Path) -> None:
    q = QUALITY[objective]
    mine, twin, teacher = q["keys"]
    fig = Figure(figsize=(7.6, 4.4), layout="constrained")
    ax = fig.subplots()
    first = results[0].metrics
    if first.get("teacher_params") and first.get(teacher) is not None:
        ax.scatter([first["teacher_params"]], [first[teacher]], marker="*", s=220, color="black",
                   label="teacher", zorder=3)
    for i, r in enumerate(results):
        color, m = _color(i, len(results)), r.metrics
        ax.plot([m["params"], m["params"]], [m[twin], m[mine]], color=color, lw=0.8, alpha=0.6)
        ax.scatter([m["params"]], [m[mine]], color=color, marker="o", label=r.name, zorder=3)
        ax.scatter([m["params"]], [m[twin]], color=color, marker="x", zorder=3)
    ax.scatter([], [], color="gray", marker="x", label="twins (without the teacher's terms)")
    ax.set_xscale("log")
    if q["lower_is_better"]:
        ax.set_yscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(f"{q['name']} ({'log scale, lower' if q['lower_is_better'] else 'higher'} is better)")
    ax.set_title(f"{q['name'].capitalize()} vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7)
    fig.savefig(path, dpi=110)


def plot_per_position(results: list[StudentResult], rows: dict[str, list[dict[str, float]]], path: Path) -> None:
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
    fig.savefig(path, dpi=110)


def write_text_report(students_dir: Path, out: Path, manifest: dict[str, Any], cache_root: Any,
                      names: list[str]) -> dict[str, Any]:
    """Write the text report for `names` into `out`; returns a summary for the command line."""
    if not names:
        raise MissingInputError(f"{students_dir}: no text students to report on (run `kd distill NAME` and "
                                "`kd eval NAME` on the text cache)")
    objective = manifest["text"]["objective"]
    q = QUALITY[objective]
    loaded = [load_text_student(students_dir, name) for name in names]
    for r in loaded:
        if r.metrics["objective"] != objective:
            raise InputError(f"{r.directory / METRICS_FILE}: a {r.metrics['objective']} LM student, the cache is a "
                             f"{objective} LM's (run `kd eval {r.name}` on this cache)")
    sign = 1 if q["lower_is_better"] else -1
    results = sorted(loaded, key=lambda r: sign * r.metrics[q["keys"][0]])
    positions = {r.name: per_position(r) for r in results}
    columns = leaderboard_columns(objective)
    rows = [{"student": r.name, **{k: r.metrics.get(k) for k in columns[1:]}} for r in results]
    with building(out) as tmp:
        write_csv(tmp / "leaderboard.csv", columns, rows)
        (tmp / "report.md").write_text(markdown(results, manifest, cache_root))
        plot_quality_vs_params(results, objective, tmp / q["plot"])
        plot_training_curves(results, tmp / "training_curves.png")
        plot_per_position(results, positions, tmp / "per_position.png")
    return {"students": [r.name for r in results], "best": results[0].name, "out": out}
