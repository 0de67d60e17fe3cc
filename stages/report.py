"""`kd report`: one report over every evaluated student.

Reads each student's `metrics.json`, `config.json`, `train_log.csv` and plot data (with
`plots/seeds.csv`, every seed's accuracy) under `data/students/`, the cache's manifest
(teacher, top-k, temperatures, kept mass) and, for students taught through a teacher
assistant, that assistant's config and cache manifest under `data/assistants/`.
Writes `data/report/` (report.md, leaderboard.csv, methods.csv: each method's gain over soft
targets alone; progressive.csv: through an assistant vs directly; PNG plots), replaced as a whole.
The students are those of params.yaml's `students` section (every trained student under
--students-dir when there is no params file); each must have been through `kd eval`.
On a language model's cache (`--cache data/text/teacher_outputs`) it writes the text report
instead: perplexity against the twins and the teacher, the kept mass, loss by position
(`pipeline.text_report`).
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
    cache: str = typer.Option("data/teacher_outputs", help="Cache written by `kd label` (for the intro; a directory or s3://bucket/prefix)."),
    assistants: Path = typer.Option(Path("data/assistants"), help="Teacher assistants written by `kd assistants`."),
) -> None:
    """Write report.md, leaderboard.csv, methods.csv, progressive.csv and plots over every evaluated student."""
    names = student_names(params) if params.is_file() else None
    cache_ = Cache.open(cache)
    if "text" in cache_.manifest:
        from pipeline.text_report import write_text_report

        text = write_text_report(students_dir, out, cache_.manifest, cache,
                                 student_dirs(students_dir) if names is None else names)
        typer.echo(f"text report on {len(text['students'])} students (best: {text['best']}) -> {out / 'report.md'}")
        return
    summary = write_report(students_dir, out, cache_.manifest, cache, names, assistants)
    skipped = sorted(set(student_dirs(students_dir)) - set(summary["students"]))
    if skipped:
        typer.echo(f"not in {params}, left out: {', '.join(skipped)}")
    typer.echo(f"report on {len(summary['students'])} students (best: {summary['best']}; {summary['methods']} in the "
               f"methods table, {summary['progressive']} through an assistant) -> {out / 'report.md'}")
