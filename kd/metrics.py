"""Student metrics on the test split: quality against labels and teacher, size and speed.

The metric functions are pure (numpy / torch in, floats and arrays out). `evaluate` puts
them together for one image student directory and returns every key of the contract's
`metrics.json` plus the plot data; `write_results` writes (`plot_tables` for an image student)

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

import csv
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from kd import losses
from kd.prepared import images as data
from kd.cache import Cache
from kd.config import EvalConfig
from kd.errors import ConfigError, InputError, StaleCacheError
from kd.files import replacing, write_json
from kd.models import build, count_params, load_model
from kd.training import predict

# The contract's keys of metrics.json (pseudo_label_accuracy only when the truth is known),
# then what says how two of them were obtained.
CONTRACT_KEYS = ("accuracy", "baseline_accuracy", "teacher_accuracy", "accuracy_retained", "agreement",
                 "kl_to_teacher", "ece", "params", "teacher_params", "size_bytes", "latency_ms", "throughput",
                 "speedup_vs_teacher", "pseudo_label_accuracy")
PROVENANCE_KEYS = ("kl_exact", "teacher_throughput_source")
# Over every seed of the student (the first one included): accuracies are fractions, gains points.
SEED_KEYS = ("seeds", "accuracy_mean", "accuracy_std", "baseline_accuracy_mean", "baseline_accuracy_std",
             "gain_points_mean", "gain_points_std")
SEEDS_DIR = "seeds"
# seeds/index.json: every trained seed -> its directory, relative to the student's ("." for the
# first). It also keeps seeds/ from being empty for one seed: DVC warns of an empty output.
SEEDS_INDEX = "index.json"
METRICS_FILE, PLOTS_DIR = "metrics.json", "plots"
LATENCY_WARMUP = 5  # untimed batch-1 passes before timing
THROUGHPUT_WARMUP = 1  # untimed full-batch passes per model before timing


# --- quality ----------------------------------------------------------------------------------


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    # pred, y: (N,) int; rows with y < 0 (no label) do not count
    keep = y >= 0
    if not keep.any():
        raise ValueError("accuracy: no labeled rows")
    return float((pred[keep] == y[keep]).mean())


def agreement(student_pred: np.ndarray, teacher_top1: np.ndarray) -> float:
    # student_pred, teacher_top1: (N,) int -> fraction of rows where the two argmaxes agree
    return float((student_pred == teacher_top1).mean())


def kl_to_teacher(student_logits: torch.Tensor, topk_idx: torch.Tensor, topk_logit: torch.Tensor,
                  lse_t1: torch.Tensor) -> tuple[float, bool]:
    # student_logits: (N, C); topk_idx, topk_logit: (N, k) cache rows; lse_t1: (N,) at T=1
    # -> (mean KL(teacher || student) at T=1, exact). With k == C this is the exact KL; with
    # k < C it is the KL of the coarse-grained distributions (top-k classes + one tail
    # bucket), which by the data-processing inequality is a lower bound of the exact KL.
    # An id of -1 (a student of another tokenizer: no token of the same text) counts in the tail.
    kl = losses.mapped_soft_target_loss_per_row(student_logits.double(), topk_idx, topk_logit, lse_t1, 1.0,
                                                tail="bucket")
    return float(kl.mean()), topk_idx.shape[1] == student_logits.shape[1]


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict[str, Any]]:
    # confidence: (N,) max softmax probability; correct: (N,) bool -> one dict per bin.
    # Equal-width bins over [0, 1], bin m holding confidences in (m/M, (m+1)/M] (Guo et al.
    # 2017); a confidence of exactly 0 goes to the first bin. Empty bins: confidence and
    # accuracy are None.
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges[1:], confidence, side="left"), 0, bins - 1)
    table = []
    for m in range(bins):
        inside = index == m
        count = int(inside.sum())
        table.append({
            "bin": m, "lower": float(edges[m]), "upper": float(edges[m + 1]),
            "confidence": float(confidence[inside].mean()) if count else None,
            "accuracy": float(correct[inside].mean()) if count else None,
            "count": count,
        })
    return table


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    # Expected calibration error: sum over bins of |B_m| / N * |accuracy(B_m) - confidence(B_m)|
    n = len(confidence)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in reliability(confidence, correct, bins) if b["count"]))


def per_class_accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    # pred, y: (N,) -> (accuracy per class (C,) with NaN where a class has no sample, support (C,))
    keep = y >= 0
    support = np.bincount(y[keep], minlength=num_classes)
    hits = np.bincount(y[keep], weights=(pred[keep] == y[keep]).astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / np.maximum(support, 1), np.nan), support


def confusion_matrix(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    # pred, y: (N,) -> (C, C) int64 counts, rows = true class, columns = predicted class
    keep = y >= 0
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y[keep], pred[keep]), 1)
    return matrix


def mean_std(values: list[float]) -> tuple[float, float]:
    # -> (mean, sample standard deviation with ddof = 1); the std of a single value is 0.0
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        raise ValueError("mean_std: no values")
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


def seed_summary(rows: list[dict[str, Any]], key: str = "accuracy", change: str = "gain_points",
                 paired: Callable[[float, float], float] = lambda s, b: 100.0 * (s - b)) -> dict[str, Any]:
    # rows: one {"seed", KEY, "baseline_KEY"} per seed -> seeds, KEY_mean/_std, baseline_KEY_mean/_std
    # and CHANGE_mean/_std (the SEED_KEYS for the defaults). The change of a seed is over its own
    # twin (same seed), so the std is that of paired differences.
    summary: dict[str, Any] = {"seeds": len(rows)}
    for name, values in ((key, [r[key] for r in rows]), (f"baseline_{key}", [r[f"baseline_{key}"] for r in rows]),
                         (change, [paired(r[key], r[f"baseline_{key}"]) for r in rows])):
        summary[f"{name}_mean"], summary[f"{name}_std"] = mean_std(values)
    return summary


def pseudo_label_accuracy(teacher_top1: np.ndarray, ids: np.ndarray, truth_ids: np.ndarray,
                          truth_y: np.ndarray) -> float:
    # teacher_top1, ids: (N,) the teacher's argmax per unlabeled sample (view-0 rows);
    # truth_ids, truth_y: (M,) the known labels. Matched by id; every id needs a truth.
    order = np.argsort(truth_ids, kind="stable")
    sorted_ids = truth_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
    if not found.all():
        missing = ids[~found]
        raise ValueError(f"{len(missing)} ids have no known label (e.g. {missing[:5].tolist()})")
    if not len(ids):
        raise ValueError("no unlabeled samples")
    return float((teacher_top1 == truth_y[order][pos]).mean())


# --- speed ------------------------------------------------------------------------------------


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_ms(model: nn.Module, x: torch.Tensor, runs: int, warmup: int = LATENCY_WARMUP) -> float:
    # x: (1, *input_shape) -> median wall time of one forward pass, in milliseconds
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def throughputs(models: list[nn.Module], x: torch.Tensor | list[torch.Tensor], runs: int,
                warmup: int = THROUGHPUT_WARMUP) -> list[float]:
    # x: (B, *input_shape), or one such batch per model (the same samples in each model's own
    # form) -> samples/s of each model, from the median time of `runs` passes.
    # The models take turns within each run, so a clock or load change hits them alike.
    inputs = x if isinstance(x, (list, tuple)) else [x] * len(models)
    for model in models:
        model.eval()
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model, batch in zip(models, inputs):
            for _ in range(warmup):
                model(batch)
        for _ in range(runs):
            for model, batch, timed in zip(models, inputs, times):
                start = time.perf_counter()
                model(batch)
                timed.append(time.perf_counter() - start)
    return [len(batch) / statistics.median(timed) for batch, timed in zip(inputs, times)]


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


# --- one student ------------------------------------------------------------------------------


def check_config(cfg: EvalConfig) -> None:
    for key in ("batch_size", "ece_bins", "latency_runs", "throughput_batch", "throughput_runs", "threads"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"eval.{key}: {value!r} must be an integer >= 1")


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
    test = data.read_split(test_path)
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
    truth_path = prepared / data.TRUTH_FILE
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


# --- writing ----------------------------------------------------------------------------------


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
