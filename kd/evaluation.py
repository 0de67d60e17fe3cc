"""What `kd eval` does the same for every task: the files of a student's scores.

A student's directory (`kd distill` writes it) holds its further seeds in `seeds/<seed>/`
(`seed_dirs` finds them, checked against the config); `kd eval` writes into it, whatever the
task (`write_results`),

    <student>/plots/<name>.csv        the task's plot tables (e.g. per_class.csv for an image student)
    <student>/metrics.json            the scalar keys only, flat, for `dvc metrics show`

which `kd report` reads (`kd.report.results`). `check_config` checks the `eval` section that
every task's `evaluate` reads.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from kd.config import EvalConfig
from kd.errors import ConfigError, InputError
from kd.files import replacing, write_json

SEEDS_DIR = "seeds"
# seeds/index.json: every trained seed -> its directory, relative to the student's ("." for the
# first). It also keeps seeds/ from being empty for one seed: DVC warns of an empty output.
SEEDS_INDEX = "index.json"
METRICS_FILE, PLOTS_DIR = "metrics.json", "plots"


def check_config(cfg: EvalConfig) -> None:
    for key in ("batch_size", "ece_bins", "latency_runs", "throughput_batch", "throughput_runs", "threads"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"eval.{key}: {value!r} must be an integer >= 1")


def seed_dirs(student_dir: Path, config: dict[str, Any]) -> list[tuple[int, Path]]:
    """The further seeds of a student, (seed, directory) in order, from `seeds/<seed>/`.

    When the config records `repeats`, the directories must be exactly seeds seed+1 ..
    seed+repeats-1: a partial or stale set would silently change the mean.
    """
    root = Path(student_dir) / SEEDS_DIR
    found = []
    if root.is_dir():
        for path in root.iterdir():
            try:
                found.append((int(path.name), path))
            except ValueError:
                continue  # not a seed (e.g. a hidden or temporary entry)
    found.sort()
    spec = config.get("student") or {}
    if "repeats" in spec and "seed" in spec:
        expected = [spec["seed"] + i for i in range(1, spec["repeats"])]
        if [seed for seed, _ in found] != expected:
            raise InputError(f"{root}: holds seeds {[seed for seed, _ in found]}, but {student_dir / 'config.json'} "
                             f"says seed {spec['seed']} with repeats {spec['repeats']} (expected {expected} here); "
                             f"run `kd distill {Path(student_dir).name}` again")
    return found


def write_results(student_dir: Path, tables: dict[str, tuple[list[str], list[dict[str, Any]]]],
                  record: dict[str, Any]) -> Path:
    """Write the plot tables (file name -> (columns, rows)) into plots/, swapped in whole, and
    then `record` as metrics.json (atomically), so metrics never stand beside older plots."""
    path = Path(student_dir) / METRICS_FILE
    path.unlink(missing_ok=True)  # never old metrics beside new plots, even after a crash
    with replacing(Path(student_dir) / PLOTS_DIR) as tmp:
        for name, (columns, rows) in tables.items():
            _write_csv(tmp / name, columns, rows)
    write_json(path, record)
    return path


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
