"""An image student's scores on the test split: quality against labels and teacher, size and speed.

`evaluate` puts the pure metrics (`kd.metrics`) and the timing (`kd.speed`) together for one
image student directory and returns every key of the contract's `metrics.json` plus the plot
data; `metrics_record` is its flat part and `plot_tables` its tables, which
`evaluation.write_results` writes as

    <student>/plots/per_class.csv     class, student, baseline, support
    <student>/plots/confusion.csv     actual, predicted (one row per test sample; DVC's confusion template)
    <student>/plots/reliability.csv   bin, lower, upper, confidence, accuracy, count
    <student>/plots/seeds.csv         seed, accuracy, baseline_accuracy (one row per trained seed)
    <student>/metrics.json            the scalar keys only, flat, for `dvc metrics show`

Every key of the contract is measured on the first seed (the student at the top of its
directory). A student trained with `repeats` > 1 also has `seeds/<seed>/` (with its own
baseline twin); those seeds are measured for test accuracy only, and the SEED_KEYS summarise
all seeds: mean and sample standard deviation of the accuracy and of the per-seed gain over
the twin, in accuracy points.

The teacher is never loaded: agreement and KL come from the cache, the teacher's accuracy
from the cache's fidelity statistics, and its speed from an architecture twin with random
weights rebuilt from the manifest and timed side by side with the student.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from kd.cache import Cache
from kd.config import EvalConfig
from kd.errors import ConfigError, InputError, StaleCacheError
from kd.evaluation import check_config, seed_dirs
from kd.metrics import (
    SEED_KEYS,
    accuracy,
    agreement,
    confusion_matrix,
    ece,
    kl_to_teacher,
    per_class_accuracy,
    pseudo_label_accuracy,
    reliability,
    seed_summary,
)
from kd.prepared import images
from kd.speed import count_params, latency_ms, throughputs, torch_threads
from kd.tasks.image_models import build, load_model
from kd.training import predict

# The contract's keys of metrics.json (pseudo_label_accuracy only when the truth is known),
# then what says how two of them were obtained.
CONTRACT_KEYS = ("accuracy", "baseline_accuracy", "teacher_accuracy", "accuracy_retained", "agreement",
                 "kl_to_teacher", "ece", "params", "teacher_params", "size_bytes", "latency_ms", "throughput",
                 "speedup_vs_teacher", "pseudo_label_accuracy")
PROVENANCE_KEYS = ("kl_exact", "teacher_throughput_source")


def evaluate(student_dir: Path, cache: Cache, prepared: Path, cfg: EvalConfig, arch: str | None = None,
             arch_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every metrics.json key for the student in `student_dir`, plus `plots` (per-class
    accuracy, confusion matrix, reliability diagram of the first seed; per-seed accuracies).

    `arch`/`arch_kwargs` (from params.yaml) are needed only for a `package.module:factory`
    student; built-in students are rebuilt from their checkpoint's config.
    `kl_exact` says whether the cache's top-k covers every class (else the KL is the
    top-k + tail-bucket lower bound); `teacher_throughput_source` is "measured" (a
    random-weight twin timed alongside), "manifest" (the teacher config's `throughput`,
    for an architecture that is not built in) or "unavailable" (speedup null).
    """
    check_config(cfg)
    student_dir, prepared = Path(student_dir), Path(prepared)
    test_path = prepared / "test.parquet"
    cache.require(temperatures=[1], who="kd eval (KL to the teacher at T=1)")
    cache.check(prepared, ["test"])
    model, config = load_model(student_dir, arch=arch, arch_kwargs=arch_kwargs)
    baseline, baseline_config = load_model(student_dir / "baseline", arch=arch, arch_kwargs=arch_kwargs)
    _check_student(student_dir, config, cache)
    extra_seeds = seed_dirs(student_dir, config)  # checked before any work
    test = images.read_split(test_path)
    if list(config["input_shape"]) != list(test.input_shape):
        raise InputError(f"{student_dir / 'config.json'}: input_shape {config['input_shape']} differs from "
                         f"{test_path}'s {test.input_shape}")
    if not (test.y >= 0).any():
        raise InputError(f"{test_path}: no labeled rows to evaluate on")

    soft = cache.soft_targets("test", [1])
    first = soft.ids[::cache.views]  # view-0 rows: one per test sample
    if not (np.array_equal(first, test.ids) and (soft.view[::cache.views] == 0).all()):
        raise StaleCacheError(f"{cache.root}: the test ids in the cache differ from {test_path}; run `kd label` again")
    topk_idx = torch.tensor(soft.topk_idx[::cache.views], dtype=torch.long)
    topk_logit = torch.tensor(soft.topk_logit[::cache.views], dtype=torch.float32)
    lse_t1 = torch.tensor(soft.lse[1.0][::cache.views], dtype=torch.float32)
    teacher_top1 = topk_idx[:, 0].numpy()

    x = torch.from_numpy(np.array(test.x))  # (N, D); a writable copy of the read-only Arrow view
    logits = predict(model, x, test.input_shape, cfg.batch_size).double()  # (N, C)
    baseline_logits = predict(baseline, x, test.input_shape, cfg.batch_size)
    if logits.shape[1] != cache.num_classes or baseline_logits.shape[1] != cache.num_classes:
        raise InputError(f"{student_dir}: the student or its baseline outputs {logits.shape[1]}/"
                         f"{baseline_logits.shape[1]} classes, the cache {cache.num_classes}")
    pred = logits.argmax(1).numpy()
    baseline_pred = baseline_logits.argmax(1).numpy()
    confidence = torch.softmax(logits, 1).max(1).values.numpy()
    kl, kl_exact = kl_to_teacher(logits, topk_idx, topk_logit, lse_t1)

    teacher_accuracy = (cache.manifest.get("fidelity", {}).get("test", {}).get("teacher_accuracy"))
    if teacher_accuracy is None:
        teacher_accuracy = accuracy(teacher_top1, test.y)
    student_accuracy = accuracy(pred, test.y)
    teacher_config = cache.manifest["teacher"].get("config") or {}
    speed = _speed(model, teacher_config, x, test.input_shape, cfg)
    teacher_params = teacher_config.get("params")
    if teacher_params is None and speed["teacher_model"] is not None:
        teacher_params = count_params(speed["teacher_model"])

    result: dict[str, Any] = {
        "accuracy": student_accuracy,
        "baseline_accuracy": accuracy(baseline_pred, test.y),
        "teacher_accuracy": teacher_accuracy,
        "accuracy_retained": student_accuracy / teacher_accuracy if teacher_accuracy else None,
        "agreement": agreement(pred, teacher_top1),
        "kl_to_teacher": kl,
        "kl_exact": kl_exact,
        "ece": ece(confidence, pred == test.y, cfg.ece_bins),
        "params": count_params(model),
        "teacher_params": teacher_params,
        "size_bytes": (student_dir / "model.safetensors").stat().st_size,
        "latency_ms": speed["latency_ms"],
        "throughput": speed["throughput"],
        "speedup_vs_teacher": speed["speedup"],
        "teacher_throughput_source": speed["source"],
    }
    truth = _pseudo_label_accuracy(cache, prepared)
    if truth is not None:
        result["pseudo_label_accuracy"] = truth

    seeds = [{"seed": (config.get("student") or {}).get("seed"), "accuracy": student_accuracy,
              "baseline_accuracy": result["baseline_accuracy"]}]
    for seed, directory in extra_seeds:
        seeds.append(_seed_accuracies(directory, seed, cache, x, test, cfg, arch, arch_kwargs))
    result.update(seed_summary(seeds))

    student_class, support = per_class_accuracy(pred, test.y, cache.num_classes)
    baseline_class, _ = per_class_accuracy(baseline_pred, test.y, cache.num_classes)
    result["plots"] = {
        "seeds": seeds,
        "per_class": [{"class": c, "student": _finite(student_class[c]), "baseline": _finite(baseline_class[c]),
                       "support": int(support[c])} for c in range(cache.num_classes)],
        "confusion": confusion_matrix(pred, test.y, cache.num_classes).tolist(),
        "reliability": reliability(confidence, pred == test.y, cfg.ece_bins),
    }
    return result


