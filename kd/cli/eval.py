"""`kd eval NAME`: measure student NAME against its labels, its baseline twin and the teacher.

Reads `data/students/NAME/` (the student and `baseline/`), the cache's test split (for
agreement and KL; the teacher itself is never loaded) and `data/prepared/test.parquet`
(+ `unlabeled_truth.parquet` when it exists, for the teacher's pseudo-label accuracy).
Every seed under `data/students/NAME/seeds/` is measured too (test accuracy of it and its
twin), summarised as mean +- std. Writes `data/students/NAME/metrics.json` (flat, for
`dvc metrics show`) and `data/students/NAME/plots/` (per_class.csv, confusion.csv,
reliability.csv, seeds.csv); `--out DIR` writes them into DIR instead (the same student scored
on another test set: another `--prepared` and `--cache`).
Reads the `eval` section of params.yaml, and `students.NAME` for a custom architecture.
The cache's task (`kd.tasks`) scores the student: the above for an image student; for a
text student (a per-token cache) perplexity (causal) or masked-token accuracy on the cache's
test masks (masked), its twin's and the teacher's, agreement, KL, size and speed, and
plots/per_position.csv (the mean loss of the student and its twin at each position of a block).
"""

from __future__ import annotations

from pathlib import Path

import typer

from kd.cli.common import PARAMS_OPTION, clean_errors, override
from kd.errors import MissingInputError


@clean_errors
def main(
    name: str = typer.Argument(..., help="A student defined under `students` (or `text_students`, `mlm_students`) in "
                               "the params file."),
    batch_size: int | None = typer.Option(None, help="Batch size for the test predictions."),
    ece_bins: int | None = typer.Option(None, help="Equal-width confidence bins of the ECE."),
    latency_runs: int | None = typer.Option(None, help="Batch-1 passes timed for the median latency."),
    throughput_batch: int | None = typer.Option(None, help="Batch size of the throughput runs."),
    throughput_runs: int | None = typer.Option(None, help="Timed passes for the median throughput."),
    threads: int | None = typer.Option(None, help="Torch threads while timing."),
    students_dir: Path = typer.Option(Path("data/students"), help="Students live in STUDENTS_DIR/NAME."),
    cache: str = typer.Option("data/teacher_outputs", help="Cache written by `kd label` (a directory or "
                              "s3://bucket/prefix)."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Directory written by `kd prepare`."),
    out: Path | None = typer.Option(None, "--out", help="Write metrics.json and plots/ into OUT instead of the "
                                    "student's directory: its scores on another test set (--prepared, --cache)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Evaluate student NAME and write its metrics.json and plot data (defaults: params.yaml `eval`)."""
    from kd import tasks
    from kd.cache import Cache
    from kd.config import EvalConfig, section, student
    from kd.evaluation import check_config, write_results
    cfg = override(section(params, "eval", EvalConfig), batch_size=batch_size, ece_bins=ece_bins,
                   latency_runs=latency_runs, throughput_batch=throughput_batch,
                   throughput_runs=throughput_runs, threads=threads)
    spec = student(params, name)
    directory = students_dir / name
    if not (directory / "config.json").is_file():
        raise MissingInputError(f"{directory}: no trained student {name!r} here (run `kd distill {name}`)")
    check_config(cfg)
    opened = Cache.open(cache)
    task = tasks.for_cache(opened)
    record, tables = task.evaluate(directory, opened, prepared, cfg, spec)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    path = write_results(directory if out is None else out, tables, record)
    typer.echo(task.summary(name, record) + f" -> {path}")
