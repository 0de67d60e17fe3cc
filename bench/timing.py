"""Side-by-side timing: interleaved rounds, medians, and the ratio records the table prints.

Timings on a shared 2-core machine drift with whatever else runs, so a ratio is never taken
between runs: both sides run in the same process, in alternating order, `repeats` rounds,
and the ratio is the median over rounds of (side A / side B) in that round.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleave(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every side once per round, rotating which goes first; each side returns the
    seconds it measured (so a side can time only its hot part). -> side -> per-round seconds."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(float(sides[name]()))
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of numerator / denominator."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def ratio(value: float, target: float | None = None, better: str = "lower", *, what: str,
          note: str | None = None) -> dict[str, Any]:
    """One table row's figure. `better` says which side of `target` is met ("lower": value <=
    target; "higher": value >= target); no target = reported for information."""
    met = None
    if target is not None and math.isfinite(value):
        met = value <= target if better == "lower" else value >= target
    row = {"value": value, "target": target, "better": better, "met": met, "what": what}
    if note:
        row["note"] = note
    return row
