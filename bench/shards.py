"""Sharded labeling against one process with the same total threads: wall time, side by side.

    python bench/shards.py                # mnist5k's 5,000 samples x 5 views, the default teacher, 3 rounds

Each round runs, in a shuffled order and each into a fresh cache directory:
- `one_process_2_threads`: `kd label` alone with 2 torch threads (OMP_NUM_THREADS=2);
- `two_shards_1_thread`: `kd label --shard 0/1 --num-shards 2`, two processes at once, 1 thread each;
- `torchrun_2x1`: `torchrun --nproc-per-node 2 --no-python kd label`, 1 thread each.
Wall time counts whole processes (imports included: that is what a user waits for). Figures
are medians of per-round ratios to `one_process_2_threads`; results go to
bench/results_shards.json. Run it on an idle machine: every variant uses both cores. Each
cache is also compared byte for byte with the one-process cache of the same threads per
process (float results of the teacher can differ between 1 and 2 torch threads).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"  # the example projects whose params and data a bench reads
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import typer

from bench import (
    cases,
    stamp,
)
from kd.prepared import images

KD = [str(Path(sys.executable).with_name("kd"))]  # the console script beside this Python


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}


def _label_args(root: Path, out: Path, params: Path, views: int) -> list[str]:
    return ["label", "--no-progress", "--teacher", str(root / "teacher"), "--prepared", str(root / "prepared"),
            "--out", str(out), "--params", str(params), "--views", str(views)]


def _wall(commands: list[tuple[list[str], dict[str, str]]]) -> float:
    """Seconds from starting every command at once to the last one finishing (all must succeed)."""
    started = time.perf_counter()
    running = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for cmd, env in commands]
    for process in running:
        _, err = process.communicate()
        if process.returncode != 0:
            lines = err.decode().splitlines()
            raise RuntimeError("\n".join([line for line in lines if line.startswith("error:")] or lines[-20:]))
    return time.perf_counter() - started


def shards(rows: int = 5000, views: int = 4, rounds: int = 3, params: Path = EXAMPLES / "mnist" / "params.yaml",
           out: Path | None = REPO / "bench" / "results_shards.json", log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="kd-shards-") as scratch:
        root = Path(scratch)
        cases.prepare_default(root / "prepared", params, rows)
        info = images.split_info(root / "prepared" / "labeled.parquet")
        cases.make_teacher(root / "teacher", params, info["input_shape"], info["num_classes"])

        def run(name: str) -> float:
            target = root / f"cache-{name}"
            shutil.rmtree(target, ignore_errors=True)
            args = _label_args(root, target, params, views)
            if name == "one_process_2_threads":
                return _wall([(KD + args, _env(2))])
            if name == "one_process_1_thread":
                return _wall([(KD + args, _env(1))])
            if name == "two_shards_1_thread":
                return _wall([(KD + args + ["--shard", str(i), "--num-shards", "2"], _env(1)) for i in range(2)])
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--no-python", *KD]
            return _wall([(torchrun + args, _env(1))])

        names = ["one_process_2_threads", "one_process_1_thread", "two_shards_1_thread", "torchrun_2x1"]
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in random.Random(r).sample(names, len(names)):
                times[name].append(run(name))
                log(f"round {r}: {name} {times[name][-1]:.1f} s")
        reference = root / "cache-one_process_1_thread"
        same = {"two_shards_1_thread": _same_tree(reference, root / "cache-two_shards_1_thread"),
                "torchrun_2x1": _same_tree(reference, root / "cache-torchrun_2x1"),
                "one_process_1_vs_2_threads": _same_tree(reference, root / "cache-one_process_2_threads")}
    base = times["one_process_2_threads"]
    results = {
        "samples": rows, "views": views, "rounds": rounds,
        "load_average_after": list(os.getloadavg()),
        "median_seconds": {n: median(v) for n, v in times.items()},
        "ratio_to_one_process_2_threads": {n: median(t / b for t, b in zip(v, base)) for n, v in times.items()},
        "cache_equal_to_one_process_1_thread": same,
    }
    log(json.dumps({k: results[k] for k in ("median_seconds", "ratio_to_one_process_2_threads",
                                            "cache_equal_to_one_process_1_thread")}, indent=2))
    if out is not None:
        stamp.write(out, results)
    return results


def _same_tree(a: Path, b: Path) -> bool:
    files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")  # noqa: E731
                          if p.is_file() and not p.name.startswith(".lock")}
    return files(a) == files(b)


def main(rows: int = typer.Option(5000, help="Samples labeled (all splits)."),
         views: int = typer.Option(4, help="Augmented views per sample (rows = samples x (views + 1))."),
         rounds: int = typer.Option(3, help="Interleaved rounds."),
         params: Path = typer.Option(EXAMPLES / "mnist" / "params.yaml"),
         out: Path = typer.Option(REPO / "bench" / "results_shards.json")) -> None:
    """Time sharded labeling against one process with the same total threads."""
    shards(rows, views, rounds, params, out)


if __name__ == "__main__":
    typer.run(main)
