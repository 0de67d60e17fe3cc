"""`kd report`: one report over every evaluated student.

Reads each student's `metrics.json`, `config.json`, `train_log.csv` and plot data under
`data/students/`, and the cache's manifest (teacher, top-k, temperatures, kept mass).
Writes `data/report/` (report.md, leaderboard.csv, PNG plots), replaced as a whole.
The students are those of params.yaml's `students` section (every trained student under
--students-dir when there is no params file); each must have been through `kd eval`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cache import Cache
from pipeline.config import student_names
from pipeline.report import student_dirs, write_report
from stages.common import PARAMS_OPTION, clean_errors


@clean_errors
def main(
    students_dir: Path = typer.Option(Path("data/students"), help="Directory of the students (one per NAME)."),
    out: Path = typer.Option(Path("data/report"), help="Directory to write the report into (replaced whole)."),
    params: Path = PARAMS_OPTION,
    cache: Path = typer.Option(Path("data/teacher_outputs"), help="Cache written by `kd label` (for the intro)."),
) -> None:
    """Write report.md, leaderboard.csv and plots over every evaluated student."""
    names = student_names(params) if params.is_file() else None
    cache_ = Cache.open(cache)
    summary = write_report(students_dir, out, cache_.manifest, cache, names)
    skipped = sorted(set(student_dirs(students_dir)) - set(summary["students"]))
    if skipped:
        typer.echo(f"not in {params}, left out: {', '.join(skipped)}")
    typer.echo(f"report on {len(summary['students'])} students (best: {summary['best']}) -> {out / 'report.md'}")
