"""Training a student from the cache and the prepared inputs only (never the teacher).

`student_terms` composes a student's loss from its config through one explicit dict,
`TERMS`; `loader.transfer_set` lines the cached rows up with the prepared inputs; `train_student`
trains the student and its baseline twin (same architecture, seed and budget, hard labels
of the labeled split only). Twins are keyed by everything that decides them and stored
once under `baselines/`, so students that share a twin share its training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline import data, losses
from pipeline.cache import Cache
from pipeline.config import HardTerm, SoftTerm, StudentConfig, as_dict
from pipeline.loader import baseline_set, needed_temperatures, transfer_set
from pipeline.models import build, save_model
from pipeline.training import Dataset, Term, fit, hard_label_loss, write_log


def soft_term(cfg: SoftTerm) -> Term:
    def term(batch, out):
        return losses.topk_soft_target_loss(out["logits"], batch["topk_idx"], batch["topk_logit"],
                                            batch["lse"], cfg.temperature, tail=cfg.tail)
    return term


def hard_term(cfg: HardTerm) -> Term:
    return hard_label_loss


# Loss-term name -> builder of term(batch, out). The one place a config name meets code.
TERMS: dict[str, Callable[[Any], Term]] = {"soft": soft_term, "hard": hard_term}


def student_terms(cfg: StudentConfig) -> dict[str, tuple[float, Term]]:
    terms = {}
    for name, builder in TERMS.items():
        term_cfg = getattr(cfg.loss, name)
        if term_cfg is not None:
            terms[name] = (term_cfg.weight, builder(term_cfg))
    return terms


def twin_key(cfg: StudentConfig, prepared: Path) -> str:
    """What decides a baseline twin: architecture, seed, budget and the labeled data."""
    decided_by = {k: getattr(cfg, k) for k in ("arch", "arch_kwargs", "epochs", "batch_size", "lr",
                                                "weight_decay", "seed")}
    decided_by["data"] = data.data_fingerprint(prepared / "labeled.parquet")
    decided_by["torch"] = torch.__version__.split("+")[0]
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:16]


def train_model(cfg: StudentConfig, dataset: Dataset, input_shape: list[int], num_classes: int,
                terms: dict[str, tuple[float, Term]], views: str, desc: str, progress: bool):
    torch.manual_seed(cfg.seed)  # same seed -> same initial weights for the student and its twin
    model = build(cfg.arch, cfg.arch_kwargs, input_shape, num_classes)
    log = fit(model, dataset, terms, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, views=views, desc=desc, progress=progress)
    return model, log


def train_student(cfg: StudentConfig, cache: Cache, prepared: Path, out: Path, baselines: Path,
                  *, memory_mb: float = 2048, progress: bool = True) -> dict[str, Any]:
    """Train student `cfg.name` and its twin into `out`; return a summary for the CLI."""
    cache.require(temperatures=needed_temperatures(cfg), views=cfg.views, who=f"student {cfg.name!r}")
    cache.check(prepared, cfg.transfer)
    dataset = transfer_set(cache, prepared, cfg, memory_mb)
    model, log = train_model(cfg, dataset, cache.manifest["input_shape"], cache.num_classes, student_terms(cfg),
                             "cached" if cfg.views else "none", f"distill {cfg.name}", progress)
    input_shape = cache.manifest["input_shape"]
    staging = out.with_name(out.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    record = {"arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "input_shape": input_shape,
              "num_classes": cache.num_classes, "student": as_dict(cfg),
              "teacher_fingerprint": cache.manifest["teacher"]["fingerprint"], "cache": str(cache.root)}
    save_model(staging, model, record)
    write_log(staging / "train_log.csv", log)

    twin_dir = baselines / twin_key(cfg, prepared)
    reused = (twin_dir / "model.safetensors").is_file() and (twin_dir / "train_log.csv").is_file()
    if not reused:
        twin, twin_log = train_model(cfg, baseline_set(prepared), input_shape, cache.num_classes,
                                     {"hard": (1.0, hard_label_loss)}, "none", f"baseline {cfg.name}", progress)
        twin_tmp = twin_dir.with_name(twin_dir.name + ".tmp")
        save_model(twin_tmp, twin, {**record, "student": None, "baseline_of": as_dict(cfg), "twin_key": twin_dir.name})
        write_log(twin_tmp / "train_log.csv", twin_log)
        if twin_dir.exists():
            shutil.rmtree(twin_dir)
        twin_tmp.replace(twin_dir)
    shutil.copytree(twin_dir, staging / "baseline")
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return {"epochs": len(log), "final": log[-1], "twin": twin_dir.name, "twin_reused": reused}
