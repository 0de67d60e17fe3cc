"""Training a student from the cache and the prepared inputs only (never the teacher), for every task.

`train_student` resolves the cache's task once (`kd.tasks`) and asks it for the student's
rows, model, baseline twin's rows and files; the loss is composed from the student's config by
`kd.methods`; `training.fit` trains every seed of the student and its baseline twin (same
architecture, seed and budget, without the teacher: hard labels of the labeled split for
images, the text alone for language models), with per-epoch checkpoints to resume from. Twins
are keyed by everything that decides them (the task's data included) and stored once under
`baselines/`, so students that share a twin share its training.
`train_assistant` is progressive distillation's middle step: a student of the teacher that
then labels the data into a cache of its own, for students that name it as `assistant`.

Under torchrun (`kd.parallel`) every rank trains every model, student seeds and twins
alike, so that their collectives line up; rank 0 alone writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd import parallel, tasks
from kd.cache import Cache, Teacher, label
from kd.config import LabelConfig, StudentConfig, as_dict
from kd.errors import ConfigError, MissingInputError
from kd.evaluation import SEEDS_DIR, SEEDS_INDEX
from kd.files import read_json, replacing, write_json
from kd.methods import Built, Shapes, needed_samples, needed_temperatures, student_layers, student_terms
from kd.tasks import Task
from kd.tasks.image_models import fingerprint
from kd.training import Dataset, RowMean, fit, hard_label_loss, labeled, write_log


def twin_key(cfg: StudentConfig, decided_by_task: dict[str, Any]) -> str:
    """What decides a baseline twin: architecture, seed, budget, and what its task says (the
    data it learns from, for text also the task and its masks)."""
    decided_by = {k: getattr(cfg, k) for k in ("arch", "arch_kwargs", "epochs", "batch_size", "lr",
                                                "weight_decay", "seed")}
    if cfg.precision != "fp32":  # a twin trains as its student does; fp32 twins keep their earlier keys
        decided_by["precision"] = cfg.precision
    decided_by |= decided_by_task
    decided_by["torch"] = torch.__version__.split("+")[0]
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:16]


def train_model(task: Task, cfg: StudentConfig, cache: Cache, prepared: Path, dataset: Dataset, desc: str,
                progress: bool, teacher_specs: dict[str, dict] | None = None,
                checkpoint: Path | None = None) -> tuple[nn.Module, list[dict[str, float]]]:
    """Build the task's student with `cfg.seed` and train it on `dataset` with the student's
    terms (`teacher_specs` given) or, for a baseline twin, on hard labels alone. With
    `checkpoint`, training resumes from it."""
    torch.manual_seed(cfg.seed)  # same seed -> same initial weights for the student and its twin
    model = task.build(cfg, cache, prepared)
    if teacher_specs is None:
        built = Built({"hard": (1.0, RowMean(hard_label_loss, labeled))})
    else:
        layers = student_layers(cfg)
        built = student_terms(cfg, Shapes(task.student_shapes(model, cfg, layers, cache), teacher_specs))
    for module in built.modules:
        module.train()
    log = fit(model, dataset, built.terms, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, views="cached" if cfg.views else "none",
              taps=built.taps, extra_modules=built.modules, checkpoint=checkpoint, desc=desc, progress=progress,
              strategy=cfg.parallel.strategy, precision=cfg.precision)
    return model, log


def train_student(cfg: StudentConfig, cache: Cache, prepared: Path, out: Path, baselines: Path,
                  *, memory_mb: float = 2048, checkpoints: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train student `cfg.name` (every seed of `cfg.repeats`) and its twins into `out`.

    The first seed is written at the top of `out`; further seeds under `out/seeds/<seed>/`, and
    `out/seeds/index.json` says where each seed is.
    With `checkpoints`, each model's training state is saved there every epoch (keyed by
    everything that decides the model), so an interrupted run resumes. Returns a summary.
    """
    task = tasks.for_cache(cache)
    task.check(cfg, cache, prepared)
    layers = cfg.loss.teacher_layers(cfg.where)
    rebuild = "`kd label`" if cfg.assistant is None else "`kd label`, then `kd assistants`"
    cache.require(temperatures=needed_temperatures(cfg) + needed_samples(cfg), features=layers, views=cfg.views,
                  samples=needed_samples(cfg), who=f"student {cfg.name!r}", rebuild=rebuild)
    cache.check(prepared, cfg.transfer, list(layers))
    dataset = task.rows(cache, prepared, cfg, memory_mb)
    teacher_specs = {layer: cache.feature_spec(layer) for layer in layers}
    main = parallel.is_main()
    summary: dict[str, Any] = {"twin_loss": task.TWIN_LOSS, "seeds": [], "twins": []}
    with replacing(out) if main else nullcontext() as staging:  # rank 0 writes, swapped in whole at the end
        if main:
            (staging / SEEDS_DIR).mkdir()  # always there: a DVC output
        for repeat in range(cfg.repeats):
            seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + repeat)
            checkpoint = _checkpoint(checkpoints, f"{cfg.name}-seed{seed_cfg.seed}",
                                     {"student": as_dict(seed_cfg), "cache": cache.manifest.get("key"),
                                      "teacher": cache.manifest["teacher"]["fingerprint"]})
            model, log = train_model(task, seed_cfg, cache, prepared, dataset,
                                     f"distill {cfg.name} seed {seed_cfg.seed}", progress, teacher_specs, checkpoint)
            record = _record(seed_cfg, cache)
            twin, reused = _twin(task, seed_cfg, cache, prepared, baselines, record, dataset, progress, checkpoints)
            if main:
                target = staging if repeat == 0 else staging / SEEDS_DIR / str(seed_cfg.seed)
                task.save(target, model, seed_cfg, cache, record, prepared)
                write_log(target / "train_log.csv", log)
                shutil.copytree(twin, target / "baseline")
            summary["seeds"].append(seed_cfg.seed)
            summary["twins"].append((twin.name, reused))
            summary.setdefault("final", log[-1])
            summary.setdefault("epochs", len(log))
            summary.setdefault("baseline_final", _last_row(twin / "train_log.csv") if main else None)
        if main:
            write_json(staging / SEEDS_DIR / SEEDS_INDEX,
                       {str(seed): "." if i == 0 else f"{SEEDS_DIR}/{seed}" for i, seed in enumerate(summary["seeds"])})
    if main:
        for repeat in range(cfg.repeats):
            _done(checkpoints, f"{cfg.name}-seed{cfg.seed + repeat}")
    parallel.barrier()  # every rank returns once the student is in place
    return summary


