"""The `kd` command line: one module per command, each a thin Typer command over the library.

    kd prepare | teacher | generate | label | assistants | distill NAME | eval NAME | report
    kd cache info|verify|merge
    kd init DIR (a ready DVC project) | kd version

A command module imports only typer and `kd.cli.common` at the top; the library (and so torch
and transformers) is imported inside the command, so `kd --help` starts at once.
"""

from __future__ import annotations

import typer

from kd.cli import assistants, cache, distill, generate, init, label, prepare, report, teacher, version
from kd.cli import eval as eval_stage

app = typer.Typer(
    name="kd",
    help="Offline knowledge distillation: label once with the teacher, train students from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from kd import __version__

        typer.echo(f"kd {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool | None = typer.Option(None, "--version", callback=_version, is_eager=True,
                                        help="Print kd's version and exit."),
) -> None:
    """Offline knowledge distillation: label once with the teacher, train students from the cache."""


app.command("prepare")(prepare.main)
app.command("teacher")(teacher.main)
app.command("generate")(generate.main)
app.command("label")(label.main)
app.command("assistants")(assistants.main)
app.command("distill")(distill.main)
app.command("eval")(eval_stage.main)
app.command("report")(report.main)
app.add_typer(cache.app, name="cache")
app.command("init")(init.main)
app.command("version")(version.main)
