"""The one training loop, used for the teacher, every student and every baseline twin.

What a model learns is decided by its loss terms, passed in as `{name: (weight, term)}`
where `term(batch, out) -> scalar tensor` and `out` holds the logits plus any tapped
layers. `step` returns every term on its own, so each one is logged per epoch. A model that
gives its rows' last hidden state and output layer (`HiddenRows`: a text student) never
shows its logits whole: its terms that are means over rows of the logits (`RowMean`) are
computed from the hidden state chunk by chunk of rows (`kd.head`).

`precision: bf16-mixed` runs the model's forward under autocast (bfloat16) with float32
weights; every loss term sees float32 outputs.

In a process group (`kd distill` under torchrun) `fit` trains data-parallel: each rank runs
the model on its slice of every global batch and the terms see the whole batch (`step`), so
the run follows the single-process one up to float rounding (BatchNorm aside on CPU, where
each rank normalises with its own slice's statistics).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kd import features, head, kernels, parallel

Batch = dict[str, torch.Tensor]  # "x" (the model's input) and per-row targets, one row per output row
Term = Callable[[Batch, dict[str, torch.Tensor]], torch.Tensor]


class Dataset(Protocol):
    """What `fit` trains on: a task's samples with their cache rows (`loader.SampleSet`,
    `loader.StreamingSet`), batches a pure function of (seed, epoch): ceil(len / batch_size)
    batches of `batch_size` samples, the last one smaller (each cut to a rank's slice with
    `shard`)."""

    def __len__(self) -> int: ...
    def batches(self, epoch: int, batch_size: int, seed: int, views: str = "none",
                shard: tuple[int, int] | None = None): ...


IGNORE = -100  # a label F.cross_entropy skips


def hard_label_loss(batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the rows that carry a label (label >= 0); 0 when none do."""
    logits, label = out["logits"], batch["label"]
    keep = label >= 0
    if not keep.any():
        return logits.sum() * 0.0
    # the unlabeled rows ignored, not cut out: no copy of the (rows, classes) logits and their gradient
    return F.cross_entropy(logits, label.where(keep, IGNORE), ignore_index=IGNORE)


def labeled(batch: Batch) -> torch.Tensor:
    """The rows `hard_label_loss` averages over: (N,) bool."""
    return batch["label"] >= 0


def all_rows(batch: Batch) -> None:
    """Every row of the batch (a `RowMean`'s default)."""
    return None