def _record(cfg: StudentConfig, cache: Cache) -> dict[str, Any]:
    """What a student's files carry: its config and the teachers it descends from."""
    teacher = cache.manifest["teacher"]
    lineage = [teacher["fingerprint"], *teacher["config"].get("lineage", [])]
    return {"student": as_dict(cfg), "teacher_fingerprint": teacher["fingerprint"], "lineage": lineage,
            "cache": str(cache.root)}


def _last_row(log: Path) -> dict[str, float]:
    with open(log, newline="") as handle:
        return {k: float(v) for k, v in list(csv.DictReader(handle))[-1].items()}


def _twin(task: Task, cfg: StudentConfig, cache: Cache, prepared: Path, baselines: Path,
          record: dict[str, Any], transfer: Dataset, progress: bool,
          checkpoints: Path | None = None) -> tuple[Path, bool]:
    """The baseline twin of `cfg` from the shared store, trained first if it is not there."""
    twin_dir = baselines / twin_key(cfg, task.twin_decided_by(cfg, cache, prepared))

    def stored() -> bool:
        return (twin_dir / "model.safetensors").is_file() and (twin_dir / "train_log.csv").is_file()

    if parallel.from_main(stored):  # rank 0 writes the store and decides: every rank trains the twin or none
        return twin_dir, True
    checkpoint = None if checkpoints is None else Path(checkpoints) / f"twin-{twin_dir.name}.pt"
    twin, log = train_model(task, cfg, cache, prepared, task.twin_rows(cache, prepared, cfg, transfer),
                            f"baseline {cfg.name} seed {cfg.seed}", progress, checkpoint=checkpoint)
    if parallel.is_main():
        with replacing(twin_dir) as tmp:
            task.save(tmp, twin, cfg, cache, {**record, "student": None, "baseline_of": as_dict(cfg),
                                              "twin_key": twin_dir.name}, prepared)
            write_log(tmp / "train_log.csv", log)
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


def chain_order(configs: list[StudentConfig]) -> list[StudentConfig]:
    """The assistants in an order that puts each after the assistant it learns from; an unknown
    assistant or a cycle is refused naming it."""
    by_name = {cfg.name: cfg for cfg in configs}
    ordered: list[StudentConfig] = []
    for cfg in configs:
        path: list[StudentConfig] = []
        current: StudentConfig | None = cfg
        while current is not None and current not in ordered:
            if current in path:
                raise ConfigError(f"{cfg.where}.assistant: a cycle of assistants ("
                                  + " -> ".join(c.name for c in [*path, current]) + ")")
            path.append(current)
            if current.assistant is not None and current.assistant not in by_name:
                raise ConfigError(f"{current.where}.assistant: {current.assistant!r} is not an entry of assistants "
                                  f"({', '.join(by_name)})")
            current = None if current.assistant is None else by_name[current.assistant]
        ordered += reversed(path)
    return ordered


def train_assistant(cfg: StudentConfig, cache: Cache, prepared: Path, assistants: Path, baselines: Path,
                    label_cfg: LabelConfig, *, memory_mb: float = 2048, checkpoints: Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Progressive distillation's middle step: distil assistant `cfg.name` from the teacher's
    cache (or, in a chain, from its own assistant's), then label the prepared splits with it into
    `assistants/NAME/outputs`, a cache like the teacher's (same top-k, temperatures and views; no
    features).

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
    model, config = tasks.for_cache(cache).load(out, cfg)
    assistant = Teacher(model, fingerprint(out), config)  # the teacher of the next step
    label(assistant, prepared, out / "outputs", label_cfg, task_inputs=tasks.inputs_for(prepared, assistant),
          progress=progress)
    write_json(stamp, decided_by)
    return {"name": cfg.name, "reused": False, **summary}
