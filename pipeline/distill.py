"""Training a student from the cache and the prepared inputs only (never the teacher).

`student_terms` composes a student's loss from its config through one explicit dict,
`TERMS`; `loader.transfer_set` lines the cached rows up with the prepared inputs; `train_student`
trains the student and its baseline twin (same architecture, seed and budget, hard labels
of the labeled split only). Twins are keyed by everything that decides them and stored
once under `baselines/`, so students that share a twin share its training.
`train_assistant` is progressive distillation's middle step: a student of the teacher that
then labels the data into a cache of its own, for students that name it as `assistant`.

Under torchrun (`pipeline.parallel`) every rank trains every model, student seeds and twins
alike, so that their collectives line up; rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import features, losses, parallel
from pipeline import prepared as data
from pipeline.cache import Cache, Teacher, label
from pipeline.config import (AttentionTerm, CosineTerm, HardTerm, HintTerm, LabelConfig, RKDTerm, SoftTerm,
                             StudentConfig, as_dict)
from pipeline.errors import ConfigError, MissingInputError
from pipeline.loader import baseline_set, needed_temperatures, transfer_set
from pipeline.files import read_json, staging_dir, swap_into_place, write_json
from pipeline.models import build, fingerprint, load_model, save_model
from pipeline.training import Dataset, Term, fit, hard_label_loss, write_log


@dataclass
class Built:
    """What one loss term adds to training: named terms, student layers to tap, and modules
    (regressors, projections) trained with the student and dropped afterwards."""

    terms: dict[str, tuple[float, Term]]
    taps: list[str] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)


@dataclass
class Shapes:
    """Per-sample shapes the builders need: student layers (probed) and cached teacher layers."""

    student: dict[str, list[int]]
    teacher: dict[str, dict[str, Any]]  # layer -> manifest feature spec (mode, shape, source_shape)


def soft_term(cfg: SoftTerm, shapes: Shapes) -> Built:
    def term(batch, out):
        return losses.topk_soft_target_loss(out["logits"], batch["topk_idx"], batch["topk_logit"],
                                            batch["lse"], cfg.temperature, tail=cfg.tail)
    return Built({"soft": (cfg.weight, term)})


def hard_term(cfg: HardTerm, shapes: Shapes) -> Built:
    return Built({"hard": (cfg.weight, hard_label_loss)})


def hint_term(cfg: HintTerm, shapes: Shapes) -> Built:
    # student feature (B, Cs, *S) -> regressor -> (B, Ct, *S'), compared with the cached (B, Ct, *S')
    target = shapes.teacher[cfg.teacher_layer]["shape"]
    source = shapes.student[cfg.student_layer]
    regressor = _regressor(source, target)
    key = f"teacher.{cfg.teacher_layer}"

    def term(batch, out):
        feature = _pool_to(out[cfg.student_layer], target[1:]) if len(target) > 1 else out[cfg.student_layer]
        return losses.hint_loss(regressor(feature), batch[key].float())
    return Built({"hint": (cfg.weight, term)}, taps=[cfg.student_layer], modules=[regressor])


def attention_term(cfg: AttentionTerm, shapes: Shapes) -> Built:
    pairs = []
    for teacher_layer, student_layer in cfg.pairs:
        spec, source = shapes.teacher[teacher_layer], shapes.student[student_layer]
        if len(source) < 2:
            raise ConfigError(f"loss.attention: student layer {student_layer!r} has shape {source}, not a spatial map")
        teacher_spatial = spec["source_shape"][1:]
        if spec["mode"] == "attention" and any(s < t for s, t in zip(source[1:], teacher_spatial)):
            raise ConfigError(
                f"loss.attention: student layer {student_layer!r} ({source[1:]}) is smaller than teacher layer "
                f"{teacher_layer!r} ({teacher_spatial}), whose cached map cannot be pooled exactly; "
                f"set label.features.{teacher_layer}: full")
        pairs.append((f"teacher.{teacher_layer}", student_layer, spec["mode"], teacher_spatial))

    def term(batch, out):
        total = 0.0
        for key, student_layer, mode, spatial in pairs:
            feature, teacher = out[student_layer], batch[key].float()
            if mode == "attention":  # the cached map (B, H*W), made with p = 2
                student_map = losses.attention_map(_pool_to(feature, spatial), cfg.p)
                total = total + losses.attention_map_loss(student_map, teacher)
            else:
                total = total + losses.attention_transfer_loss(feature, teacher, cfg.p)
        return total
    return Built({"attention": (cfg.weight, term)}, taps=[s for _, s, _, _ in pairs])


def rkd_term(cfg: RKDTerm, shapes: Shapes) -> Built:
    key = f"teacher.{cfg.teacher_layer}"

    def embeddings(batch, out):
        return _vector(out[cfg.student_layer]), _vector(batch[key].float())

    terms = {}
    if cfg.distance:
        terms["rkd_distance"] = (cfg.distance, lambda batch, out: losses.rkd_distance_loss(*embeddings(batch, out)))
    if cfg.angle:
        terms["rkd_angle"] = (cfg.angle, lambda batch, out: losses.rkd_angle_loss(*embeddings(batch, out)))
    return Built(terms, taps=[cfg.student_layer])


def cosine_term(cfg: CosineTerm, shapes: Shapes) -> Built:
    width_s = shapes.student[cfg.student_layer][0]
    width_t = shapes.teacher[cfg.teacher_layer]["shape"][0]
    projection = nn.Linear(width_s, width_t) if width_s != width_t else nn.Identity()
    key = f"teacher.{cfg.teacher_layer}"

    def term(batch, out):
        return losses.cosine_embedding_loss(projection(_vector(out[cfg.student_layer])), _vector(batch[key].float()))
    return Built({"cosine": (cfg.weight, term)}, taps=[cfg.student_layer], modules=[projection])


# Loss-term name -> builder. The one place a config name meets code.
TERMS: dict[str, Callable[[Any, Shapes], Built]] = {
    "soft": soft_term, "hard": hard_term, "hint": hint_term,
    "attention": attention_term, "rkd": rkd_term, "cosine": cosine_term,
}


def student_terms(cfg: StudentConfig, shapes: Shapes) -> Built:
    """All of a student's terms, taps and trainable helper modules, composed from its config."""
    built = Built({})
    for name, builder in TERMS.items():
        term_cfg = getattr(cfg.loss, name)
        if term_cfg is None:
            continue
        try:
            part = builder(term_cfg, shapes)
        except ConfigError as exc:
            raise ConfigError(f"{cfg.where}.{exc}") from None
        built.terms.update(part.terms)
        built.taps += [t for t in part.taps if t not in built.taps]
        built.modules += part.modules
    return built


