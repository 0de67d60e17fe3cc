"""Image classification: a student maps (B, *input_shape) float32 to (B, C) logits.

Inputs: one cache row per (sample, view); view 0 is the input as is, views 1..V augmented
copies regenerated from (id, view, seed). A student is built from `image_models.ARCHITECTURES`
(or `package.module:factory`) and trains on the transfer splits (`image_rows` under
`loader.transfer_set`: in memory, or streamed above the memory budget); its baseline twin on
the labeled split's true labels (`baseline_set`). Saved as `model.safetensors` + `config.json`;
scored by test accuracy (`image_eval.evaluate`). Its teacher is trained here (`train_teacher`:
the same loop, hard labels, fresh augmented views each epoch) and loaded from the same two files.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd import augment, features, loader
from kd.cache import Cache, Teacher
from kd.cache.batch import Batch
from kd.config import EvalConfig, LabelConfig, StudentConfig, TeacherConfig, as_dict
from kd.errors import ConfigError, InputError
from kd.files import write_json
from kd.loader import SampleSet
from kd.methods import chosen, supported
from kd.prepared import data_fingerprint, images
from kd.speed import count_params, throughputs, torch_threads
from kd.tasks import image_eval
from kd.tasks.image_models import build as build_model
from kd.tasks.image_models import fingerprint, is_hf_classifier, load_hf_classifier, load_model, save_model
from kd.training import fit, hard_label_loss, predict

NAME = "image"
TWIN_LOSS = "hard-label"  # what the baseline twin learns from, for messages


# Cache columns between `view` and the soft targets: none, a row is (sample, view).
ROW_COLUMNS: tuple[str, ...] = ()


class Inputs:
    """What the teacher sees at label time and which rows it becomes: `per_sample` = 1 + views."""

    row_columns = ROW_COLUMNS

    def __init__(self, prepared: Path, splits: list[str], cfg: LabelConfig):
        self.infos = {s: images.split_info(prepared / f"{s}.parquet") for s in splits}
        self.input_shape = self.infos["labeled"]["input_shape"]
        self.per_sample = cfg.views + 1
        self.cfg = cfg
        self.recipe = augment.from_config(cfg, cfg.view_shift)
        augment.check_shape(self.recipe, self.input_shape, "label")

    def samples(self, split: str) -> int:
        return self.infos[split]["rows"]

    def row_counts(self, split: str) -> np.ndarray:
        """Cache rows of each sample: the same for all."""
        return np.full(self.samples(split), self.per_sample, np.int64)

    def check_teacher(self, teacher: Teacher, prepared: Path) -> None:
        """A language model cannot label images."""
        if "tokenizer" in teacher.config:
            raise InputError(f"{teacher.directory}: a language model ({teacher.config['arch']}); the images in "
                             f"{prepared} need an image classifier")

    def header(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape}

    def teacher_scores(self, model: nn.Module) -> dict[str, float]:
        return {}  # the teacher's accuracy is in the fidelity statistics

    def probe(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def feature_spec(self, layer: str, mode: str, captured: Any) -> dict[str, Any]:
        """The manifest's spec of one cached layer, from its probe activation."""
        try:
            shape = list(features.reduce(captured, mode).shape[1:])
        except ConfigError as exc:
            raise ConfigError(f"label.features.{layer}: {exc}") from None
        return {"name": layer, "mode": mode, "shape": shape, "dtype": "float16",
                "source_shape": list(captured.shape[1:])}

    def read(self, source: Path, first: int, last: int) -> images.Split:
        rows = images.read_rows(source, first, last)
        if not np.isfinite(rows.x).all():
            bad = rows.ids[~np.isfinite(rows.x).all(1)][:5].tolist()
            raise InputError(f"{source}: NaN or Inf in inputs (ids {bad})")
        return rows

    def batch(self, model: nn.Module, rows: images.Split, start: int, stop: int,
              specs: dict[str, dict]) -> Batch:
        views, cfg = self.per_sample, self.cfg
        ids = np.repeat(rows.ids[start:stop], views)
        view = np.tile(np.arange(views, dtype=np.int32), stop - start)
        x = torch.tensor(rows.x[start:stop]).repeat_interleave(views, dim=0)
        x = augment.apply_views(x, ids, view, self.input_shape, cfg.view_seed, self.recipe)
        with torch.no_grad(), features.tap(model, list(specs)) as captured:
            logits = model(x.reshape(len(x), *self.input_shape)).float()
            feats = {name: features.reduce(captured[name], s["mode"]).to(torch.float16).numpy()
                     for name, s in specs.items()}
        return Batch(ids, view, None, logits, feats, np.repeat(rows.y[start:stop], views), view == 0)


