"""The report over every evaluated student, one path for every task.

`write_report` reads what `kd distill` and `kd eval` wrote for each student (`results`),
computes the tables (`compare`) and writes, for the task the cache was labeled for (its `Score`):
leaderboard.csv (one row per student, the best mean score over seeds first), report.md
(`markdown`) and the task's PNG plots (`plots`); for image students also methods.csv (each
method's gain over soft targets alone) and progressive.csv (each student taught through an
assistant vs directly, with the teacher/student size ratio and both students' gains over their
twins: the capacity gap, also capacity_gap.png); with other test sets, test_sets.csv (each
student on each). All of it is built aside and replaces `out` only once complete.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from kd import tasks
from kd.errors import MissingInputError
from kd.files import replacing
from kd.report.compare import (
    METHODS_COLUMNS,
    PROGRESSIVE,
    TEST_SETS,
    is_soft_only,
    leaderboard,
    method_label,
    methods_table,
    progressive_table,
    test_sets_table,
    verdict,
)
from kd.report.markdown import render, seeds_sentence, sentence
from kd.report.plots import DRAW
from kd.report.results import Report, StudentResult, assistant_info, load_student, student_dirs
from kd.report.scores import SCORES, Score, score_for

__all__ = ["METHODS_COLUMNS", "PROGRESSIVE", "SCORES", "Score", "StudentResult", "is_soft_only", "leaderboard",
           "method_label", "methods_table", "progressive_table", "seeds_sentence", "sentence", "student_dirs",
           "verdict", "write_report"]


def write_report(students_dir: Path, out: Path, manifest: dict[str, Any], cache_root: Any,
                 names: list[str] | None = None, assistants: Path | None = None,
                 test_sets: dict[str, Path] | None = None, score_key: str | None = None) -> dict[str, Any]:
    """Write the report for `names` (default: every trained student under students_dir) of the
    cache whose manifest is given; assistants named by students are looked up under `assistants`;
    `test_sets` (label -> DIR) adds each student's scores on other test sets (`kd eval NAME --out
    DIR/NAME`): test_sets.csv and a table; ranked by the task's score or `score_key`
    (`scores.score_for`). Returns a summary for the command line."""
    students_dir, out = Path(students_dir), Path(out)
    score = score_for(tasks.name_of(manifest), score_key)
    names = student_dirs(students_dir) if names is None else list(names)
    if not names:
        raise MissingInputError(f"{students_dir}: no students to report on (run `kd distill NAME` and `kd eval NAME`)")
    results = [load_student(students_dir, name, score) for name in names]
    rows = leaderboard(results, score)
    by_name = {r.name: r for r in results}
    report = Report(score, rows, [by_name[row["student"]] for row in rows])
    if score.compares_methods:
        report.assistants = {name: assistant_info(assistants, name)
                             for name in sorted({r.spec["assistant"] for r in results if r.spec.get("assistant")})}
        report.methods = methods_table(results, score)
        report.progressive = progressive_table(results, report.assistants, score)
    if test_sets:
        report.test_sets = test_sets_table(report.results, score, test_sets)

    with replacing(out) as tmp:
        write_csv(tmp / "leaderboard.csv", score.columns, rows)
        if score.compares_methods:
            write_csv(tmp / "methods.csv", METHODS_COLUMNS, report.methods)
            write_csv(tmp / "progressive.csv", PROGRESSIVE, report.progressive)
        if test_sets:
            write_csv(tmp / "test_sets.csv", TEST_SETS, report.test_sets)
        (tmp / "report.md").write_text(render(report, manifest, cache_root))
        for png in score.plots:
            DRAW[png](report).savefig(tmp / png, dpi=110)
    top = rows[0][f"{score.key}_mean"]
    return {"students": [row["student"] for row in rows], "out": out,
            "best": [row["student"] for row in rows if row[f"{score.key}_mean"] == top],  # ties share it
            "methods": len(report.methods), "progressive": len(report.progressive),
            "called": score.called, "compares_methods": score.compares_methods}


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """`rows` under the header `columns`; floats to 6 decimals, None as an empty cell (csv's own rule)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows([{k: round(row[k], 6) if isinstance(row[k], float) else row[k] for k in columns}
                          for row in rows])
