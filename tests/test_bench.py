"""The benchmark suite runs end to end on tiny sizes and reports every case with finite ratios.

Timing values are not checked (they are benchmarks, not timed tests); only that `bench/run.py`'s
entry function runs its default cases and writes the JSON the table is made from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.run import KEYS, bench

pytestmark = pytest.mark.integration


def test_bench_default_cases_on_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    bench(out=out, rows=150, label_rows=60, size_rows=40, reader_rows=400, repeats=1, label_repeats=1,
          online_repeats=1, workdir=tmp_path / "work", log=lambda *_: None)

    results = json.loads(out.read_text())
    assert set(results["cases"]) == {KEYS[c] for c in ("labeling", "student", "size", "reader")}
    for case, result in results["cases"].items():
        assert result["ratios"], case
        for name, row in result["ratios"].items():
            assert math.isfinite(row["value"]) and row["value"] > 0, (case, name, row)
    ratios = results["cases"]
    assert {"features_off", "full_feature_map"} <= set(ratios["labeling_overhead"]["ratios"])
    assert {"mlp_soft", "cnn_soft", "mlp_soft.speedup_vs_online"} <= set(ratios["student_from_cache"]["ratios"])
    assert {"soft_k1_float16", "soft_k10_float32", "stages.1.full"} <= set(ratios["cache_size"]["ratios"])
    assert "soft_targets" in ratios["reader_throughput"]["ratios"]
    assert results["machine"]["nproc"] >= 1 and len(results["load_average_before"]) == 3
    stamped = results["provenance"]  # bench/stamp.py: where the figures came from
    assert stamped["commit"] and stamped["date"] and stamped["torch"] and stamped["machine"]["nproc"] >= 1
