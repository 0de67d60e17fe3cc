"""Training a student from the cache and the prepared inputs only (never the teacher).

`student_terms` composes a student's loss from its config through one explicit dict,
`TERMS`; `transfer_set` lines the cached rows up with the prepared inputs; `train_student`
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
from pipeline.errors import StaleCacheError
from pipeline.models import build, save_model
from pipeline.training import Term, TransferSet, fit, hard_label_loss, write_log


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


def needed_temperatures(cfg: StudentConfig) -> list[float]:
    temps = []
    if cfg.loss.soft is not None:
        temps.append(cfg.loss.soft.temperature)
    if cfg.loss.hard is not None and cfg.loss.hard.pseudo and cfg.loss.hard.threshold > 0:
        temps.append(1)  # the teacher's top-1 probability at T=1 decides confidence
    return temps


def transfer_set(cache: Cache, prepared: Path, cfg: StudentConfig) -> TransferSet:
    """The student's training rows: prepared inputs + cached targets of the transfer splits."""
    temps = needed_temperatures(cfg)
    xs, ids, targets = [], [], {"topk_idx": [], "topk_logit": [], "lse": [], "label": []}
    shape = None
    for split in cfg.transfer:
        source = prepared / f"{split}.parquet"
        rows = data.read_split(source)
        soft = cache.soft_targets(split, temps)
        if not np.array_equal(soft.ids[::cache.views], rows.ids):
            raise StaleCacheError(f"{cache.root}: ids of split {split} differ from {source}; run `kd label` again")
        shape = rows.input_shape
        xs.append(torch.tensor(rows.x))
        ids.append(rows.ids)
        targets["topk_idx"].append(torch.tensor(soft.topk_idx, dtype=torch.long))
        targets["topk_logit"].append(torch.tensor(soft.topk_logit, dtype=torch.float32))
        if cfg.loss.soft is not None:
            targets["lse"].append(torch.tensor(soft.lse[float(cfg.loss.soft.temperature)]))
        targets["label"].append(torch.from_numpy(_hard_labels(cfg, split, rows.y, soft, cache.views)))
    if cfg.loss.soft is None:
        del targets["lse"]
    return TransferSet(
        x=torch.cat(xs), ids=np.concatenate(ids), input_shape=shape,
        targets={k: torch.cat(v) for k, v in targets.items()},
        views=cache.views, view_seed=cache.manifest["views"]["seed"],
        view_shift=cache.manifest["views"]["recipe"]["max_shift"],
    )


def _hard_labels(cfg: StudentConfig, split: str, y: np.ndarray, soft, views: int) -> np.ndarray:
    """Per cache row: the true label (labeled split), the teacher's argmax (pseudo), or -1."""
    hard = cfg.loss.hard
    labels = np.full(len(soft.ids), -1, dtype=np.int64)
    if hard is None:
        return labels
    if hard.labels and split == "labeled":
        labels = np.repeat(y, views)
    if hard.pseudo and split == "unlabeled":
        labels = soft.topk_idx[:, 0].astype(np.int64)
        if hard.threshold > 0:
            confidence = np.exp(-soft.lse[1.0])  # p(top-1) at T=1: topk_logit[0] is 0 by construction
            labels[confidence < hard.threshold] = -1
    return labels


def baseline_set(prepared: Path) -> TransferSet:
    rows = data.read_split(prepared / "labeled.parquet")
    return TransferSet(x=torch.tensor(rows.x), ids=rows.ids, input_shape=rows.input_shape,
                       targets={"label": torch.tensor(rows.y)})


def twin_key(cfg: StudentConfig, prepared: Path) -> str:
    """What decides a baseline twin: architecture, seed, budget and the labeled data."""
    decided_by = {k: getattr(cfg, k) for k in ("arch", "arch_kwargs", "epochs", "batch_size", "lr",
                                                "weight_decay", "seed")}
    decided_by["data"] = data.data_fingerprint(prepared / "labeled.parquet")
    decided_by["torch"] = torch.__version__.split("+")[0]
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:16]


def train_model(cfg: StudentConfig, dataset: TransferSet, num_classes: int,
                terms: dict[str, tuple[float, Term]], views: str, desc: str, progress: bool):
    torch.manual_seed(cfg.seed)  # same seed -> same initial weights for the student and its twin
    model = build(cfg.arch, cfg.arch_kwargs, dataset.input_shape, num_classes)
    log = fit(model, dataset, terms, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, views=views, desc=desc, progress=progress)
    return model, log


def train_student(cfg: StudentConfig, cache: Cache, prepared: Path, out: Path, baselines: Path,
                  *, progress: bool = True) -> dict[str, Any]:
    """Train student `cfg.name` and its twin into `out`; return a summary for the CLI."""
    cache.require(temperatures=needed_temperatures(cfg), views=cfg.views, who=f"student {cfg.name!r}")
    cache.check(prepared, cfg.transfer)
    dataset = transfer_set(cache, prepared, cfg)
    model, log = train_model(cfg, dataset, cache.num_classes, student_terms(cfg),
                             "cached" if cfg.views else "none", f"distill {cfg.name}", progress)
    staging = out.with_name(out.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    record = {"arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "input_shape": dataset.input_shape,
              "num_classes": cache.num_classes, "student": as_dict(cfg),
              "teacher_fingerprint": cache.manifest["teacher"]["fingerprint"], "cache": str(cache.root)}
    save_model(staging, model, record)
    write_log(staging / "train_log.csv", log)

    twin_dir = baselines / twin_key(cfg, prepared)
    reused = (twin_dir / "model.safetensors").is_file() and (twin_dir / "train_log.csv").is_file()
    if not reused:
        twin, twin_log = train_model(cfg, baseline_set(prepared), cache.num_classes,
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
