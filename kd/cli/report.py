"""`kd report`: one report over every evaluated student.

Reads each student's `metrics.json`, config, `train_log.csv` and plot data (with
`plots/seeds.csv`, every seed's score) under `data/students/`, the cache's manifest (teacher,
top-k, temperatures, kept mass: it also says which task the students are measured for) and,
for students taught through a teacher assistant, that assistant's config and cache manifest
under `data/assistants/`. Writes `data/report/` (report.md, leaderboard.csv and PNG plots;
for image students also methods.csv: each method's gain over soft targets alone, and
progressive.csv: through an assistant vs directly; with `--test-set LABEL=DIR`, each student's
scores on other test sets, test_sets.csv), replaced as a whole; see `kd.report`.
The students are those of params.yaml's student sections (every trained student under
--students-dir when there is no params file); each must have been through `kd eval`.
On a language model's cache (`--cache data/text/teacher_outputs`) the score is test
perplexity or masked-token accuracy instead of test accuracy, with loss by position; with
`--score exact_match` (instruction data) the exact match of the students' greedy answers, with
`--score bits_per_char` (causal students of different tokenizers) bits per character.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kd.cli.common import PARAMS_OPTION, clean_errors
from kd.errors import ConfigError


@clean_errors
def main(
    students_dir: Path = typer.Option(Path("data/students"), help="Directory of the students (one per NAME)."),
    out: Path = typer.Option(Path("data/report"), help="Directory to write the report into (replaced whole)."),
    params: Path = PARAMS_OPTION,
    cache: str = typer.Option("data/teacher_outputs", help="Cache written by `kd label` (for the intro; a directory or "
                              "s3://bucket/prefix)."),
    assistants: Path = typer.Option(Path("data/assistants"), help="Teacher assistants written by `kd assistants`."),
    test_set: list[str] | None = typer.Option(None, "--test-set", help="LABEL=DIR: the students' scores on "
                                              "another test set, written by `kd eval NAME --out DIR/NAME` "
                                              "(repeatable); adds a table and test_sets.csv."),
    score: str | None = typer.Option(None, help="Rank by this metrics key instead of the task's own score "
                                     "(causal LMs on instruction data: exact_match; of different tokenizers: "
                                     "bits_per_char)."),
) -> None:
    """Write report.md, leaderboard.csv, the tables and plots over every evaluated student."""
    from kd.cache import Cache
    from kd.config import student_names
    from kd.report import student_dirs, write_report
    names = student_names(params) if params.is_file() else None
    test_sets = {}
    for item in test_set or []:
        label, sep, directory = item.partition("=")
        if not sep or not label or not directory:
            raise ConfigError(f"--test-set: {item!r} must be LABEL=DIR")
        test_sets[label] = Path(directory)
    summary = write_report(students_dir, out, Cache.open(cache).manifest, cache, names, assistants, test_sets,
                           score)
    skipped = sorted(set(student_dirs(students_dir)) - set(summary["students"]))
    if skipped:
        typer.echo(f"not in {params}, left out: {', '.join(skipped)}")
    best = summary["best"][0] if len(summary["best"]) == 1 else f"a tie of {', '.join(summary['best'])}"
    tables = (f"; {summary['methods']} in the methods table, {summary['progressive']} through an assistant"
              if summary["compares_methods"] else "")
    typer.echo(f"{summary['called']} on {len(summary['students'])} students (best: {best}{tables}) "
               f"-> {out / 'report.md'}")
