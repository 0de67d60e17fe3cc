"""Fixtures shared by the tests: a scratch working directory, a params.yaml writer, a CLI runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import typer
import yaml
from typer.testing import CliRunner


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the current directory, so the stages' default paths (data/...) land in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """write_params(prepare={...}, teacher={...}) -> the path of a fresh params.yaml in tmp_path."""

    def write(path: Path | None = None, **sections: Any) -> Path:
        path = path or tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        return path

    return write


@pytest.fixture
def run_command() -> Callable[..., Any]:
    """run_command(stage.main, "--opt", value, ...) -> click Result, through typer's CliRunner.

    The command is registered alone on a fresh Typer app, as stages/cli.py registers it.
    """

    def run(command: Callable[..., Any], *args: Any) -> Any:
        app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        app.command()(command)
        return CliRunner().invoke(app, [str(a) for a in args])

    return run
