"""The benchmark suite: one command that runs every case, prints a table and writes
bench/results.json (the figures, the machine, the date, the load average).

    python bench/run.py                  # cases 1, 2, 3 and 5 (about 4 minutes on 2 cores)
    python bench/run.py --scale          # + case 4: 100k vs 1M mnist1d rows in fresh processes (+6 minutes)
    python bench/run.py --only student   # one case (labeling, student, size, reader, scale)

Every figure is a ratio measured side by side in one process (interleaved rounds, median of the
per-round ratios), never an absolute time compared across runs. The cases are in bench/cases.py
(and bench/scale.py for case 4); bench/profiling.py profiles the same hot paths.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"  # the example projects whose params and data a bench reads
if str(REPO) not in sys.path:  # `python bench/run.py` puts bench/, not the repository, on sys.path
    sys.path.insert(0, str(REPO))

import torch
import typer

from bench import cases, stamp
from bench.scale import scale as scale_case
from kd import speed

CASES = ("labeling", "student", "size", "reader", "scale")
KEYS = {"labeling": "labeling_overhead", "student": "student_from_cache", "size": "cache_size",
        "reader": "reader_throughput", "scale": "scale"}


def bench(*, out: Path | None = REPO / "bench" / "results.json", params: Path = EXAMPLES / "mnist" / "params.yaml",
          only: list[str] | None = None, scale: bool = False, rows: int = 5000, label_rows: int = 2000,
          size_rows: int = 2000, reader_rows: int = 200_000, students: list[str] | None = None,
          repeats: int = 5, label_repeats: int = 3, online_repeats: int = 3, epochs: int = 1,
          scale_sizes: list[int] = (100_000, 1_000_000), scale_memory_mb: float = 16,
          threads: int | None = 1, workdir: Path | None = None,
          log=print) -> dict[str, Any]:
    """Run the chosen cases (default: all but scale) and return (and write to `out`) the results."""
    chosen = list(only) if only else [c for c in CASES if c != "scale" or scale]
    if students is None:  # every student of params.yaml
        from kd import config

        students = config.student_names(params)
    for name in chosen:
        if name not in CASES:
            raise typer.BadParameter(f"unknown case {name!r} (cases: {', '.join(CASES)})")
    with speed.torch_threads(threads) if threads else contextlib.nullcontext():  # restored on return
        results: dict[str, Any] = {
            # the commit, date, torch and machine go in `provenance` (bench/stamp.py); the threads here
            "machine": {**stamp.machine(), "torch_threads": torch.get_num_threads()},
            "load_average_before": list(os.getloadavg()),
            "options": {"rows": rows, "label_rows": label_rows, "size_rows": size_rows, "reader_rows": reader_rows,
                        "students": list(students), "repeats": repeats, "label_repeats": label_repeats,
                        "online_repeats": online_repeats, "epochs_per_measurement": epochs,
                        "scale_sizes": list(scale_sizes), "scale_memory_mb": scale_memory_mb, "threads": threads,
                        "params": str(params)},
            "cases": {}, "seconds": {},
        }
        with tempfile.TemporaryDirectory(prefix="kd-bench-") as scratch:
            root = Path(workdir or scratch)
            root.mkdir(parents=True, exist_ok=True)
            ws = None
            if set(chosen) & {"labeling", "student", "size", "reader"}:
                started = time.perf_counter()
                log(f"workspace: mnist5k ({rows} rows), random-weight default teacher, its cache ...")
                ws = cases.workspace(root / "ws", params, rows)
                results["seconds"]["workspace"] = time.perf_counter() - started
            runs = {
                "labeling": lambda: cases.labeling_overhead(ws, label_rows, label_repeats),
                "student": lambda: cases.student_from_cache(ws, list(students), repeats, online_repeats, epochs),
                "size": lambda: cases.cache_size(ws, size_rows),
                "reader": lambda: cases.reader_throughput(ws, reader_rows, repeats),
                "scale": lambda: scale_case(root / "scale", params, list(scale_sizes), scale_memory_mb,
                                            threads=threads, log=log),
            }
            for name in chosen:
                log(f"case {KEYS[name]} ...")
                started = time.perf_counter()
                results["cases"][KEYS[name]] = runs[name]()
                results["seconds"][KEYS[name]] = time.perf_counter() - started
        results["load_average_after"] = list(os.getloadavg())
        log(table(results))
        if out is not None:
            stamp.write(out, results, default=_jsonable)
            log(f"wrote {out}")
        return results


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _target(row: dict[str, Any]) -> str:
    if row["target"] is None:
        return "-"
    return f"{'<=' if row['better'] == 'lower' else '>='} {row['target']:.2f}"


def _met(row: dict[str, Any]) -> str:
    return "info" if row["met"] is None else ("met" if row["met"] else "NOT met")


def table(results: dict[str, Any]) -> str:
    """The Markdown table of every ratio, then the cache-size figures in bytes per row."""
    lines = ["", "| case | figure | measured | target | |", "|---|---|---:|---:|---|"]
    for case, result in results["cases"].items():
        for name, row in result["ratios"].items():
            value = f"{row['value']:.3f}" if math.isfinite(row["value"]) else str(row["value"])
            lines.append(f"| {case} | {name}: {row['what']} | {value} | {_target(row)} | {_met(row)} |")
    size = results["cases"].get("cache_size")
    if size:
        d = size["details"]
        lines += ["", f"Cache size, bytes per row ({d['rows']} rows, {d['classes']} classes, lse for T in "
                      f"{d['temperatures']}; Parquet zstd as the writer writes it):",
                  "| soft targets | on disk | column data | uncompressed |", "|---|---:|---:|---:|",
                  f"| full float32 logits (+ id, view) | {d['full_logits']['file_bytes_per_row']:.1f} | "
                  f"{d['full_logits']['data_bytes_per_row']:.1f} | {d['full_logits']['uncompressed_bytes_per_row']} |"]
        for key, row in d["soft_targets"].items():
            lines.append(f"| {key} | {row['file_bytes_per_row']:.1f} | {row['data_bytes_per_row']:.1f} | "
                         f"{row['uncompressed_bytes_per_row']} |")
        lines += ["", "| feature layer | raw float32 | float32 zstd | full (f16 zstd) | pooled | attention |",
                  "|---|---:|---:|---:|---:|---:|"]
        for layer, row in d["features"].items():
            cells = [f"{row[m]['bytes_per_row']:.0f}" if m in row else "-" for m in ("full", "pooled", "attention")]
            lines.append(f"| {layer} {row['source_shape']} | {row['full_float32_raw_bytes_per_row']} | "
                         f"{row['full_float32_zstd_bytes_per_row']:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"machine: {results['machine']['nproc']} cpus ({results['machine']['cpu_model']}), torch threads "
                 f"{results['machine']['torch_threads']}; load average before {results['load_average_before'][0]:.2f}, "
                 f"after {results.get('load_average_after', [float('nan')])[0]:.2f}")
    return "\n".join(lines)


def main(
    scale: bool = typer.Option(False, "--scale", help="Also run case 4 (mnist1d at --scale-sizes, fresh processes; "
                               "about 6 minutes for 100k and 1M, over half of it generating mnist1d)."),
    rows: int = typer.Option(5000, help="mnist5k samples in the shared workspace (cases 2, 3)."),
    label_rows: int = typer.Option(2000, help="Samples labeled per measurement in case 1."),
    size_rows: int = typer.Option(2000, help="Rows written per layout in case 3."),
    reader_rows: int = typer.Option(200_000, help="Samples in the cache read by case 5."),
    students: str = typer.Option("all", help="Comma-separated students of params.yaml for case 2 (all: every one)."),
    repeats: int = typer.Option(5, help="Interleaved rounds per ratio (cases 2 and 5)."),
    label_repeats: int = typer.Option(3, help="Interleaved rounds in case 1."),
    online_repeats: int = typer.Option(3, help="Rounds of online KD vs cached in case 2."),
    epochs: int = typer.Option(1, help="Epochs per training measurement in case 2."),
    scale_sizes: str = typer.Option("100000,1000000", help="Sample counts compared by case 4."),
    scale_memory_mb: float = typer.Option(16, help="`kd distill --memory-mb` in case 4 (small: both sizes stream)."),
    only: str | None = typer.Option(None, help=f"Comma-separated cases to run: {', '.join(CASES)}."),
    threads: int = typer.Option(1, help="torch threads, here and in case 4's `kd` processes (0: torch's own "
                                "choice). 1 by default: on a busy 2-core machine OpenMP's spinning threads make "
                                "2-thread timings 10-100x slower and meaningless."),
    params: Path = typer.Option(EXAMPLES / "mnist" / "params.yaml",
                                help="params.yaml with the default teacher, label and students."),
    workdir: Path | None = typer.Option(None, help="Keep the scratch data here (default: a temporary directory)."),
    out: Path = typer.Option(REPO / "bench" / "results.json", help="Where to write the results."),
) -> None:
    """Run the benchmark cases and print every ratio beside its target."""
    names = None if students == "all" else [s for s in students.split(",") if s]
    bench(out=out, params=params, only=only.split(",") if only else None, scale=scale, rows=rows,
          label_rows=label_rows, size_rows=size_rows, reader_rows=reader_rows, students=names, repeats=repeats,
          label_repeats=label_repeats, online_repeats=online_repeats, epochs=epochs,
          scale_sizes=[int(s) for s in scale_sizes.split(",")], scale_memory_mb=scale_memory_mb,
          threads=threads, workdir=workdir)


if __name__ == "__main__":
    typer.run(main)
