"""Where a results file came from: every bench script writes its JSON through `write`, which adds
a `provenance` record (the commit, whether the working tree had uncommitted changes, the date,
torch's version and thread count, the machine).

A figure without its commit and machine cannot be rerun or compared: the timings of this
project are ratios measured side by side, but the ratios still move with the CPU, the torch
build and the code. `bench/README.md` lists every script and its results file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """The CPUs (count and model), the OS and Python."""
    cpuinfo = Path("/proc/cpuinfo")
    model = platform.processor() or platform.machine()
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    return {"nproc": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version()}


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def provenance() -> dict[str, Any]:
    """This checkout's commit (with `uncommitted_changes` when the tracked files differ from it),
    the local date and time, torch's version and threads, and `machine()`."""
    import torch

    commit = _git("rev-parse", "HEAD")
    return {"commit": commit or "not recorded (no git checkout)",
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "machine": machine()}


def write(path: Path | str, results: dict[str, Any], default: Callable[[Any], Any] | None = None) -> Path:
    """Write `results` with its `provenance` to `path` as indented JSON (the folder made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, "provenance": provenance()}, indent=2, default=default) + "\n")
    return path
