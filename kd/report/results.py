"""Reading what `kd distill` and `kd eval` wrote for each student, the same way for every task.

A student's directory holds `metrics.json` and `plots/*.csv` (from `kd eval`), its config
record and `train_log.csv` (from `kd distill`) and `baseline/<record>` for its twin. A teacher
assistant's directory holds `config.json` and its own cache's `outputs/manifest.json`.
Anything missing or malformed is refused with one line naming the file and the command to rerun.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.errors import InputError, MissingInputError
from kd.evaluation import METRICS_FILE, PLOTS_DIR
from kd.files import read_json
from kd.report.scores import Score

SEEDS_FILE = "seeds.csv"


@dataclass
class StudentResult:
    name: str
    directory: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    baseline_config: dict[str, Any]
    log: list[dict[str, float]]  # train_log.csv: one dict per epoch
    seeds: dict[str, dict[str, float]] = field(default_factory=dict)  # seeds.csv: seed -> {KEY, baseline_KEY}

    @property
    def spec(self) -> dict[str, Any]:
        """The StudentConfig the checkpoint was trained with, as a dict."""
        return self.config.get("student") or {}


@dataclass
class Report:
    """What report.md and every plot are drawn from."""
    score: Score
    rows: list[dict[str, Any]]  # the leaderboard (`compare.leaderboard`)
    results: list[StudentResult]  # in the leaderboard's order: the best first
    methods: list[dict[str, Any]] = field(default_factory=list)  # `compare.methods_table`
    progressive: list[dict[str, Any]] = field(default_factory=list)  # `compare.progressive_table`
    assistants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> params, accuracy
    test_sets: list[dict[str, Any]] = field(default_factory=list)  # `compare.test_sets_table`


def needed(score: Score) -> tuple[str, ...]:
    """The metrics.json keys the report reads for a student of this task."""
    columns = [c for c in score.columns if c not in ("student", score.change_column)]
    return (*columns, score.baseline_key, score.teacher_key, "teacher_params", f"{score.baseline_key}_mean",
            f"{score.baseline_key}_std")


def student_dirs(students_dir: Path) -> list[str]:
    """Names of the trained students under `students_dir` (directories holding a config.json)."""
    if not students_dir.is_dir():
        return []
    return sorted(p.name for p in students_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".tmp")
                  and (p / "config.json").is_file())


def load_student(students_dir: Path, name: str, score: Score) -> StudentResult:
    directory = Path(students_dir) / name
    if not directory.is_dir():
        raise MissingInputError(f"{directory}: student {name!r} not found "
                                f"(run `kd distill {name}` and `kd eval {name}`)")
    metrics = load_metrics(directory, name, score)
    record, baseline_record = directory / score.record, directory / "baseline" / score.record
    for path in (record, baseline_record):
        if not path.is_file():
            raise MissingInputError(f"{path}: not found (run `kd distill {name}`)")
    log = read_csv(directory / "train_log.csv", f"kd distill {name}", numbers=True)
    if not log or "epoch" not in log[0] or "total" not in log[0]:
        raise InputError(f"{directory / 'train_log.csv'}: expected a training log with columns epoch and total")
    return StudentResult(name, directory, metrics, read_json(record), read_json(baseline_record), log,
                         read_seeds(directory / PLOTS_DIR / SEEDS_FILE, name, metrics["seeds"], score))


def load_metrics(directory: Path, name: str, score: Score) -> dict[str, Any]:
    """The metrics.json `kd eval NAME` wrote into `directory` (the student's, or its --out),
    with every key the report reads."""
    metrics_path = Path(directory) / METRICS_FILE
    if not metrics_path.is_file():
        raise MissingInputError(f"{metrics_path}: not found; student {name!r} is not evaluated (run `kd eval {name}`)")
    metrics = read_json(metrics_path)
    if not isinstance(metrics, dict):
        raise InputError(f"{metrics_path}: expected a JSON object (run `kd eval {name}` again)")
    if metrics.get("objective") != score.objective:
        raise InputError(f"{metrics_path}: a student of objective {metrics.get('objective')!r}, the cache's students "
                         f"have {score.objective!r} (run `kd eval {name}` on this cache)")
    missing = [key for key in needed(score) if key not in metrics]
    if missing:
        raise InputError(f"{metrics_path}: missing key {missing[0]!r} (run `kd eval {name}` again)")
    return metrics


def read_csv(path: Path, rerun: str, numbers: bool = False) -> list[dict[str, Any]]:
    """A CSV's rows (with `numbers`, every value a float); refused naming `rerun`, the command that writes it."""
    if not path.is_file():
        raise MissingInputError(f"{path}: not found (run `{rerun}`)")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    try:
        return [{k: float(v) for k, v in row.items()} for row in rows] if numbers else rows
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: a value is not a number ({exc}); run `{rerun}` again") from None


def read_seeds(path: Path, name: str, count: int, score: Score) -> dict[str, dict[str, float]]:
    """seeds.csv of `kd eval`: seed -> {KEY, baseline_KEY} (read from the task's seeds_columns);
    `count` rows, as metrics.json says."""
    rows = read_csv(path, f"kd eval {name}")
    student, baseline = score.seeds_columns
    try:
        seeds = {row["seed"]: {score.key: float(row[student]), score.baseline_key: float(row[baseline])}
                 for row in rows}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: expected columns seed, {student}, {baseline} with numbers ({exc}); "
                         f"run `kd eval {name}` again") from None
    if len(seeds) != len(rows) or len(rows) != count:
        raise InputError(f"{path}: {len(rows)} rows ({len(seeds)} distinct seeds), but its metrics.json counts "
                         f"{count} seeds; run `kd eval {name}` again")
    return seeds


def plot_table(result: StudentResult, file: str, numbers: bool = False) -> list[dict[str, Any]]:
    """plots/<file> of a student, as written by `kd eval`."""
    return read_csv(result.directory / PLOTS_DIR / file, f"kd eval {result.name}", numbers)


def assistant_info(assistants: Path | None, name: str) -> dict[str, Any]:
    """An assistant's parameter count (its config.json) and test accuracy (its own cache's
    fidelity statistics); None for what is not there."""
    if assistants is None:
        return {"params": None, "accuracy": None}
    config, manifest = Path(assistants) / name / "config.json", Path(assistants) / name / "outputs" / "manifest.json"
    return {"params": read_json(config).get("params") if config.is_file() else None,
            "accuracy": (read_json(manifest).get("fidelity", {}).get("test", {}).get("teacher_accuracy")
                         if manifest.is_file() else None)}
