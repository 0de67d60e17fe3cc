"""Case 4, scale: `kd prepare --dataset mnist1d`, `kd label` and one epoch of `kd distill` at two
sizes (default 100k and 1M samples), each command in a fresh process (bench/stage_runner.py).

Compares the larger size with the smaller one: peak RSS (target <= 1.25x) and rows/s (target:
within 20%, i.e. >= 0.8x) for `label` and `distill`. The splits are 1% labeled, 98% unlabeled,
1% test at every size; `distill` gets a small `--memory-mb` so that both sizes stream the cache.
`kd prepare` is reported too but has no target: it generates the whole dataset in memory
(mnist1d's generator is a per-sample Python loop, ~0.2 ms per sample on this machine).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.cases import make_teacher
from bench.timing import ratio
from kd import config
from kd.cache import Cache
from kd.loader import estimated_bytes

RUNNER = Path(__file__).resolve().parent / "stage_runner.py"


def run_stage(args: list[str], threads: int | None = None) -> dict[str, Any]:
    """One `kd` command in a fresh process -> the runner's JSON (seconds, peak RSS)."""
    env = {**os.environ, "KD_BENCH_THREADS": str(threads)} if threads else None
    proc = subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"kd {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def write_params(path: Path, params: Path, samples: int, student: str) -> None:
    """params.yaml for one size: mnist1d with 1% / 98% / 1% splits, the project's teacher and
    label sections, and `student` for one epoch, one seed."""
    project = config.load_params(params)
    labeled = test = max(10, samples // 100)
    entry = dict(project["students"][student])
    entry.update(epochs=1, repeats=1)
    path.write_text(yaml.safe_dump({
        "prepare": {"dataset": "mnist1d", "samples": samples, "labeled": labeled, "test": test,
                    "unlabeled": samples - labeled - test, "seed": 0},
        "teacher": project.get("teacher", {}),
        "label": project.get("label", {}),
        "students": {student: entry},
    }, sort_keys=False))


def one_size(root: Path, params: Path, samples: int, memory_mb: float, student: str,
             threads: int | None) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    size_params = root / "params.yaml"
    write_params(size_params, params, samples, student)
    prepared, cache, teacher = root / "prepared", root / "cache", root / "teacher"
    stages: dict[str, Any] = {}
    stages["prepare"] = run_stage(["prepare", "--params", str(size_params), "--out", str(prepared)], threads)
    make_teacher(teacher, size_params, [40], 10)
    stages["label"] = run_stage(["label", "--params", str(size_params), "--teacher", str(teacher),
                                 "--prepared", str(prepared), "--out", str(cache), "--no-progress"], threads)
    stages["distill"] = run_stage([
        "distill", student, "--params", str(size_params), "--cache", str(cache), "--prepared", str(prepared),
        "--students-dir", str(root / "students"), "--baselines", str(root / "baselines"),
        "--checkpoints", str(root / "checkpoints"), "--memory-mb", str(memory_mb), "--no-progress"], threads)
    opened = Cache.open(cache)
    cfg = config.student(size_params, student)
    transfer_rows = sum(opened.split(s)["rows"] for s in cfg.transfer)
    set_bytes = estimated_bytes(opened, cfg, 4 * math.prod(opened.manifest["input_shape"]))  # float32 images
    with open(root / "students" / student / "train_log.csv") as handle:
        epoch_seconds = float(next(csv.DictReader(handle))["seconds"])
    stages["prepare"]["rows_per_second"] = samples / stages["prepare"]["seconds"]
    stages["label"]["rows_per_second"] = samples / stages["label"]["seconds"]
    stages["distill"].update(epoch_seconds=epoch_seconds, rows_per_second=transfer_rows / epoch_seconds,
                             transfer_rows=transfer_rows,
                             mode="streamed" if set_bytes > memory_mb * 2**20 else "in memory",
                             estimated_set_mb=set_bytes / 2**20)
    stages["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    return stages


def growth_ratios(runs: dict[int, dict[str, Any]], unit: str) -> dict[str, Any]:
    """`kd label` and `kd distill` at the largest size against the smallest: peak RSS (target
    <= 1.25), the same above the imports, and `unit`s per second (target >= 0.8), each stage's
    run holding `peak_rss_mb`, `rss_after_imports_mb` and `<unit>_per_second`."""
    small, big = min(runs), max(runs)
    times = f"{big // small}x" if big % small == 0 else f"{big / small:.1f}x"
    ratios = {}
    for stage in ("label", "distill"):
        a, b = runs[small][stage], runs[big][stage]
        ratios[f"{stage}.peak_rss"] = ratio(b["peak_rss_mb"] / a["peak_rss_mb"], 1.25,
                                            what=f"`kd {stage}` peak RSS at {big:,} / at {small:,} ({times} {unit})")
        ratios[f"{stage}.rss_above_imports"] = ratio(
            (b["peak_rss_mb"] - b["rss_after_imports_mb"]) / max(1e-9, a["peak_rss_mb"] - a["rss_after_imports_mb"]),
            what="same, counting only what the command adds after its imports")
        rate = f"{unit}_per_second"
        ratios[f"{stage}.{rate}"] = ratio(b[rate] / a[rate], 0.8, better="higher",
                                          what=f"`kd {stage}` {unit}/s at {big:,} / at {small:,}")
    return ratios


def scale(root: Path, params: Path, sizes: list[int], memory_mb: float = 16, student: str = "mlp_soft",
          threads: int | None = 1, log=print) -> dict[str, Any]:
    """Both sizes, smaller first; ratios of the largest against the smallest."""
    runs = {}
    for samples in sorted(sizes):
        log(f"scale: {samples:,} samples ...")
        runs[samples] = one_size(root / f"n{samples}", params, samples, memory_mb, student, threads)
        log(f"scale: {samples:,} done: " + ", ".join(
            f"{stage} {runs[samples][stage]['seconds']:.1f} s / {runs[samples][stage]['peak_rss_mb']:.0f} MB"
            for stage in ("prepare", "label", "distill")))
    small, big = min(runs), max(runs)
    ratios = growth_ratios(runs, "rows")
    ratios["distill.command_rows_per_second"] = ratio(
        (runs[big]["distill"]["transfer_rows"] / runs[big]["distill"]["seconds"])
        / (runs[small]["distill"]["transfer_rows"] / runs[small]["distill"]["seconds"]), better="higher",
        what="same over the whole command (cache check, set-up, the epoch, the baseline twin)")
    ratios["prepare.peak_rss"] = ratio(runs[big]["prepare"]["peak_rss_mb"] / runs[small]["prepare"]["peak_rss_mb"],
                                       what="`kd prepare` peak RSS (generates everything in memory; no target)")
    return {"ratios": ratios, "details": {"sizes": sorted(runs), "memory_mb": memory_mb, "student": student,
                                          "threads": threads, "runs": {str(k): v for k, v in runs.items()}}}
