"""What every stage command shares: the params option and clean error reporting."""

from __future__ import annotations

import errno
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from kd.errors import ConfigError, KDError

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read defaults from.")


def clean_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a domain error (or a full disk) into one line on stderr and exit code 1, and Ctrl-C
    into one line and exit code 130 (what a shell reports for SIGINT)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted; run the same command again to resume", err=True)
            raise typer.Exit(130) from None
        except KDError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{exc.strerror}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def json_option(option: str, value: str | None) -> Any:
    """Parse an option given as JSON (None stays None), or fail naming the option."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option}: {value!r} is not valid JSON ({exc.msg})") from None


def numbers_option(option: str, text: str | None) -> list[float] | None:
    """Parse an option of comma-separated numbers ('0.5,0.5' or '[0.5, 0.5]'; None stays None)."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").strip("[]").split(",")]
    except ValueError:
        raise ConfigError(f"{option}: {text!r} must be numbers separated by commas, e.g. 0.5,0.5,0.5") from None


def override(config: Any, **options: Any) -> Any:
    """Set every option that was given (not None) on the config dataclass, re-validating it."""
    import dataclasses

    given = {k: v for k, v in options.items() if v is not None}
    return dataclasses.replace(config, **given) if given else config