def probe_shapes(model: nn.Module, input_shape: list[int], layers: list[str]) -> dict[str, list[int]]:
    """Per-sample output shapes of named student layers, from one forward pass in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), features.tap(model, layers) as captured:
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return {layer: list(captured[layer].shape[1:]) for layer in layers}


def student_layers(cfg: StudentConfig) -> list[str]:
    loss = cfg.loss
    layers = [t.student_layer for t in (loss.hint, loss.rkd, loss.cosine) if t is not None]
    layers += [pair[1] for pair in loss.attention.pairs] if loss.attention is not None else []
    return list(dict.fromkeys(layers))


def _regressor(source: list[int], target: list[int]) -> nn.Module:
    """FitNets' regressor: a 1x1 convolution for maps, a linear layer for vectors."""
    if len(source) != len(target):
        raise ConfigError(f"loss.hint: student shape {source} and teacher shape {target} differ in rank")
    if len(source) == 1:
        return nn.Linear(source[0], target[0])
    conv = {2: nn.Conv1d, 3: nn.Conv2d}[len(source)]
    return conv(source[0], target[0], kernel_size=1)


def _pool_to(feature: torch.Tensor, spatial: list[int]) -> torch.Tensor:
    # feature: (B, C, *S) -> (B, C, *spatial) by adaptive average pooling (a no-op when equal)
    if list(feature.shape[2:]) == list(spatial):
        return feature
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}[len(spatial)]
    return pool(feature, spatial)


def _vector(feature: torch.Tensor) -> torch.Tensor:
    # (B, C, *S) -> (B, C) by global average pooling; (B, D) unchanged
    return feature.flatten(2).mean(2) if feature.dim() > 2 else feature


def twin_key(cfg: StudentConfig, prepared: Path) -> str:
    """What decides a baseline twin: architecture, seed, budget and the labeled data."""
    decided_by = {k: getattr(cfg, k) for k in ("arch", "arch_kwargs", "epochs", "batch_size", "lr",
                                                "weight_decay", "seed")}
    decided_by["data"] = data.data_fingerprint(prepared / "labeled.parquet")
    decided_by["torch"] = torch.__version__.split("+")[0]
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:16]


