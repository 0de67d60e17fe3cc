"""The one training loop, used for the teacher, every student and every baseline twin.

What a model learns is decided by its loss terms, passed in as `{name: (weight, term)}`
where `term(batch, out) -> scalar tensor` and `out` holds the logits plus any tapped
layers. `step` returns every term on its own, so each one is logged per epoch.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline import features
from pipeline.loader import Batch

Term = Callable[[Batch, dict[str, torch.Tensor]], torch.Tensor]


class Dataset(Protocol):
    """What `fit` trains on: an in-memory `loader.TransferSet` or a `loader.StreamingSet`."""

    def __len__(self) -> int: ...
    def batches(self, epoch: int, batch_size: int, seed: int, views: str = "none"): ...


def hard_label_loss(batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the rows that carry a label (label >= 0); 0 when none do."""
    logits, label = out["logits"], batch["label"]
    keep = label >= 0
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], label[keep])


def step(model: nn.Module, batch: Batch, terms: dict[str, tuple[float, Term]], taps: list[str]) -> dict[str, torch.Tensor]:
    """One forward pass; every loss term by name (unweighted)."""
    with features.tap(model, taps) as captured:
        logits = model(batch["x"])
    out = {"logits": logits, **captured}
    return {name: term(batch, out) for name, (_, term) in terms.items()}


def fit(
    model: nn.Module,
    data: Dataset,
    terms: dict[str, tuple[float, Term]],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    views: str = "none",
    taps: list[str] = (),
    extra_modules: list[nn.Module] = (),
    checkpoint: Path | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train `model` (and `extra_modules`, e.g. hint regressors) in place with AdamW and a
    one-cycle schedule; return the per-epoch log.

    With `checkpoint`, the full training state is saved there after every epoch and a run
    that finds one resumes after its last epoch. Batches are a pure function of (seed,
    epoch), so a resumed run ends with the same weights as an uninterrupted one.
    """
    params = [*model.parameters(), *(p for m in extra_modules for p in m.parameters())]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)  # one kernel, not a loop over tensors
    steps = epochs * math.ceil(len(data) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    log: list[dict[str, float]] = []
    if checkpoint is not None and checkpoint.is_file():
        log = _restore(checkpoint, model, extra_modules, optimizer, schedule)
    bar = tqdm(total=steps, initial=len(log) * math.ceil(len(data) / batch_size), desc=desc, unit="step",
               disable=not progress, leave=False)
    for epoch in range(len(log), epochs):
        model.train()
        started = time.perf_counter()
        sums: dict[str, float] = {}
        count = 0
        for batch in data.batches(epoch, batch_size, seed, views):
            values = step(model, batch, terms, list(taps))
            loss = sum(terms[name][0] * value for name, value in values.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            n = len(batch["x"])
            count += n
            for name, value in {**values, "total": loss}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
            bar.update(1)
        row = {"epoch": epoch + 1, **{k: v / count for k, v in sums.items()},
               "lr": schedule.get_last_lr()[0], "seconds": time.perf_counter() - started}
        log.append(row)
        bar.set_postfix(loss=f"{row['total']:.4f}")
        if checkpoint is not None:
            _save(checkpoint, model, extra_modules, optimizer, schedule, log)
    bar.close()
    model.eval()
    return log


def _save(path: Path, model: nn.Module, extra: list[nn.Module], optimizer, schedule, log) -> None:
    state = {"model": model.state_dict(), "extra": [m.state_dict() for m in extra],
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "log": log}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _restore(path: Path, model: nn.Module, extra: list[nn.Module], optimizer, schedule) -> list[dict[str, float]]:
    # weights_only: tensors and plain containers only, no code runs while loading
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    for module, module_state in zip(extra, state["extra"]):
        module.load_state_dict(module_state)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return list(state["log"])


def write_log(path: Path, log: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
    tmp.replace(path)


def predict(model: nn.Module, x: torch.Tensor, input_shape: list[int], batch_size: int = 512) -> torch.Tensor:
    """Logits (N, C) of a model over inputs x (N, D), in eval mode and without grad."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            out.append(model(chunk.view(len(chunk), *input_shape)))
    return torch.cat(out) if out else torch.empty(0)