# --- rows -------------------------------------------------------------------------------------


def image_set(x: torch.Tensor, ids: np.ndarray, input_shape: list[int], targets: dict[str, torch.Tensor],
              views: int = 1, view_seed: int = 0, recipe: augment.Recipe | None = None) -> SampleSet:
    """Images (N, D) float32 with their rows; the input of (sample, view v) is regenerated from
    (id, v, seed) by `augment.apply_views` with `recipe` (None: view 0, the image as is, only)."""
    recipe = recipe or augment.shift(0)

    def model_input(inputs: dict[str, torch.Tensor], ids: np.ndarray, view: torch.Tensor) -> torch.Tensor:
        shown = augment.apply_views(inputs["x"], ids, view.numpy(), input_shape, view_seed, recipe)
        return shown.view(len(shown), *input_shape)

    return SampleSet({"x": x}, ids, targets, model_input, views=views)


def image_rows(cache: Cache, prepared: Path, cfg: StudentConfig, split: str, row_offset: int,
               parts: list[int] | None = None) -> SampleSet:
    """The student's rows of one image split (or of some of its parts), in memory; its views
    are the cache's (`views.seed` and `views.recipe` of the manifest)."""
    source = prepared / f"{split}.parquet"
    samples = images.read_rows(source, *loader.sample_range(cache, split, parts))
    rows = loader.read_rows(cache, cfg, split, source, samples.ids, np.repeat(samples.y, cache.views),
                            parts=parts, row_offset=row_offset)
    return image_set(torch.tensor(samples.x), np.array(samples.ids), samples.input_shape, rows.targets(cfg),
                     cache.views, cache.manifest["views"]["seed"], cache.manifest["views"]["recipe"])


def baseline_set(prepared: Path, view_seed: int = 0, recipe: augment.Recipe | None = None) -> SampleSet:
    """The labeled images with their true labels: what a baseline twin (and the teacher, with
    fresh views of `recipe`) trains on."""
    rows = images.read_split(prepared / "labeled.parquet")
    return image_set(torch.tensor(rows.x), np.array(rows.ids), rows.input_shape, {"label": torch.tensor(rows.y)},
                     view_seed=view_seed, recipe=recipe)


# --- training ---------------------------------------------------------------------------------


def check(cfg: StudentConfig, cache: Cache, prepared: Path) -> None:
    """What an image student cannot do, said up front."""
    if cfg.init is not None:
        raise ConfigError(f"{cfg.where}.init: starting from the teacher's layers or a pretrained directory is for "
                          "language-model students; an image student starts at random")
    if cfg.tokenizer is not None or cfg.loss.mapped is not None or cfg.loss.uld is not None:
        raise ConfigError(f"{cfg.where}: tokenizer, loss.mapped and loss.uld are for language-model students "
                          "with their own tokenizer; an image student reads the teacher's classes")
    if cfg.parallel.strategy == "fsdp":
        raise ConfigError(f"{cfg.where}.parallel.strategy: fsdp shards language-model students block by block; "
                          "an image student trains with ddp under torchrun")
    text_only(cfg, cfg.where)
    extra = [name for name in chosen(cfg.loss) if name not in supported(NAME)]
    if extra:
        raise ConfigError(f"{cfg.where}.loss: {', '.join(extra)} not supported for image students "
                          f"({', '.join(supported(NAME))})")


def rows(cache: Cache, prepared: Path, cfg: StudentConfig, memory_mb: float) -> Any:
    """The transfer splits with their cache rows: in memory if they fit `memory_mb`, else streamed."""
    return loader.transfer_set(cache, cfg, functools.partial(image_rows, cache, prepared, cfg),
                               4 * math.prod(cache.manifest["input_shape"]), memory_mb)