def train_model(cfg: StudentConfig, dataset: Dataset, input_shape: list[int], num_classes: int,
                views: str, desc: str, progress: bool, teacher_specs: dict[str, dict] | None = None,
                checkpoint: Path | None = None):
    """Build `cfg.arch` with `cfg.seed` and train it on `dataset` with the student's terms
    (`teacher_specs` given) or, for a baseline twin, on hard labels alone. With `checkpoint`,
    training resumes from it and it is removed once training is done."""
    torch.manual_seed(cfg.seed)  # same seed -> same initial weights for the student and its twin
    model = build(cfg.arch, cfg.arch_kwargs, input_shape, num_classes)
    if teacher_specs is None:
        built = Built({"hard": (1.0, hard_label_loss)})
    else:
        shapes = Shapes(probe_shapes(model, input_shape, student_layers(cfg)), teacher_specs)
        built = student_terms(cfg, shapes)
    for module in built.modules:
        module.train()
    log = fit(model, dataset, built.terms, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, views=views, taps=built.taps,
              extra_modules=built.modules, checkpoint=checkpoint, desc=desc, progress=progress)
    return model, log


def train_student(cfg: StudentConfig, cache: Cache, prepared: Path, out: Path, baselines: Path,
                  *, memory_mb: float = 2048, checkpoints: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train student `cfg.name` (every seed of `cfg.repeats`) and its twins into `out`.

    The first seed is written at the top of `out`; further seeds under `out/seeds/<seed>/`.
    With `checkpoints`, each model's training state is saved there every epoch (keyed by
    everything that decides the model), so an interrupted run resumes. Returns a summary.
    """
    who = f"student {cfg.name!r}"
    if cfg.init is not None:
        raise ConfigError(f"{cfg.where}.init: starting from the teacher's layers is for masked-LM students "
                          "(the cache of a BERT teacher); an image student starts at random")
    layers = cfg.loss.teacher_layers(cfg.where)
    rebuild = "`kd label`" if cfg.assistant is None else "`kd label`, then `kd assistants`"
    cache.require(temperatures=needed_temperatures(cfg), features=layers, views=cfg.views, who=who, rebuild=rebuild)
    cache.check(prepared, cfg.transfer, list(layers))
    dataset = transfer_set(cache, prepared, cfg, memory_mb)
    teacher_specs = {layer: cache.feature_spec(layer) for layer in layers}
    main = parallel.is_main()
    staging = staging_dir(out) if main else None
    if main:
        (staging / "seeds").mkdir()
    summary: dict[str, Any] = {"seeds": [], "twins": []}
    for repeat in range(cfg.repeats):
        seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + repeat)
        checkpoint = _checkpoint(checkpoints, f"{cfg.name}-seed{seed_cfg.seed}",
                                 {"student": as_dict(seed_cfg), "cache": cache.manifest.get("key"),
                                  "teacher": cache.manifest["teacher"]["fingerprint"]})
        model, log = train_model(seed_cfg, dataset, cache.manifest["input_shape"], cache.num_classes,
                                 "cached" if cfg.views else "none", f"distill {cfg.name} seed {seed_cfg.seed}",
                                 progress, teacher_specs, checkpoint)
        record = _record(seed_cfg, cache)
        twin, reused = _twin(seed_cfg, cache, prepared, baselines, record, progress, checkpoints)
        if main:
            target = staging if repeat == 0 else staging / "seeds" / str(seed_cfg.seed)
            save_model(target, model, record)
            write_log(target / "train_log.csv", log)
            shutil.copytree(twin, target / "baseline")
        summary["seeds"].append(seed_cfg.seed)
        summary["twins"].append((twin.name, reused))
        summary.setdefault("final", log[-1])
        summary.setdefault("epochs", len(log))
    if main:
        swap_into_place(staging, out)
        for repeat in range(cfg.repeats):
            _done(checkpoints, f"{cfg.name}-seed{cfg.seed + repeat}")
    parallel.barrier()  # every rank returns once the student is in place
    return summary


def _record(cfg: StudentConfig, cache: Cache) -> dict[str, Any]:
    """What a student checkpoint carries: its config and the teachers it descends from."""
    teacher = cache.manifest["teacher"]
    lineage = [teacher["fingerprint"], *teacher["config"].get("lineage", [])]
    return {"arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "input_shape": cache.manifest["input_shape"],
            "num_classes": cache.num_classes, "student": as_dict(cfg), "teacher_fingerprint": teacher["fingerprint"],
            "lineage": lineage, "cache": str(cache.root)}


def _twin(cfg: StudentConfig, cache: Cache, prepared: Path, baselines: Path, record: dict[str, Any],
          progress: bool, checkpoints: Path | None = None) -> tuple[Path, bool]:
    """The baseline twin of `cfg` from the shared store, trained first if it is not there."""
    twin_dir = baselines / twin_key(cfg, prepared)

    def stored() -> bool:
        return (twin_dir / "model.safetensors").is_file() and (twin_dir / "train_log.csv").is_file()

    if parallel.from_main(stored):  # rank 0 writes the store and decides: every rank trains the twin or none
        return twin_dir, True
    checkpoint = None if checkpoints is None else Path(checkpoints) / f"twin-{twin_dir.name}.pt"
    twin, log = train_model(cfg, baseline_set(prepared), cache.manifest["input_shape"], cache.num_classes,
                            "none", f"baseline {cfg.name} seed {cfg.seed}", progress, checkpoint=checkpoint)
    if parallel.is_main():
        tmp = staging_dir(twin_dir)
        save_model(tmp, twin, {**record, "student": None, "baseline_of": as_dict(cfg), "twin_key": twin_dir.name})
        write_log(tmp / "train_log.csv", log)
        swap_into_place(tmp, twin_dir)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
    return twin_dir, False


def _checkpoint(checkpoints: Path | None, name: str, decided_by: dict[str, Any]) -> Path | None:
    """The checkpoint file of one model: named by the student and seed, keyed by what decides it
    (a checkpoint of another config is never resumed; older ones of the same name are removed)."""
    if checkpoints is None:
        return None
    key = hashlib.sha256(json.dumps(decided_by, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(checkpoints) / f"{name}-{key}.pt"
    if parallel.is_main():
        for old in Path(checkpoints).glob(f"{name}-*.pt"):
            if old != path:
                old.unlink()
    return path


def _done(checkpoints: Path | None, name: str) -> None:
    if checkpoints is not None and parallel.is_main():
        for path in Path(checkpoints).glob(f"{name}-*.pt"):
            path.unlink()


def assistant_cache(assistants: Path, name: str) -> Path:
    """Where assistant `name`'s own cache is; refused if `kd assistants` has not made it."""
    path = Path(assistants) / name / "outputs"
    if not (path / "manifest.json").is_file():
        raise MissingInputError(f"{path}: no cache of assistant {name!r} (define assistants.{name} in params.yaml "
                                "and run `kd assistants`)")
    return path


