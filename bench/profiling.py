"""Profiles of the hot paths the benchmark times, to say what dominates each ratio.

    pip install pyinstrument && python bench/profiling.py      # writes bench/profiles/

For each path: a pyinstrument tree (`<name>.txt`) and the functions with the most self time
(`summary.json`, grouped by file:function). For training steps, also torch's op counts per
step (torch.profiler): the cost of a tiny student on a CPU is per-op dispatch, so the number
of ops per step is the figure that explains the cached/hard ratio.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"  # the example projects whose params and data a bench reads
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch
import typer

from bench import cases, stamp
from kd import config, losses
from kd.cache import Cache, label
from kd.config import SPLITS
from kd.distill import train_model
from kd.loader import SampleSet, needed_temperatures
from kd.methods import Shapes, student_layers, student_terms
from kd.prepared import images
from kd.tasks import image as image_task
from kd.tasks.image import (
    image_set,
    probe_shapes,
)
from kd.tasks.image_models import build
from kd.training import hard_label_loss, step


def self_times(session, top: int = 12) -> list[dict[str, Any]]:
    """pyinstrument frames -> the `top` file:function pairs by self time (seconds, share of the run).

    A frame's self time is its `[self]` child (pyinstrument's synthetic frame), or its whole time
    when it has no children (a leaf, e.g. a torch op called from Python)."""
    from pyinstrument.frame import SELF_TIME_FRAME_IDENTIFIER, SYNTHETIC_FRAME_IDENTIFIERS

    totals: dict[str, float] = collections.Counter()

    def walk(frame):
        if frame.identifier in SYNTHETIC_FRAME_IDENTIFIERS:  # [self] is counted by its parent
            for child in frame.children:
                walk(child)
            return
        name = f"{Path(frame.file_path or '?').name}:{frame.function}"
        own = [c for c in frame.children if c.identifier == SELF_TIME_FRAME_IDENTIFIER]
        totals[name] += sum(c.time for c in own) if frame.children else frame.time
        for child in frame.children:
            walk(child)

    root = session.root_frame()
    walk(root)
    whole = root.time or 1.0
    return [{"where": k, "seconds": v, "share": v / whole} for k, v in totals.most_common(top)]


def profiled(name: str, fn: Callable[[], Any], out: Path) -> dict[str, Any]:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    profiler.start()
    fn()
    profiler.stop()
    (out / f"{name}.txt").write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    return {"seconds": profiler.last_session.duration, "top_self_time": self_times(profiler.last_session)}


def ops_per_step(model, dataset, terms, steps: int = 20) -> dict[str, Any]:
    """torch ops (aten::*, top level and nested) per training step, forward + backward + AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = dataset.batches(0, 64, 0)
    for _ in range(3):  # warm up
        _train_step(model, next(batches), terms, optimizer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            _train_step(model, next(batches), terms, optimizer)
    counts = collections.Counter()
    cpu = collections.Counter()
    for event in prof.key_averages():
        counts[event.key] += event.count
        cpu[event.key] += event.self_cpu_time_total
    total_cpu = sum(cpu.values()) or 1
    return {"aten_ops_per_step": sum(v for k, v in counts.items() if k.startswith("aten::")) / steps,
            "top_self_cpu": [{"op": k, "per_step": counts[k] / steps, "share": v / total_cpu}
                             for k, v in cpu.most_common(10)]}


def _train_step(model, batch, terms, optimizer):
    values = step(model, batch, terms, [])
    loss = sum(terms[name][0] * value for name, value in values.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    for value in values.values():
        float(value.detach())


def main(out: Path = typer.Option(REPO / "bench" / "profiles"),
         params: Path = typer.Option(EXAMPLES / "mnist" / "params.yaml"),
         student: str = "mlp_soft", rows: int = 5000, label_rows: int = 2000, reader_rows: int = 200_000,
         threads: int = 1) -> None:
    """Profile labeling, a student's epoch (cached / hard labels), and the cache reader."""
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"threads": threads, "student": student}
    with tempfile.TemporaryDirectory(prefix="kd-profile-") as scratch:
        root = Path(scratch)
        ws = cases.workspace(root / "ws", params, rows)
        prepared = cases.prepare_default(root / "label_prepared", params, label_rows)
        for name, feats in (("label_features_off", {}), ("label_full_feature_map", {"stages.1": "full"})):
            cfg = dataclasses.replace(ws.label_cfg, features=feats)
            summary[name] = profiled(name, lambda: label(ws.teacher, prepared, root / name, cfg,
                                                         task_inputs=image_task.Inputs, progress=False), out)
        inputs = [torch.tensor(images.read_split(prepared / f"{s}.parquet").x).reshape(-1, 1, 28, 28) for s in SPLITS]

        def bare():
            with torch.no_grad():
                for x in inputs:
                    for i in range(0, len(x), ws.label_cfg.batch_size):
                        ws.teacher.model(x[i:i + ws.label_cfg.batch_size])
        summary["bare_forward"] = profiled("bare_forward", bare, out)

        cache = Cache.open(ws.cache)
        cfg = config.student(params, student)
        cached = image_task.rows(cache, ws.prepared, cfg, memory_mb=2048)
        labels = cached.targets["label"].clone()
        labels[labels < 0] = torch.from_numpy(cache.soft_targets("unlabeled", []).topk_idx[:, 0]).long()
        hard = image_set(cached.inputs["x"], cached.ids, cache.manifest["input_shape"], {"label": labels})
        shape, classes = cache.manifest["input_shape"], cache.num_classes
        epochs = dataclasses.replace(cfg, epochs=3, repeats=1)

        def model():
            torch.manual_seed(0)
            return build(cfg.arch, cfg.arch_kwargs, shape, classes)
        built = student_terms(cfg, Shapes(probe_shapes(model(), shape, student_layers(cfg)), {}))
        soft = cfg.loss.soft
        hard_terms = {"hard": (1.0, hard_label_loss)}
        summary["ops_per_step"] = {"cache": ops_per_step(model(), cached, built.terms),
                                   "hard_labels": ops_per_step(model(), hard, hard_terms)}
        summary["epoch_cache"] = profiled("epoch_cache", lambda: train_model(
            image_task, epochs, cache, ws.prepared, cached, "p", False, {}), out)
        summary["epoch_hard_labels"] = profiled("epoch_hard_labels", lambda: train_model(
            image_task, epochs, cache, ws.prepared, hard, "p", False, None), out)
        summary["loss_alone"] = _loss_alone(cached, soft)

        reader_prepared, reader_root, _ = cases.reader_workspace(root, params, reader_rows)
        reader_cache = Cache.open(reader_root)
        temps = needed_temperatures(cfg)
        summary["reader_soft_targets"] = profiled("reader_soft_targets", lambda: [
            reader_cache.soft_targets(s, temps) for _ in range(10) for s in cfg.transfer], out)
        summary["reader_transfer_set"] = profiled("reader_transfer_set", lambda: [
            image_task.rows(reader_cache, reader_prepared, cfg, memory_mb=2048) for _ in range(3)], out)
        streaming = image_task.rows(reader_cache, reader_prepared, cfg, memory_mb=1e-3)
        summary["reader_streamed_epoch"] = profiled("reader_streamed_epoch", lambda: sum(
            1 for _ in streaming.batches(0, 4096, 0)), out)
    stamp.write(out / "summary.json", summary)
    for name, entry in summary.items():
        if isinstance(entry, dict) and "top_self_time" in entry:
            print(f"\n{name} ({entry['seconds']:.2f} s): " + "; ".join(
                f"{t['where']} {t['share']:.0%}" for t in entry["top_self_time"][:6]))
    for name, entry in summary["ops_per_step"].items():
        print(f"\nops per step, {name}: {entry['aten_ops_per_step']:.0f} aten ops; " + "; ".join(
            f"{t['op']} x{t['per_step']:.0f} {t['share']:.0%}" for t in entry["top_self_cpu"][:6]))
    print("\nloss alone (forward + backward, microseconds per call):", summary["loss_alone"])
    print(f"\nwrote {out}")


def _loss_alone(cached: SampleSet, soft) -> dict[str, float]:
    """Microseconds per forward + backward of each soft loss on one batch, and of cross-entropy."""
    import time

    batch = next(cached.batches(0, 64, 0))
    logits = torch.randn(len(batch["x"]), 10, requires_grad=True)
    label = torch.randint(0, 10, (len(batch["x"]),))
    calls = {
        "topk_soft_target_loss": lambda: losses.topk_soft_target_loss(
            logits, batch["topk_idx"], batch["topk_logit"], batch["lse"], soft.temperature, tail=soft.tail),
        "cross_entropy": lambda: torch.nn.functional.cross_entropy(logits, label),
        "hard_label_loss": lambda: hard_label_loss({"label": label}, {"logits": logits}),
    }
    result = {}
    for name, fn in calls.items():
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(200):
                fn().backward()
            best = min(best, (time.perf_counter() - started) / 200 * 1e6)
        result[name] = best
    return result


if __name__ == "__main__":
    typer.run(main)
