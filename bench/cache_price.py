"""The cache's price in quality (issue 30): student quality against cache bytes per token, with
the online-distillation line.

For each pipeline (text: the default GPT-2 student `gpt_small`, test perplexity; digits: the
default `mlp_soft`, test accuracy), this labels caches of the pipeline's own teacher at several
sizes (float16 and compact top-k at several k, sampled targets at several N beside the top-1),
trains the student from each with 3 seeds (`bench/online_kd.py`: kd's training loop, no twin),
and once online with the teacher in the loop. Bytes per token are `kd cache info`'s soft-target
bytes per row of the student's transfer split (`verify.info`, `splits.unlabeled.bytes_per_row`);
KL and kept mass are the writer's fidelity statistics on that split at the student's
temperature.

Needs the pipeline's teacher and prepared data (`dvc repro examples/text/dvc.yaml:teacher`,
`dvc repro examples/mnist/dvc.yaml:teacher`, or `--data` pointing at a checkout that has them):

    python bench/cache_price.py --pipeline text --jobs 2
    python bench/cache_price.py --pipeline digits --jobs 2

Caches go to `--work` (several GB at k = V on text). The text caches are labeled from a copy of
the prepared data whose `labeled` split is the test split: the student reads only `unlabeled`,
whose rows are the same whatever the other splits are, and the k = V cache of the 625 labeled
blocks would take 2 GB. Runs are appended to `WORK/runs.jsonl` and a rerun skips those done, so
an interrupted grid resumes; `--points` picks points (in the order given: earlier ones first,
all seeds of a point before the next). Writes `bench/results_cache_price_<pipeline>.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# pipeline -> (example folder, the student's temperature, vocabulary size)
PIPELINES = {"text": ("examples/text", 1, 4096), "digits": ("examples/mnist", 4, 10)}
# point name -> label settings (beside temperatures [T] and no features); "online" has no cache
POINTS = {
    "text": {
        "online": None,
        "f16_k32": {"top_k": 32},
        "full_k4096": {"top_k": 4096},
        "sampled_n128": {"top_k": 1, "sampling": 128},
        "compact_k128": {"top_k": 128, "encoding": "compact"},
        "sampled_n512": {"top_k": 1, "sampling": 512},
        "compact_k512": {"top_k": 512, "encoding": "compact"},
        "sampled_n32": {"top_k": 1, "sampling": 32},
        "compact_k32": {"top_k": 32, "encoding": "compact"},
        "f16_k128": {"top_k": 128},
    },
    "digits": {
        "online": None,
        "f16_k1": {"top_k": 1},
        "f16_k2": {"top_k": 2},
        "f16_k5": {"top_k": 5},
        "full_k10": {"top_k": 10},
        "compact_k1": {"top_k": 1, "encoding": "compact"},
        "compact_k5": {"top_k": 5, "encoding": "compact"},
        "compact_k10": {"top_k": 10, "encoding": "compact"},
        "sampled_n1": {"top_k": 1, "sampling": 1},
        "sampled_n4": {"top_k": 1, "sampling": 4},
        "sampled_n16": {"top_k": 1, "sampling": 16},
    },
}
ONLINE_ROWS = {"text": "f16_k32", "digits": "f16_k5"}  # the cache whose rows (not soft targets) online reads


def prepared_copy(pipeline: str, data: Path, work: Path) -> Path:
    """The prepared data the caches are labeled from (text: `labeled` replaced by the test
    split, see the module's docstring)."""
    source = data / "prepared"
    if pipeline != "text":
        return source
    out = work / "prepared"
    if not (out / "test.parquet").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for name in ("unlabeled.parquet", "test.parquet", "tokenizer.json"):
            shutil.copy2(source / name, out / name)
        shutil.copy2(source / "test.parquet", out / "labeled.parquet")
    return out


def label_point(pipeline: str, point: str, data: Path, prepared: Path, work: Path) -> Path:
    """The cache of `point`, labeled by kd's own writer unless it is there (an intact cache of
    the same settings is left as is)."""
    from kd import tasks
    from kd.cache import label
    from kd.config import LabelConfig

    out = work / point
    _, T, _ = PIPELINES[pipeline]
    cfg = LabelConfig(temperatures=[T], features={}, batch_size=4096 if pipeline == "text" else 256,
                      **POINTS[pipeline][point])
    teacher_dir = data / "teacher"
    teacher = tasks.for_teacher(teacher_dir).load_teacher(teacher_dir, None, None, device="cpu")
    label(teacher, prepared, out, cfg, task_inputs=tasks.inputs_for(prepared, teacher), progress=False)
    return out


def describe(pipeline: str, cache: Path) -> dict:
    """Bytes per token (row) of the transfer split and the fidelity at the student's T."""
    from kd.cache.verify import info

    _, T, _ = PIPELINES[pipeline]
    summary = info(cache)
    split = summary["splits"]["unlabeled"]
    return {"bytes_per_token": split["bytes_per_row"], "rows": split["rows"],
            "fidelity": (summary["fidelity"] or {}).get("unlabeled", {}).get(f"t{T:g}")}


def run_one(pipeline: str, point: str, seed: int, work: Path, prepared: Path, data: Path, log: Path) -> dict:
    cache = work / (ONLINE_ROWS[pipeline] if point == "online" else point)
    cmd = [sys.executable, str(ROOT / "bench/online_kd.py"), "--pipeline", pipeline, "--seed", str(seed),
           "--cache", str(cache), "--prepared", str(prepared)]
    if point == "online":
        cmd += ["--online", str(data / "teacher")]
    elif POINTS[pipeline][point].get("sampling"):  # the soft term reads the draws (loss.soft.targets: sampled)
        cmd += ["--targets", "sampled"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    record = {**json.loads(done.stdout.strip().splitlines()[-1]), "point": point,
              "load": Path("/proc/loadavg").read_text().split()[:3]}
    with open(log, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(f"{point} seed {seed}: {record['metric']} {record['score']:.4f} "
          f"({record['seconds_per_epoch']:.1f} s/epoch, load {' '.join(record['load'])})", flush=True)
    return record


def table(pipeline: str, points: list[str], runs: list[dict], caches: dict[str, dict]) -> list[dict]:
    """Per point: mean and std over seeds, and each seed's score over the online one of the same
    seed (the same initial weights and batches: the paired ratio has less noise than either)."""
    online = {r["seed"]: r["score"] for r in runs if r["point"] == "online"}
    rows = []
    for point in points:
        scores = {r["seed"]: r["score"] for r in runs if r["point"] == point}
        if not scores:
            continue
        values = [scores[s] for s in sorted(scores)]
        ratios = [scores[s] / online[s] for s in sorted(scores) if s in online]
        rows.append({"point": point, "seeds": sorted(scores), "scores": values,
                     "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "ratio_to_online_mean": statistics.mean(ratios) if ratios else None,
                     "ratio_to_online_std": statistics.stdev(ratios) if len(ratios) > 1 else None,
                     **caches.get(point, {"bytes_per_token": None, "fidelity": None}),
                     "seconds_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in runs
                                                          if r["point"] == point)})
    return rows


def markdown(pipeline: str, rows: list[dict]) -> str:
    metric = "test perplexity" if pipeline == "text" else "test accuracy"
    lines = [f"| point | bytes per token | KL(full \\|\\| cached) | {metric} (mean ± std) | per seed | "
             "over online, paired (mean ± std) |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        fid = r["fidelity"] or {}
        kl = fid.get("kl_full_to_sampled", fid.get("kl_full_to_cached"))  # sampled: the draws' KL
        fmt = ".1f" if pipeline == "text" else ".4f"
        ratio = ("" if r["ratio_to_online_mean"] is None else
                 f"{r['ratio_to_online_mean']:.3f} ± {r['ratio_to_online_std'] or 0:.3f}")
        lines.append(f"| {r['point']} | {'' if r['bytes_per_token'] is None else round(r['bytes_per_token'])} | "
                     f"{'' if kl is None else f'{kl:.3f}'} | {r['mean']:{fmt}} ± {r['std']:{fmt}} | "
                     f"{', '.join(f'{s:{fmt}}' for s in r['scores'])} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", choices=list(PIPELINES), required=True)
    parser.add_argument("--data", type=Path, default=None, help="the pipeline's data folder (default: the example's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kd_cache_price"))
    parser.add_argument("--points", default=None, help="comma-separated point names (default: all, in order)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="students trained at once (one torch thread each)")
    parser.add_argument("--no-train", action="store_true", help="only the table of the runs in WORK/runs.jsonl")
    args = parser.parse_args()
    folder, _, _ = PIPELINES[args.pipeline]
    data = args.data or ROOT / folder / "data"
    work = args.work / args.pipeline
    work.mkdir(parents=True, exist_ok=True)
    points = args.points.split(",") if args.points else list(POINTS[args.pipeline])
    prepared = prepared_copy(args.pipeline, data, work)
    log = work / "runs.jsonl"
    done = {(r["point"], r["seed"]) for r in map(json.loads, log.read_text().splitlines())} if log.is_file() else set()
    caches, label_seconds = {}, {}
    for point in dict.fromkeys([ONLINE_ROWS[args.pipeline], *points]):
        if POINTS[args.pipeline][point] is None:
            continue
        started = time.perf_counter()
        caches[point] = describe(args.pipeline, label_point(args.pipeline, point, data, prepared, work))
        label_seconds[point] = time.perf_counter() - started
        print(f"cache {point}: {caches[point]['bytes_per_token']:.1f} B/token ({label_seconds[point]:.0f} s)",
              flush=True)
    todo = [] if args.no_train else [(p, s) for p in points for s in range(args.seeds) if (p, s) not in done]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run_one(args.pipeline, *job, work, prepared, data, log), todo))
    runs = [r for r in map(json.loads, log.read_text().splitlines())]
    rows = table(args.pipeline, points, runs, caches)
    print(markdown(args.pipeline, rows))
    stamp.write(ROOT / f"bench/results_cache_price_{args.pipeline}.json",
                {"pipeline": args.pipeline, "command": " ".join(sys.argv), "rows": rows, "runs": runs,
                 "label_seconds": label_seconds})


if __name__ == "__main__":
    main()
