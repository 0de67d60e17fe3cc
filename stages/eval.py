"""`kd eval NAME`: measure student NAME against its labels, its baseline twin and the teacher.

Reads `data/students/NAME/` (the student and `baseline/`), the cache's test split (for
agreement and KL; the teacher itself is never loaded) and `data/prepared/test.parquet`
(+ `unlabeled_truth.parquet` when it exists, for the teacher's pseudo-label accuracy).
Every seed under `data/students/NAME/seeds/` is measured too (test accuracy of it and its
twin), summarised as mean +- std. Writes `data/students/NAME/metrics.json` (flat, for
`dvc metrics show`) and `data/students/NAME/plots/` (per_class.csv, confusion.csv,
reliability.csv, seeds.csv).
Reads the `eval` section of params.yaml, and `students.NAME` for a custom architecture.
A text student (a per-token cache) gets perplexity (causal) or masked-token accuracy on the
cache's test masks (masked), its twin's and the teacher's, agreement, KL, size and speed
instead (`pipeline.lm_distill`), and plots/per_position.csv (the mean loss of the student and
its twin at each position of a block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cache import Cache
from pipeline.config import EvalConfig, section, student
from pipeline.errors import MissingInputError
from pipeline.metrics import evaluate, write_eval, write_results
from stages.common import PARAMS_OPTION, clean_errors, override


@clean_errors
def main(
    name: str = typer.Argument(..., help="A student defined under `students` (or `text_students`, `mlm_students`) in the params file."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size for the test predictions."),
    ece_bins: Optional[int] = typer.Option(None, help="Equal-width confidence bins of the ECE."),
    latency_runs: Optional[int] = typer.Option(None, help="Batch-1 passes timed for the median latency."),
    throughput_batch: Optional[int] = typer.Option(None, help="Batch size of the throughput runs."),
    throughput_runs: Optional[int] = typer.Option(None, help="Timed passes for the median throughput."),
    threads: Optional[int] = typer.Option(None, help="Torch threads while timing."),
    students_dir: Path = typer.Option(Path("data/students"), help="Students live in STUDENTS_DIR/NAME."),
    cache: str = typer.Option("data/teacher_outputs", help="Cache written by `kd label` (a directory or s3://bucket/prefix)."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Directory written by `kd prepare`."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Evaluate student NAME and write its metrics.json and plot data (defaults: params.yaml `eval`)."""
    cfg = override(section(params, "eval", EvalConfig), batch_size=batch_size, ece_bins=ece_bins,
                   latency_runs=latency_runs, throughput_batch=throughput_batch,
                   throughput_runs=throughput_runs, threads=threads)
    spec = student(params, name)
    directory = students_dir / name
    if not (directory / "config.json").is_file():
        raise MissingInputError(f"{directory}: no trained student {name!r} here (run `kd distill {name}`)")
    opened = Cache.open(cache)
    if "text" in opened.manifest:  # a language-model student
        from pipeline.lm_distill import evaluate_masked, evaluate_text

        masked = opened.manifest["text"]["objective"] == "masked"
        metrics = (evaluate_masked if masked else evaluate_text)(directory, opened, prepared, cfg)
        write_results(directory, metrics.pop("plots"), metrics)
        typer.echo(f"student {name}: {text_summary(metrics)}, agreement {metrics['agreement']:.4f}, "
                   f"KL {metrics['kl_to_teacher']:.4f}, {metrics['params']:,} params -> {directory / 'metrics.json'}")
        return
    custom = ":" in spec.arch  # a user's architecture is named by params, never by the checkpoint
    result = evaluate(directory, opened, prepared, cfg,
                      arch=spec.arch if custom else None, arch_kwargs=spec.arch_kwargs if custom else None)
    path = write_eval(directory, result)
    typer.echo(summary(name, result) + f" -> {path}")


def text_summary(m: dict) -> str:
    """A text student's score against its twin's and the teacher's."""
    if m["objective"] == "masked":
        teacher = f"{m['teacher_masked_accuracy']:.4f}" if m["teacher_masked_accuracy"] is not None else "unknown"
        line = (f"masked-token accuracy {m['masked_accuracy']:.4f} (baseline twin {m['baseline_masked_accuracy']:.4f}, "
                f"teacher {teacher})")
        over = (f"accuracy {m['masked_accuracy_mean']:.4f} +- {m['masked_accuracy_std']:.4f}, "
                f"{m['accuracy_gain_points_mean']:+.2f} +- {m['accuracy_gain_points_std']:.2f} points over the twins")
    else:
        teacher = f"{m['teacher_perplexity']:.1f}" if m["teacher_perplexity"] else "unknown"
        line = f"test perplexity {m['perplexity']:.1f} (baseline twin {m['baseline_perplexity']:.1f}, teacher {teacher})"
        over = (f"perplexity {m['perplexity_mean']:.1f} +- {m['perplexity_std']:.1f}, "
                f"{100 * m['perplexity_reduction_mean']:.1f} +- {100 * m['perplexity_reduction_std']:.1f}% lower "
                "than the twins")
    return line + (f"; over {m['seeds']} seeds: {over}" if m["seeds"] > 1 else "")


def summary(name: str, m: dict) -> str:
    kl = "exact" if m["kl_exact"] else "top-k bucket, a lower bound"
    speed = (f"{m['speedup_vs_teacher']:.1f}x the teacher's throughput ({m['teacher_throughput_source']})"
             if m["speedup_vs_teacher"] is not None else "teacher throughput unknown")
    pseudo = f", teacher pseudo-labels {m['pseudo_label_accuracy']:.4f}" if "pseudo_label_accuracy" in m else ""
    seeds = (f"; over {m['seeds']} seeds: accuracy {m['accuracy_mean']:.4f} +- {m['accuracy_std']:.4f}, "
             f"{m['gain_points_mean']:+.1f} +- {m['gain_points_std']:.1f} points over the baseline twins")
    return (f"student {name}: accuracy {m['accuracy']:.4f} (baseline {m['baseline_accuracy']:.4f}, "
            f"teacher {m['teacher_accuracy']:.4f}), agreement {m['agreement']:.4f}, "
            f"KL {m['kl_to_teacher']:.4f} ({kl}), ECE {m['ece']:.4f}, {m['params']:,} params, "
            f"{m['latency_ms']:.3f} ms at batch 1, {m['throughput']:,.0f} samples/s, {speed}{pseudo}{seeds}")