def twin_rows(cache: Cache, prepared: Path, cfg: StudentConfig, transfer: Any) -> Any:
    """The labeled split with its true labels: what a baseline twin trains on."""
    return baseline_set(prepared)


def twin_decided_by(cfg: StudentConfig, cache: Cache, prepared: Path) -> dict[str, Any]:
    """What decides a baseline twin besides its budget and seed: the labeled data."""
    return {"data": data_fingerprint(prepared / "labeled.parquet")}


def build(cfg: StudentConfig, cache: Cache, prepared: Path) -> nn.Module:
    """A fresh student (seed torch first)."""
    return build_model(cfg.arch, cfg.arch_kwargs, cache.manifest["input_shape"], cache.num_classes)


def student_shapes(model: nn.Module, cfg: StudentConfig, layers: list[str], cache: Cache) -> dict[str, list[int]]:
    return probe_shapes(model, cache.manifest["input_shape"], layers)


def probe_shapes(model: nn.Module, input_shape: list[int], layers: list[str]) -> dict[str, list[int]]:
    """Per-sample output shapes of named student layers, from one forward pass in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), features.tap(model, layers) as captured:
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return {layer: list(captured[layer].shape[1:]) for layer in layers}


def save(directory: Path, model: nn.Module, cfg: StudentConfig, cache: Cache, record: dict[str, Any],
         prepared: Path) -> None:
    """model.safetensors + config.json: the architecture, shapes and `record`."""
    save_model(directory, model, {"arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs,
                                  "input_shape": cache.manifest["input_shape"], "num_classes": cache.num_classes,
                                  **record})


def load(directory: Path, spec: StudentConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A saved student; a `package.module:factory` architecture is named by params (`spec`) only."""
    custom = spec is not None and ":" in spec.arch
    return load_model(directory, arch=spec.arch if custom else None, arch_kwargs=spec.arch_kwargs if custom else None)


# --- evaluation -------------------------------------------------------------------------------


def evaluate(student_dir: Path, cache: Cache, prepared: Path, cfg: EvalConfig, spec: StudentConfig
             ) -> tuple[dict[str, Any], dict[str, tuple[list[str], list[dict[str, Any]]]]]:
    """(metrics.json's record, plot tables): `image_eval.evaluate` of the student and its twin."""
    custom = ":" in spec.arch  # a user's architecture is named by params, never by the checkpoint
    result = image_eval.evaluate(student_dir, cache, prepared, cfg, arch=spec.arch if custom else None,
                                 arch_kwargs=spec.arch_kwargs if custom else None)
    return image_eval.metrics_record(result), image_eval.plot_tables(result["plots"])


def check_rows(path: str, table: Any, manifest: dict[str, Any], views: int) -> list[str]:
    """`kd cache verify`: each sample's rows are its views 0..V-1, in order."""
    from kd.cache.verify import in_order

    return in_order(path, table, "view", views)


def rows_description(summary: dict[str, Any]) -> str:
    """`kd cache info`: what one cache row is."""
    return f"one per sample and view: the input as is, then {summary['views']['count']} augmented view(s)"


def summary(name: str, m: dict[str, Any]) -> str:
    kl = "exact" if m["kl_exact"] else "top-k bucket, a lower bound"
    speed = (f"{m['speedup_vs_teacher']:.1f}x the teacher's throughput ({m['teacher_throughput_source']})"
             if m["speedup_vs_teacher"] is not None else "teacher throughput unknown")
    pseudo = f", teacher pseudo-labels {m['pseudo_label_accuracy']:.4f}" if "pseudo_label_accuracy" in m else ""
    seeds = (f"; over {m['seeds']} seeds: accuracy {m['accuracy_mean']:.4f} +- {m['accuracy_std']:.4f}, "
             f"{m['gain_points_mean']:+.1f} +- {m['gain_points_std']:.1f} points over the baseline twins")
    return (f"student {name}: accuracy {m['accuracy']:.4f} (baseline {m['baseline_accuracy']:.4f}, "
            f"teacher {m['teacher_accuracy']:.4f}), agreement {m['agreement']:.4f}, "
            f"KL {m['kl_to_teacher']:.4f} ({kl}), ECE {m['ece']:.4f}, {m['params']:,} params, "
            f"{m['latency_ms']:.3f} ms at batch 1, {m['throughput']:,.0f} samples/s, {speed}{pseudo}{seeds}")