def train_assistant(cfg: StudentConfig, cache: Cache, prepared: Path, assistants: Path, baselines: Path,
                    label_cfg: LabelConfig, *, memory_mb: float = 2048, checkpoints: Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Progressive distillation's middle step: distil assistant `cfg.name` from the teacher's
    cache, then label the prepared splits with it into `assistants/NAME/outputs`, a cache like
    the teacher's (same top-k, temperatures and views; no features).

    An assistant whose config, teacher cache and label parameters are unchanged is kept.
    Single-process only: `kd assistants` joins no process group (under torchrun every rank
    would train and write it on its own).
    """
    out = Path(assistants) / cfg.name
    label_cfg = dataclasses.replace(label_cfg, features={})
    decided_by = {"student": as_dict(cfg), "teacher": cache.manifest["teacher"]["fingerprint"],
                  "cache": cache.manifest["splits"], "label": as_dict(label_cfg)}
    stamp = out / "assistant.json"
    if stamp.is_file() and read_json(stamp) == decided_by and (out / "outputs" / "manifest.json").is_file():
        return {"name": cfg.name, "reused": True}
    summary = train_student(cfg, cache, prepared, out, baselines, memory_mb=memory_mb, checkpoints=checkpoints,
                            progress=progress)
    model, config = load_model(out, arch=cfg.arch if ":" in cfg.arch else None,
                               arch_kwargs=cfg.arch_kwargs if ":" in cfg.arch else None)
    label(Teacher(model, fingerprint(out), config), prepared, out / "outputs", label_cfg, progress=progress)
    write_json(stamp, decided_by)
    return {"name": cfg.name, "reused": False, **summary}
