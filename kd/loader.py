"""Feeding a student: prepared samples lined up with their cache rows, for every task.

`read_rows` is the one reader of cache rows for training: it reads only the columns and
arrays the student's methods ask for (the top-k, the lse of their temperatures, the cached
layers), checks that the rows belong to the prepared samples (ids, in order) and gives
`CacheRows`, whose `targets` are the per-row batch keys the loss terms read. `hard_labels`
states once what `loss.hard` means for a row.

Every task's samples are served in one of two ways, chosen by size against a memory budget
(`transfer_set`):
- `SampleSet`: everything the student needs in memory (the default when it fits): each
  sample's inputs, its rows, and the task's `model_input` that makes the input of a sample
  seen in one of its views (an image's shifted copy, a block's recorded masking);
- `StreamingSet`: cache parts in a shuffled order through a shuffle buffer, each part read
  by the task into a `SampleSet`, so memory stays bounded by the buffer whatever the number
  of rows.
Either way only the columns and arrays the student asks for are read: the top-k, the lse
of its temperature, its hard labels and its cached layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd import parallel
from kd.cache import Cache, SoftTargets
from kd.cache.layout import sample_starts
from kd.config import StudentConfig
from kd.errors import StaleCacheError
from kd.methods import needed_samples, needed_temperatures
from kd.methods.hard import HardTerm
from kd.methods.mapped import lse_key
from kd.training import Batch


@dataclass
class CacheRows:
    """What the cache gives a training step, row for row in cache order (sample-major)."""

    ids: np.ndarray  # (R,) int64: each row's sample id, checked against the prepared split
    row: torch.Tensor  # (R,) int64: the row's index over the student's transfer splits
    topk_idx: torch.Tensor  # (R, k) int64
    topk_logit: torch.Tensor  # (R, k) float32, max-shifted as cached
    lse: dict[float, np.ndarray]  # temperature -> (R,) float32
    label: torch.Tensor  # (R,) int64: `hard_labels`, -1 for none
    features: dict[str, torch.Tensor]  # teacher layer -> (R, *shape), float16 as cached
    samples: dict[float, tuple[np.ndarray, np.ndarray]]  # T -> sample_idx, sample_count (R, N) (label.sampling)
    entropy: dict[float, np.ndarray]  # T -> (R,) the teacher's entropy (label.sampling)

    def targets(self, cfg: StudentConfig) -> dict[str, torch.Tensor]:
        """The per-row batch keys: row, topk_idx, topk_logit, label, lse (at the soft term's
        temperature; with `targets: sampled`, sample_idx, sample_count and entropy instead) and
        teacher.<layer> for each cached layer."""
        targets = {"row": self.row, "topk_idx": self.topk_idx, "topk_logit": self.topk_logit, "label": self.label}
        if cfg.loss.soft is not None:
            t = float(cfg.loss.soft.temperature)
            if cfg.loss.soft.targets == "sampled":  # (read_rows read the draws of exactly these)
                targets |= {"sample_idx": torch.from_numpy(self.samples[t][0]),
                            "sample_count": torch.from_numpy(self.samples[t][1]),
                            "entropy": torch.tensor(self.entropy[t])}
            else:
                targets["lse"] = torch.tensor(self.lse[t])  # (a copy: Arrow arrays are read-only)
        for term in (cfg.loss.mapped, cfg.loss.uld):  # the teacher's own tokenizer: every row lines up
            if term is not None:
                targets[lse_key(term.temperature)] = torch.tensor(self.lse[float(term.temperature)])
        if cfg.loss.mapped is not None:
            targets["mapped_idx"] = self.topk_idx  # each teacher id is its own student id
        return targets | {f"teacher.{layer}": value for layer, value in self.features.items()}


def hard_labels(hard: HardTerm | None, truth: np.ndarray, soft: SoftTargets) -> np.ndarray:
    """The one meaning of `loss.hard`, per cache row: the row's true label where `labels` is on
    and its truth is known (`truth` >= 0: the labeled split for images; every token for text,
    whose label is the text itself); otherwise the teacher's argmax where `pseudo` is on and
    its top-1 probability at T=1 is at least `threshold`; otherwise -1 (no hard label)."""
    labels = np.full(len(truth), -1, dtype=np.int64)
    if hard is None:
        return labels
    if hard.pseudo:
        labels = soft.topk_idx[:, 0].astype(np.int64)
        if hard.threshold > 0:
            confidence = np.exp(-soft.lse[1.0])  # p(top-1) at T=1: topk_logit[0] is 0 by construction
            labels[confidence < hard.threshold] = -1
    if hard.labels:
        known = truth >= 0
        labels[known] = truth[known]
    return labels


def read_rows(cache: Cache, cfg: StudentConfig, split: str, source: Path, sample_ids: np.ndarray,
              truth: np.ndarray, *, parts: list[int] | None = None, row_offset: int = 0) -> CacheRows:
    """The cache rows of `split` (all, or those of the given consecutive parts) for the prepared
    samples `sample_ids` read from `source`, each sample's rows together; `truth` (R,) is each
    row's true label, -1 where unknown. Refuses rows of other samples."""
    soft = cache.soft_targets(split, needed_temperatures(cfg), parts=parts, samples=needed_samples(cfg))
    if not np.array_equal(soft.ids[sample_starts(soft.ids)], sample_ids):
        raise StaleCacheError(f"{cache.root}: ids of split {split} differ from {source}; run `kd label` again")
    first_row = cache.split(split)["parts"][parts[0]]["first_row"] if parts else 0
    features = {}
    for layer in cfg.loss.teacher_layers(cfg.where):
        # float16 as cached; terms upcast per batch, which halves the memory of big maps
        block = cache.feature(split, layer)[first_row:first_row + len(soft.ids)]
        features[layer] = torch.from_numpy(np.ascontiguousarray(block))
    return CacheRows(ids=soft.ids, row=torch.arange(row_offset + first_row, row_offset + first_row + len(soft.ids)),
                     topk_idx=torch.tensor(soft.topk_idx, dtype=torch.long),
                     topk_logit=torch.tensor(soft.topk_logit, dtype=torch.float32),
                     lse=soft.lse,
                     label=torch.from_numpy(hard_labels(cfg.loss.hard, truth, soft)), features=features,
                     samples=soft.samples, entropy=soft.entropy)