# --- the teacher ------------------------------------------------------------------------------


def text_only(cfg: StudentConfig | TeacherConfig, where: str) -> None:
    """`precision` and `gradient_checkpointing` are for language models; refused on images."""
    if cfg.precision != "fp32":
        raise ConfigError(f"{where}.precision: {cfg.precision!r} is for language models so far; an image model "
                          "trains in fp32")
    if cfg.gradient_checkpointing:
        raise ConfigError(f"{where}.gradient_checkpointing: true is for language models (Hugging Face's); an "
                          "image model keeps its activations")


def train_teacher(cfg: TeacherConfig, prepared: Path, out: Path, *, progress: bool = True) -> str:
    """`kd teacher` on images: train it and write it into `out`; its score."""
    text_only(cfg, "teacher")
    model, config, scores = fit_teacher(cfg, prepared, progress=progress)
    save_model(out, model, config)
    write_json(out / "metrics.json", scores)
    return f"test accuracy {scores['test_accuracy']:.4f}"


def fit_teacher(cfg: TeacherConfig, prepared: Path, *, progress: bool = True
                ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The teacher trained on the labeled split (hard labels, random-shift or crop-and-flip
    augmentation drawn fresh each epoch, the same loop as every student): (model, config to
    save beside the weights, metrics)."""
    # the labeled split with its labels, as a baseline twin sees it, plus the augmentation
    recipe = augment.from_config(cfg, cfg.shift)
    dataset = baseline_set(prepared, view_seed=cfg.seed, recipe=recipe)
    augmented = cfg.shift > 0 or cfg.view_recipe != "shift"
    test = images.read_split(prepared / "test.parquet")
    augment.check_shape(recipe, test.input_shape, "teacher")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, cfg.arch_kwargs, test.input_shape, test.num_classes)
    log = fit(model, dataset, {"hard": (1.0, hard_label_loss)}, epochs=cfg.epochs, batch_size=cfg.batch_size,
              lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed, views="fresh" if augmented else "none",
              desc="teacher", progress=progress)
    logits = predict(model, torch.tensor(test.x), test.input_shape)
    accuracy = float((logits.argmax(1).numpy() == test.y).mean())
    config = {"arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "input_shape": test.input_shape,
              "num_classes": test.num_classes, "training": as_dict(cfg)}
    metrics = {"test_accuracy": accuracy, "train_loss": log[-1]["total"], "epochs": len(log)}
    return model, config, metrics


def load_teacher(directory: Path, arch: str | None, arch_kwargs: dict | None, *, dtype: str = "auto",
                 device: str = "auto") -> Teacher:
    """Our image teacher (model.safetensors + our config.json; `arch` names a user's
    package.module:factory) or a Hugging Face image classifier, with its fingerprint.

    What `kd eval` needs to compare every student with it goes into the config the manifest
    records: the parameter count, measured when the config lacks it, and for a
    package.module:factory teacher (which `kd eval` never imports, so it cannot time a twin)
    its throughput, measured here as `kd eval` measures by default. It runs in float32 on the
    CPU (`label.dtype`/`label.device` auto); other placements are refused."""
    if dtype not in ("auto", "float32"):
        raise ConfigError(f"label.dtype: {dtype}; an image teacher runs in float32 so far (auto or float32)")
    if device == "cuda":
        raise ConfigError("label.device: cuda; an image teacher runs on the CPU so far (auto or cpu)")
    if is_hf_classifier(directory):
        model, config = load_hf_classifier(directory)
    else:
        model, config = load_model(directory, arch=arch, arch_kwargs=arch_kwargs)
        config.setdefault("params", count_params(model))
        if ":" in (arch or config["arch"]) and not config.get("throughput"):
            timing = EvalConfig()
            batch = torch.zeros(timing.throughput_batch, *config["input_shape"])
            with torch_threads(timing.threads):
                (config["throughput"],) = throughputs([model], batch, timing.throughput_runs)
            config["throughput_measured_by"] = (f"kd label: batch {timing.throughput_batch}, {timing.threads} "
                                                f"thread(s), median of {timing.throughput_runs} runs")
    return Teacher(model, fingerprint(directory), config, directory)
