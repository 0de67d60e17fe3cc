"""The `kd` command line as a whole: what it installs, how fast it starts, how it ends."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
import typer
import typer.main
from typer.testing import CliRunner

from kd.cli import app
from kd.cli.common import clean_errors

pytestmark = pytest.mark.integration


def commands(group: click.Group, path: tuple[str, ...] = ("kd",)):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_option_of_every_command_has_help():
    missing = [f"{path} {param.name}" for path, command in commands(typer.main.get_command(app))
               for param in command.params if not getattr(param, "help", None)]
    assert not missing, missing


def test_help_and_version_import_neither_torch_nor_transformers():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom kd.cli import app\n"
            "for args in (['--help'], ['--version'], ['label', '--help'], ['cache', 'info', '--help']):\n"
            "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'transformers', 'polars', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_kd_prints_the_installed_version():
    from importlib import metadata

    out = subprocess.run([sys.executable, "-m", "kd", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"kd {metadata.version('kd-cache')}"


def test_the_distribution_installs_one_top_level_package_kd():
    from importlib import metadata

    assert metadata.distribution("kd-cache").read_text("top_level.txt").split() == ["kd"]


def test_ctrl_c_is_one_line_and_exit_130():
    @clean_errors
    def interrupted() -> None:
        raise KeyboardInterrupt

    one = typer.Typer()
    one.command()(interrupted)
    result = CliRunner().invoke(one, [])
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == ["interrupted; run the same command again to resume"]


def test_a_params_error_lists_only_the_keys_a_user_may_write():
    from kd.config import StudentConfig, from_mapping
    from kd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"students\.a\.bogus: unknown key") as raised:
        from_mapping(StudentConfig, {"bogus": 1}, "students.a")
    listed = str(raised.value).split("expected one of: ")[1].rstrip(")").split(", ")
    assert "arch" in listed and "loss" in listed and not {"name", "section"} & set(listed)