@dataclass
class SampleSet:
    """Samples in memory with their cache rows, for every task.

    `inputs` hold one entry per sample (first axis N: an image's values, a block's tokens, a
    block's recorded maskings); `targets` one entry per cache row, in cache order: sample i,
    view v holds rows (i * views + v) * per_view ... + per_view - 1 (an image row per view, a
    causal block's predicted tokens as its one view, a masked block's M positions per masking),
    or, where samples have different numbers of rows (`counts`: instruction data's response
    tokens), sample i holds the counts[i] rows after those of samples 0 ... i - 1.
    `model_input(inputs, ids, view)` makes the model's input for some samples (their inputs,
    ids and the view each is seen in): the task's knowledge of how a view is drawn.
    """

    inputs: dict[str, torch.Tensor]
    ids: np.ndarray
    targets: dict[str, torch.Tensor]
    model_input: Callable[[dict[str, torch.Tensor], np.ndarray, torch.Tensor], torch.Tensor]
    views: int = 1
    per_view: int = 1
    counts: torch.Tensor | None = None  # (N,) rows of each sample where they vary (one view each)

    def __len__(self) -> int:
        return len(self.ids)

    def _rows(self, samples: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor:
        # cache rows of the given samples: every view's (view None) or the given view's
        if self.counts is not None:  # sample i holds rows offsets[i] ... offsets[i] + counts[i] - 1
            offsets = torch.cumsum(self.counts, 0) - self.counts
            counts = self.counts[samples]
            starts = torch.repeat_interleave(offsets[samples] - (torch.cumsum(counts, 0) - counts), counts)
            return starts + torch.arange(int(counts.sum()))
        if view is None:
            first, count = samples * self.views * self.per_view, self.views * self.per_view
        else:
            first, count = (samples * self.views + view) * self.per_view, self.per_view
        return (first[:, None] + torch.arange(count)).reshape(-1)

    def subset(self, samples: torch.Tensor) -> SampleSet:
        """The given samples (indices into this set) with all their cache rows."""
        rows = self._rows(samples)
        return dataclasses.replace(self, inputs={k: v[samples] for k, v in self.inputs.items()},
                                   ids=self.ids[samples.numpy()], targets={k: t[rows] for k, t in self.targets.items()},
                                   counts=None if self.counts is None else self.counts[samples])

    def batches(self, epoch: int, batch_size: int, seed: int, views: str = "none",
                shard: tuple[int, int] | None = None) -> Iterator[Batch]:
        """Shuffled batches for one epoch, seeded by (seed, epoch), with the rows of the view
        each sample is seen in.

        views: "none" = view 0 only; "cached" = each sample draws one of its cached views;
        "fresh" = a new random view per sample and epoch (an image teacher's training; no
        cached targets). shard (rank, world size): the same batches, each cut to this rank's
        slice (`parallel.shard`); only those samples are made into inputs and gathered.
        """
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        n = len(self)
        order = torch.randperm(n, generator=g)
        if views == "cached" and self.views > 1:  # (a baseline twin's set has view 0 alone)
            view = torch.randint(0, self.views, (n,), generator=g)
        elif views == "fresh":
            view = torch.randint(0, 2**30, (n,), generator=g)
        else:
            view = torch.zeros(n, dtype=torch.long)
        for samples in order.split(batch_size):
            if shard is not None:
                samples = samples[parallel.shard(len(samples), *shard)]
            v = view[samples]
            rows = self._rows(samples, v if views == "cached" else torch.zeros_like(v))
            # index_select, not t[samples]: advanced indexing of a (N, 1, 28, 28) tensor costs
            # 60 us a batch against 10 (a step of a small MLP is ~1 ms)
            x = self.model_input({k: t.index_select(0, samples) for k, t in self.inputs.items()},
                                 self.ids[samples.numpy()], v)
            yield {"x": x, **{name: target.index_select(0, rows) for name, target in self.targets.items()}}


def concat(sets: list[SampleSet]) -> SampleSet:
    first = sets[0]
    return dataclasses.replace(first, inputs={k: torch.cat([s.inputs[k] for s in sets]) for k in first.inputs},
                               ids=np.concatenate([s.ids for s in sets]),
                               targets={k: torch.cat([s.targets[k] for s in sets]) for k in first.targets},
                               counts=None if first.counts is None else torch.cat([s.counts for s in sets]))


# A task's reader of one transfer split's samples with their rows: (split, row offset over the
# transfer splits, the cache parts to read or None for all) -> SampleSet
ReadSplit = Callable[[str, int, "list[int] | None"], SampleSet]


def sample_range(cache: Cache, split: str, parts: list[int] | None) -> tuple[int, int]:
    """The prepared samples [first, last) whose rows are the given cache parts (all: None)."""
    info = cache.split(split)
    if parts is None:
        return 0, info["samples"]
    size = cache.manifest["label"]["part_size"]  # part i holds the rows of samples [i * size, (i + 1) * size)
    return parts[0] * size, min((parts[-1] + 1) * size, info["samples"])


@dataclass
class StreamingSet:
    """The same rows as the in-memory set, read part by part through a shuffle buffer.

    Each epoch visits the cache parts of every transfer split in a seeded random order,
    gathers parts until the buffer holds `buffer_samples`, and yields shuffled batches from
    it. Memory: the buffer plus one part.
    """

    cache: Cache
    transfer: list[str]
    read: ReadSplit
    buffer_samples: int

    def __len__(self) -> int:
        return sum(self.cache.split(s)["samples"] for s in self.transfer)

    def _units(self) -> list[tuple[str, int, int]]:
        units, offset = [], 0
        for split in self.transfer:
            info = self.cache.split(split)
            units += [(split, index, offset) for index in range(len(info["parts"]))]
            offset += info["rows"]
        return units

    def batches(self, epoch: int, batch_size: int, seed: int, views: str = "none",
                shard: tuple[int, int] | None = None) -> Iterator[Batch]:
        """Exactly ceil(len / batch_size) batches, like the in-memory set: rows that do not
        fill a whole batch are carried over to the next buffer. Every rank reads every part
        (the buffers, hence the batches, are the same on all ranks); `shard` as in `SampleSet`."""
        units = self._units()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        buffer: list[SampleSet] = []
        held = 0
        for position, unit in enumerate(torch.randperm(len(units), generator=g).tolist()):
            split, index, offset = units[unit]
            buffer.append(self.read(split, offset, [index]))
            held += len(buffer[-1])
            last = position == len(units) - 1
            if held >= self.buffer_samples or last:
                merged = concat(buffer)
                order = torch.randperm(len(merged), generator=g)
                whole = len(merged) if last else len(merged) // batch_size * batch_size
                # Each buffer gets its own shuffle seed, derived from (seed, epoch, position).
                kept = merged.subset(order[:whole])
                yield from kept.batches(epoch * len(units) + position, batch_size, seed, views, shard)
                buffer = [merged.subset(order[whole:])]
                held = len(buffer[0])


def transfer_set(cache: Cache, cfg: StudentConfig, read: ReadSplit, input_bytes: float,
                 memory_mb: float = 2048) -> SampleSet | StreamingSet:
    """The student's training rows over its transfer splits, read by the task's `read`: in
    memory if they fit `memory_mb` (a sample's input taking `input_bytes`), else streamed."""
    per_sample = bytes_per_sample(cache, cfg, input_bytes)
    if estimated_bytes(cache, cfg, input_bytes) <= memory_mb * 2**20:
        offsets = np.cumsum([0] + [cache.split(s)["rows"] for s in cfg.transfer])
        return concat([read(s, int(o), None) for s, o in zip(cfg.transfer, offsets)])
    part_samples = cache.manifest["label"]["part_size"]
    buffer = max(part_samples, int(memory_mb * 2**20 / max(1.0, per_sample)) // 2)
    return StreamingSet(cache, list(cfg.transfer), read, buffer_samples=buffer)


def bytes_per_sample(cache: Cache, cfg: StudentConfig, input_bytes: float) -> float:
    """A sample's bytes in memory: its input and its cache rows."""
    k = cache.manifest["top_k"]
    per_row = k * (8 + 4) + 8 + 8 + 4  # top-k idx (int64) + logits (float32) + label + row + lse
    per_row += len(needed_samples(cfg)) * ((cache.draws or 0) * (4 + 4) + 4)  # sampled idx, count (int32), entropy
    for layer in cfg.loss.teacher_layers(cfg.where):
        per_row += 2 * math.prod(cache.feature_spec(layer)["shape"])
    rows = (sum(cache.split(s)["rows"] for s in cfg.transfer)
            / max(1, sum(cache.split(s)["samples"] for s in cfg.transfer)))
    return input_bytes + 8 + rows * per_row


def estimated_bytes(cache: Cache, cfg: StudentConfig, input_bytes: float) -> float:
    return sum(cache.split(s)["samples"] for s in cfg.transfer) * bytes_per_sample(cache, cfg, input_bytes)