def _seed_accuracies(directory: Path, seed: int, cache: Cache, x: torch.Tensor, test: Any, cfg: EvalConfig,
                     arch: str | None, arch_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Test accuracy of one further seed and of its own baseline twin (no timing)."""
    model, config = load_model(directory, arch=arch, arch_kwargs=arch_kwargs)
    baseline, _ = load_model(directory / "baseline", arch=arch, arch_kwargs=arch_kwargs)
    _check_student(directory, config, cache)
    recorded = (config.get("student") or {}).get("seed", seed)
    if recorded != seed:
        raise InputError(f"{directory / 'config.json'}: seed {recorded} differs from its directory's name {seed}")
    if list(config["input_shape"]) != list(test.input_shape):
        raise InputError(f"{directory / 'config.json'}: input_shape {config['input_shape']} differs from the "
                         f"test split's {test.input_shape}")
    out = {}
    for key, net in (("accuracy", model), ("baseline_accuracy", baseline)):
        logits = predict(net, x, test.input_shape, cfg.batch_size)
        if logits.shape[1] != cache.num_classes:
            raise InputError(f"{directory}: a model outputs {logits.shape[1]} classes, the cache {cache.num_classes}")
        out[key] = accuracy(logits.argmax(1).numpy(), test.y)
    return {"seed": seed, **out}


def _check_student(student_dir: Path, config: dict[str, Any], cache: Cache) -> None:
    if config.get("num_classes") != cache.num_classes:
        raise InputError(f"{student_dir / 'config.json'}: num_classes {config.get('num_classes')} differs from "
                         f"the cache's {cache.num_classes}")
    trained_on = config.get("teacher_fingerprint")
    teacher = cache.manifest["teacher"]["fingerprint"]
    # A student distilled through an assistant descends from the teacher: its lineage names both.
    if trained_on is not None and teacher not in config.get("lineage", [trained_on]):
        raise StaleCacheError(
            f"{student_dir}: trained from teacher {trained_on[:12]}, but the cache at {cache.root} holds teacher "
            f"{teacher[:12]}; run `kd distill {student_dir.name}` again")


def _speed(model: nn.Module, teacher_config: dict[str, Any], x: torch.Tensor, input_shape: list[int],
           cfg: EvalConfig) -> dict[str, Any]:
    """Student latency and throughput; the teacher's throughput measured alongside if it can be rebuilt."""
    batch = x[torch.arange(cfg.throughput_batch) % len(x)].reshape(cfg.throughput_batch, *input_shape)
    single = x[:1].reshape(1, *input_shape)
    teacher = teacher_twin(teacher_config)
    with torch_threads(cfg.threads):
        latency = latency_ms(model, single, cfg.latency_runs)
        measured = throughputs([model] + ([teacher] if teacher is not None else []), batch, cfg.throughput_runs)
    if teacher is not None:
        teacher_throughput, source = measured[1], "measured"
    elif teacher_config.get("throughput"):
        teacher_throughput, source = float(teacher_config["throughput"]), "manifest"
    else:
        teacher_throughput, source = None, "unavailable"
    return {"latency_ms": latency, "throughput": measured[0], "teacher_model": teacher, "source": source,
            "speedup": measured[0] / teacher_throughput if teacher_throughput else None}


def _pseudo_label_accuracy(cache: Cache, prepared: Path) -> float | None:
    """The teacher's argmax on the unlabeled split against its known labels, if they are known."""
    truth_path = prepared / images.TRUTH_FILE
    if not truth_path.is_file() or "unlabeled" not in cache.manifest.get("splits", {}):
        return None
    try:
        truth = pq.read_table(truth_path, columns=["id", "y"])
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise InputError(f"{truth_path}: not a readable truth file with columns id, y ({exc})") from None
    if truth["y"].null_count or truth["id"].null_count:
        raise InputError(f"{truth_path}: null values in id or y")
    soft = cache.soft_targets("unlabeled", [])
    try:
        return pseudo_label_accuracy(soft.topk_idx[::cache.views, 0], soft.ids[::cache.views],
                                     truth["id"].to_numpy(), truth["y"].to_numpy())
    except ValueError as exc:
        raise StaleCacheError(f"{truth_path} does not match the unlabeled split of the cache at {cache.root}: "
                              f"{exc}; run `kd label` again") from None


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def teacher_twin(config: dict[str, Any]) -> nn.Module | None:
    """The teacher's architecture with random weights, from the manifest's teacher config.

    None when the architecture is not built in (a `package.module:factory` named in a cache
    is never imported) or the config lacks what `build` needs.
    """
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build(config["arch"], config.get("arch_kwargs") or {}, config["input_shape"],
                          config["num_classes"], allow_import=False)
    except (KeyError, TypeError, ConfigError):
        return None
    return model.eval()


# --- the record ------------------------------------------------------------------------------


def metrics_record(result: dict[str, Any]) -> dict[str, Any]:
    """The flat, scalar part of `evaluate`'s result: what metrics.json holds."""
    return {key: result[key] for key in (*CONTRACT_KEYS, *PROVENANCE_KEYS, *SEED_KEYS) if key in result}


def plot_tables(plots: dict[str, Any]) -> dict[str, tuple[list[str], list[dict[str, Any]]]]:
    """`evaluate`'s plot data as the CSV tables of plots/: file name -> (columns, rows)."""
    records = [{"actual": a, "predicted": p}
               for a, row in enumerate(plots["confusion"]) for p, n in enumerate(row) for _ in range(n)]
    return {"per_class.csv": (["class", "student", "baseline", "support"], plots["per_class"]),
            "confusion.csv": (["actual", "predicted"], records),
            "reliability.csv": (["bin", "lower", "upper", "confidence", "accuracy", "count"], plots["reliability"]),
            "seeds.csv": (["seed", "accuracy", "baseline_accuracy"], plots["seeds"])}
