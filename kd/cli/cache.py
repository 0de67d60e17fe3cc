"""`kd cache info|verify|merge PATH`: inspect, check, and finish a sharded cache.

PATH is a cache directory or an object-store URL (s3://bucket/prefix).
"""

from __future__ import annotations

import json

import typer

from kd.cli.common import clean_errors

app = typer.Typer(help="Inspect (info), check (verify) and merge shards of a teacher-output cache.",
                  no_args_is_help=True)
PATH_ARGUMENT = typer.Argument("data/teacher_outputs", help="Cache directory or s3://bucket/prefix.")


@app.command("info")
@clean_errors
def info(
    path: str = PATH_ARGUMENT,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a cache: teacher, top-k, temperatures, views, features, splits, fidelity."""
    from kd import tasks
    from kd.cache.store import location
    from kd.cache.verify import format_info
    from kd.cache.verify import info as cache_info
    summary = cache_info(location(path))
    typer.echo(json.dumps(summary, indent=2) if as_json else format_info(summary, tasks.for_manifest))


@app.command("verify")
@clean_errors
def verify(path: str = PATH_ARGUMENT) -> None:
    """Check every checksum, schema, row count and alignment; exit 1 with one line per problem."""
    from kd import tasks
    from kd.cache.store import location
    from kd.cache.verify import verify as cache_verify
    problems = cache_verify(location(path), tasks.for_manifest)
    for problem in problems:
        typer.echo(problem, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{path}: intact")


@app.command("merge")
@clean_errors
def merge(
    path: str = PATH_ARGUMENT,
    num_shards: int | None = typer.Option(None, help="Expected number of shards (default: as the records say)."),
) -> None:
    """Write the manifest of a sharded `kd label` once every shard is done (the last shard does it too)."""
    from kd import tasks
    from kd.cache.shards import merge as cache_merge
    from kd.cache.store import location
    from kd.cache.verify import format_info
    from kd.cache.verify import info as cache_info
    cache_merge(location(path), num_shards)
    typer.echo(format_info(cache_info(location(path)), tasks.for_manifest))