@dataclass(frozen=True)
class RowMean:
    """A term of the logits alone that is a mean over some rows of the batch: `rows(batch)`,
    (N,) bool, or None for all rows. What lets `kd.head` compute it chunk by chunk of rows;
    called, it is `term` itself."""

    term: Term
    rows: Callable[[Batch], torch.Tensor | None] = all_rows

    def __call__(self, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.term(batch, out)


class HiddenRows(Protocol):
    """A model whose logits rows are its output layer on its rows' last hidden state: `forward(x)`
    gives logits (N, V), `hidden_rows(x)` the hidden states (N, H) and `output_layer()` the
    nn.Linear between them (None where the logits are more than that, e.g. soft-capped)."""

    def hidden_rows(self, x: torch.Tensor) -> torch.Tensor: ...
    def output_layer(self) -> nn.Linear | None: ...


def autocast(precision: str, on: torch.device):
    """The context a forward runs in: bfloat16 autocast for `bf16-mixed`, none for `fp32`."""
    if precision == "bf16-mixed":
        return torch.autocast(on.type, dtype=torch.bfloat16)
    return nullcontext()


def step(model: nn.Module, batch: Batch, terms: dict[str, tuple[float, Term]], taps: list[str],
         gather: bool = False, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """One forward pass; every loss term by name (unweighted).

    A `HiddenRows` model gives its rows' hidden states instead of logits, and its `RowMean`
    terms are computed from them and its output layer chunk by chunk (`head.from_hidden`).

    gather (data-parallel): the model runs on this rank's inputs, then the output rows (a text
    model gives several per input) and their targets of all ranks are gathered, in order, so
    every term sees the global batch as in a single process: hard labels (a mean over the
    labeled rows only) and RKD (relations between all rows) included, and a rank without rows
    still takes part.
    """
    on_rows = {name: term for name, (_, term) in terms.items() if isinstance(term, RowMean)}
    layer = model.output_layer() if on_rows and hasattr(model, "hidden_rows") else None
    device = next(model.parameters()).device
    with features.tap(model, taps) as captured, autocast(precision, device):
        rows = model.hidden_rows(batch["x"]) if layer is not None else model(batch["x"])
    # the loss maths in float32 whatever the precision (bf16-mixed); the hidden state is cast where it is projected
    out = {"hidden" if layer is not None else "logits": rows, **captured}
    out = {name: t if name == "hidden" else _float32(t) for name, t in out.items()}
    if gather:
        counts = parallel.row_counts(len(rows))
        out = {name: parallel.gather_rows(t, counts) for name, t in out.items()}
        batch = {name: parallel.gather_rows(t, counts) for name, t in batch.items() if name != "x"}
    values = {}
    fused = _liger_hard(on_rows, device) if layer is not None else None
    if fused is not None:  # hard labels alone (a baseline twin) on CUDA: Liger's fused linear cross-entropy
        values = {name: fused(out.pop("hidden"), layer.weight, batch["label"], layer.bias) for name in on_rows}
    elif layer is not None:
        values = head.from_hidden(out.pop("hidden"), layer.weight, layer.bias, batch,
                                  {name: (term, term.rows) for name, term in on_rows.items()},
                                  torch.bfloat16 if precision == "bf16-mixed" else None,
                                  loss_weights=[terms[name][0] for name in on_rows])  # `update`'s weights
    return {name: values[name] if name in values else term(batch, out) for name, (_, term) in terms.items()}


def _liger_hard(on_rows: dict[str, RowMean], device: torch.device) -> Callable | None:
    """`kernels.liger_cross_entropy` where the only output-layer term is `hard_label_loss` (the
    quantity Liger's fused linear cross-entropy computes) and Liger serves this device; else None."""
    if len(on_rows) != 1 or next(iter(on_rows.values())).term is not hard_label_loss:
        return None
    return kernels.liger_cross_entropy(device.type)


def _float32(t: torch.Tensor) -> torch.Tensor:
    """A half-precision output (an autocast forward's) as float32; any other as it is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def update(model: nn.Module, batch: Batch, terms: dict[str, tuple[float, Term]], optimizer: torch.optim.Optimizer,
           *, taps: list[str] = (), precision: str = "fp32", trainee: nn.Module | None = None
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One training step: `step`, the weighted sum of its terms, backward, `optimizer.step()`;
    (the terms, the total). What `fit` runs per batch (`trainee`: its data-parallel wrapper,
    which runs `step` with gather), and what a benchmark times."""
    if trainee is None:
        values = step(model, batch, terms, list(taps), precision=precision)
    else:
        values = trainee(batch)
    stacked = torch.stack(list(values.values()))
    weights = torch.tensor([weight for weight, _ in terms.values()])  # in the order `step` gives the terms
    loss = stacked @ weights.to(stacked.device, stacked.dtype)  # sum of weight x term, one node
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return values, loss


class _Trainee(nn.Module):
    """The model and its extra modules as one module, so that DistributedDataParallel averages
    the gradients of both; its forward is `step` on this rank's rows."""

    def __init__(self, model: nn.Module, extra: list[nn.Module], terms: dict[str, tuple[float, Term]],
                 taps: list[str], precision: str = "fp32"):
        super().__init__()
        self.model, self.extra = model, nn.ModuleList(extra)
        self.terms, self.taps, self.precision = terms, taps, precision

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return step(self.model, batch, self.terms, self.taps, gather=True, precision=self.precision)


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
    strategy: str = "ddp",
    precision: str = "fp32",
) -> list[dict[str, float]]:
    """Train `model` (and `extra_modules`, e.g. hint regressors) in place with AdamW and a
    one-cycle schedule; return the per-epoch log.

    With `checkpoint`, the full training state (torch's random stream included, for dropout)
    is saved there after every epoch and a run that finds one resumes after its last epoch.
    Batches are a pure function of (seed, epoch), so a resumed run ends with the same weights
    as an uninterrupted one.

    In a process group of N ranks every rank calls `fit` with the same arguments: same
    batches, same number of steps, each rank's gradient covering its slice of every batch
    (DDP averages them into the global batch's). Rank 0 alone shows progress and writes the
    checkpoint; a resumed run reads it on rank 0 and sends it to the others. `strategy` fsdp
    trains a sharded copy of the model instead (`parallel.fully_sharded`; the checkpoint's state
    is gathered whole on rank 0, in the same form), whose weights `model` takes back at the end.
    """
    rank, world = parallel.world()
    on = parallel.device()
    state = parallel.from_main(lambda: _load(checkpoint))
    if state is not None:
        _restore_weights(state, model, extra_modules)
    fsdp = world > 1 and strategy == "fsdp"  # a sharded copy of the model trains (with the extra modules)
    inner = None if world == 1 else _Trainee(parallel.vacated_copy(model) if fsdp else model, list(extra_modules),
                                             terms, list(taps), precision)
    sharded = parallel.fully_sharded(inner) if fsdp else None
    if inner is not None and not fsdp:
        inner.to(on)
    params = list(sharded.parameters()) if sharded is not None else [
        *model.parameters(), *(p for m in extra_modules for p in m.parameters())]  # (the same order)
    # fused: one kernel, not a loop over tensors
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    steps = epochs * math.ceil(len(data) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    log: list[dict[str, float]] = []
    if state is not None:
        log = _restore(state, optimizer, schedule, sharded)
    trainee = sharded
    if inner is not None and sharded is None:
        if on.type == "cuda":  # SyncBatchNorm is GPU-only: on CPU each rank normalises with its own rows
            nn.SyncBatchNorm.convert_sync_batchnorm(inner)
        # static_graph: the same parameters take part in every step, so a parameter no term
        # reaches (the head of a student without logit terms) keeps no gradient, as in one process
        trainee = nn.parallel.DistributedDataParallel(inner, static_graph=True)
    bar = tqdm(total=steps, initial=len(log) * math.ceil(len(data) / batch_size), desc=desc, unit="step",
               disable=not progress or rank != 0, leave=False)
    for epoch in range(len(log), epochs):
        (model if sharded is None else sharded).train()
        started = time.perf_counter()
        sums: dict[str, float] = {}
        count = 0
        shard = (rank, world) if world > 1 else None
        for index, batch in enumerate(data.batches(epoch, batch_size, seed, views, shard)):
            if trainee is None:
                values, loss = update(model, batch, terms, optimizer, taps=list(taps), precision=precision)
                n = len(batch["x"])
            else:  # this rank holds a slice of a global batch: full but for the epoch's last
                values, loss = update(model, {k: v.to(on) for k, v in batch.items()}, terms, optimizer,
                                      trainee=trainee)
                n = min(batch_size, len(data) - index * batch_size)
            schedule.step()
            count += n
            for name, value in {**values, "total": loss}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
            bar.update(1)
        row = {"epoch": epoch + 1, **{k: v / count for k, v in sums.items()},
               "lr": schedule.get_last_lr()[0], "seconds": time.perf_counter() - started}
        log.append(row)
        bar.set_postfix(loss=f"{row['total']:.4f}")
        if checkpoint is not None:
            full = parallel.full_state(sharded, optimizer) if sharded is not None else None  # every rank
            if rank == 0:
                _save(checkpoint, model, extra_modules, optimizer, schedule, log, full)
    bar.close()
    if sharded is not None:  # (the extra modules, needed no more, stay sharded)
        parallel.unshard_into(sharded.model, model)
    elif inner is not None:
        inner.cpu()
    model.eval()
    return log


def _save(path: Path, model: nn.Module, extra: list[nn.Module], optimizer, schedule, log,
          full: dict[str, Any] | None = None) -> None:
    if full is None:
        state = {"model": model.state_dict(), "extra": [m.state_dict() for m in extra],
                 "optimizer": optimizer.state_dict()}
    else:  # FSDP: the trainee's state gathered on rank 0 (`parallel.full_state`), keyed model.* and extra.<i>.*
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in full["weights"].items() if k.startswith(prefix)}
        state = {"model": part("model."), "extra": [part(f"extra.{i}.") for i in range(len(extra))],
                 "optimizer": full["optimizer"]}
    # the random stream too: dropout draws from it, so a resumed run draws what an uninterrupted one would
    state |= {"schedule": schedule.state_dict(), "log": log, "rng": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    # weights_only: tensors and plain containers only, no code runs while loading
    return torch.load(path, weights_only=True, map_location="cpu")


def _restore_weights(state: dict[str, Any], model: nn.Module, extra: list[nn.Module]) -> None:
    model.load_state_dict(state["model"])
    for module, module_state in zip(extra, state["extra"]):
        module.load_state_dict(module_state)


def _restore(state: dict[str, Any], optimizer, schedule, sharded: nn.Module | None) -> list[dict[str, float]]:
    if sharded is None:
        optimizer.load_state_dict(state["optimizer"])
    else:
        parallel.load_optimizer_state(sharded, optimizer, state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if "rng" in state:
        torch.set_rng_state(state["rng"])
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
