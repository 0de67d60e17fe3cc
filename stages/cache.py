"""`kd cache info PATH` and `kd cache verify PATH`: inspect and check a cache."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.cache.verify import format_info, info as cache_info, verify as cache_verify
from stages.common import clean_errors

app = typer.Typer(help="Inspect (info) and check (verify) a teacher-output cache.", no_args_is_help=True)


@app.command("info")
@clean_errors
def info(
    path: Path = typer.Argument(Path("data/teacher_outputs"), help="Cache directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a cache: teacher, top-k, temperatures, views, features, splits, fidelity."""
    summary = cache_info(path)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))


@app.command("verify")
@clean_errors
def verify(path: Path = typer.Argument(Path("data/teacher_outputs"), help="Cache directory.")) -> None:
    """Check every checksum, schema, row count and alignment; exit 1 with one line per problem."""
    problems = cache_verify(path)
    for problem in problems:
        typer.echo(problem, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{path}: intact")
