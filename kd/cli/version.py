"""`kd version`: print kd's version, or write it to a file.

`kd version --out data/kd_version.txt` is the first stage of a project made by `kd init`: it
runs every time (`always_changed`), and every other stage depends on the file, so DVC redoes
them when the installed kd changes and not otherwise (the file is rewritten only when its
content changes).
"""

from __future__ import annotations

from pathlib import Path

import typer

from kd.cli.common import clean_errors


@clean_errors
def main(
    out: Path | None = typer.Option(None, "--out", help="Write the version to this file (atomically) "
                                    "instead of printing it."),
) -> None:
    """Print kd's version, or write it to --out."""
    from kd import __version__
    from kd.files import write_text

    line = f"kd {__version__}\n"
    if out is None:
        typer.echo(line, nl=False)
    elif not out.is_file() or out.read_text() != line:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, line)
