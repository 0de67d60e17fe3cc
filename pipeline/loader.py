"""Feeding a student: prepared samples lined up with their cache rows, for every task.

`read_rows` is the one reader of cache rows for training: it reads only the columns and
arrays the student's methods ask for (the top-k, the lse of their temperatures, the cached
layers), checks that the rows belong to the prepared samples (ids, in order) and gives
`CacheRows`, whose `targets` are the per-row batch keys the loss terms read. `hard_labels`
states once what `loss.hard` means for a row.

Image samples are served in one of two ways, chosen by size against a memory budget:
- `TransferSet`: everything the student needs in memory (the default when it fits);
- `StreamingSet`: cache parts in a shuffled order through a shuffle buffer, so memory
  stays bounded by the buffer whatever the number of rows.
Either way only the columns and arrays the student asks for are read: the top-k, the lse
of its temperature, its hard labels and its cached layers. Each sample has `views` cache
rows (view 0 first); the input of (sample, view v) is regenerated from (id, v, seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline import augment, parallel
from pipeline.prepared import images as data
from pipeline.cache import Cache, SoftTargets
from pipeline.config import StudentConfig
from pipeline.errors import StaleCacheError
from pipeline.methods import needed_temperatures
from pipeline.methods.hard import HardTerm
from pipeline.training import Batch


@dataclass
class CacheRows:
    """What the cache gives a training step, row for row in cache order (sample-major)."""

    ids: np.ndarray  # (R,) int64: each row's sample id, checked against the prepared split
    row: torch.Tensor  # (R,) int64: the row's index over the student's transfer splits
    topk_idx: torch.Tensor  # (R, k) int64
    topk_logit: torch.Tensor  # (R, k) float32, max-shifted as cached
    lse: dict[float, torch.Tensor]  # temperature -> (R,) float32
    label: torch.Tensor  # (R,) int64: `hard_labels`, -1 for none
    features: dict[str, torch.Tensor]  # teacher layer -> (R, *shape), float16 as cached

    def targets(self, cfg: StudentConfig) -> dict[str, torch.Tensor]:
        """The per-row batch keys: row, topk_idx, topk_logit, label, lse (at the soft term's
        temperature) and teacher.<layer> for each cached layer."""
        targets = {"row": self.row, "topk_idx": self.topk_idx, "topk_logit": self.topk_logit, "label": self.label}
        if cfg.loss.soft is not None:
            targets["lse"] = self.lse[float(cfg.loss.soft.temperature)]
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
    samples `sample_ids` read from `source`, each with `cache.views` rows; `truth` (R,) is each
    row's true label, -1 where unknown. Refuses rows of other samples."""
    soft = cache.soft_targets(split, needed_temperatures(cfg), parts=parts)
    if not np.array_equal(soft.ids[::cache.views], sample_ids):
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
                     lse={t: torch.tensor(v) for t, v in soft.lse.items()},
                     label=torch.from_numpy(hard_labels(cfg.loss.hard, truth, soft)), features=features)


@dataclass
class TransferSet:
    """Inputs in memory, one row per sample, plus per-cache-row targets.

    x: (N, D) float32; ids: (N,) int64. Row of (sample i, view v) = i * views + v. `targets`
    maps a name to a tensor with one row per cache row (top-k, lse, hard label with -1 for
    none, cached features, the global cache row index `row`, ...).
    """

    x: torch.Tensor
    ids: np.ndarray
    input_shape: list[int]
    targets: dict[str, torch.Tensor]
    views: int = 1
    view_seed: int = 0
    view_shift: int = 0

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, samples: torch.Tensor) -> "TransferSet":
        """The given samples (indices into this set) with all their cache rows."""
        rows = (samples[:, None] * self.views + torch.arange(self.views)).reshape(-1)
        return TransferSet(x=self.x[samples], ids=self.ids[samples.numpy()], input_shape=self.input_shape,
                           targets={k: t[rows] for k, t in self.targets.items()}, views=self.views,
                           view_seed=self.view_seed, view_shift=self.view_shift)

    def batches(self, epoch: int, batch_size: int, seed: int, views: str = "none",
                shard: tuple[int, int] | None = None) -> Iterator[Batch]:
        """Shuffled batches for one epoch, seeded by (seed, epoch).

        views: "none" = view 0 only; "cached" = each sample draws one of its cached views;
        "fresh" = a new random view per sample and epoch (teacher training; no cached targets).
        shard (rank, world size): the same batches, each cut to this rank's slice
        (`parallel.shard`); only those rows are augmented and gathered.
        """
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        n = len(self.x)
        order = torch.randperm(n, generator=g)
        if views == "cached" and self.views > 1:  # (a baseline twin's set has view 0 alone)
            view = torch.randint(0, self.views, (n,), generator=g)
        elif views == "fresh":
            view = torch.randint(0, 2**30, (n,), generator=g)
        else:
            view = torch.zeros(n, dtype=torch.long)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            if shard is not None:
                rows = rows[parallel.shard(len(rows), *shard)]
            v = view[rows]
            x = augment.apply_views(self.x[rows], self.ids[rows.numpy()], v.numpy(), self.input_shape,
                                    self.view_seed, self.view_shift)
            cache_rows = rows * self.views + v if views == "cached" else rows * self.views
            batch = {"x": x.view(len(rows), *self.input_shape)}
            for name, target in self.targets.items():
                batch[name] = target[cache_rows]
            yield batch


def _rows(cache: Cache, prepared: Path, cfg: StudentConfig, split: str, row_offset: int,
          parts: list[int] | None = None) -> TransferSet:
    """The student's rows of one split (or of some of its parts), as an in-memory set."""
    source = prepared / f"{split}.parquet"
    info = cache.split(split)
    chosen = [info["parts"][i] for i in parts] if parts else info["parts"]
    first = chosen[0]["first_row"] // cache.views if chosen else 0
    samples = data.read_rows(source, first, first + sum(p["rows"] for p in chosen) // cache.views)
    rows = read_rows(cache, cfg, split, source, samples.ids, np.repeat(samples.y, cache.views), parts=parts,
                     row_offset=row_offset)
    targets = rows.targets(cfg)
    return TransferSet(x=torch.tensor(samples.x), ids=np.array(samples.ids), input_shape=samples.input_shape,
                       targets=targets, views=cache.views, view_seed=cache.manifest["views"]["seed"],
                       view_shift=cache.manifest["views"]["recipe"]["max_shift"])


def _concat(sets: list[TransferSet]) -> TransferSet:
    first = sets[0]
    return TransferSet(x=torch.cat([s.x for s in sets]), ids=np.concatenate([s.ids for s in sets]),
                       input_shape=first.input_shape,
                       targets={k: torch.cat([s.targets[k] for s in sets]) for k in first.targets},
                       views=first.views, view_seed=first.view_seed, view_shift=first.view_shift)


@dataclass
class StreamingSet:
    """The same rows as `TransferSet`, read part by part through a shuffle buffer.

    Each epoch visits the cache parts of every transfer split in a seeded random order,
    gathers parts until the buffer holds `buffer_samples`, and yields shuffled batches from
    it. Memory: the buffer plus one part.
    """

    cache: Cache
    prepared: Path
    cfg: StudentConfig
    buffer_samples: int

    def __len__(self) -> int:
        return sum(self.cache.split(s)["samples"] for s in self.cfg.transfer)

    def _units(self) -> list[tuple[str, int, int]]:
        units, offset = [], 0
        for split in self.cfg.transfer:
            info = self.cache.split(split)
            units += [(split, index, offset) for index in range(len(info["parts"]))]
            offset += info["rows"]
        return units

    def batches(self, epoch: int, batch_size: int, seed: int, views: str = "none",
                shard: tuple[int, int] | None = None) -> Iterator[Batch]:
        """Exactly ceil(len / batch_size) batches, like the in-memory set: rows that do not
        fill a whole batch are carried over to the next buffer. Every rank reads every part
        (the buffers, hence the batches, are the same on all ranks); `shard` as in `TransferSet`."""
        units = self._units()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        buffer: list[TransferSet] = []
        held = 0
        for position, unit in enumerate(torch.randperm(len(units), generator=g).tolist()):
            split, index, offset = units[unit]
            buffer.append(_rows(self.cache, self.prepared, self.cfg, split, offset, parts=[index]))
            held += len(buffer[-1])
            last = position == len(units) - 1
            if held >= self.buffer_samples or last:
                merged = _concat(buffer)
                order = torch.randperm(len(merged), generator=g)
                whole = len(merged) if last else len(merged) // batch_size * batch_size
                # Each buffer gets its own shuffle seed, derived from (seed, epoch, position).
                kept = merged.subset(order[:whole])
                yield from kept.batches(epoch * len(units) + position, batch_size, seed, views, shard)
                buffer = [merged.subset(order[whole:])]
                held = len(buffer[0])


def transfer_set(cache: Cache, prepared: Path, cfg: StudentConfig, memory_mb: float = 2048):
    """The student's training rows: in memory if they fit `memory_mb`, else streamed."""
    if estimated_bytes(cache, cfg) <= memory_mb * 2**20:
        offsets = np.cumsum([0] + [cache.split(s)["rows"] for s in cfg.transfer])
        return _concat([_rows(cache, prepared, cfg, s, int(o)) for s, o in zip(cfg.transfer, offsets)])
    part_samples = cache.manifest["label"]["part_size"]
    buffer = max(part_samples, int(memory_mb * 2**20 / max(1, _bytes_per_sample(cache, cfg))) // 2)
    return StreamingSet(cache, prepared, cfg, buffer_samples=buffer)


def _bytes_per_sample(cache: Cache, cfg: StudentConfig, input_bytes: float | None = None) -> float:
    """A sample's bytes in memory: its input (an image's float32 values unless given) and its rows."""
    k = cache.manifest["top_k"]
    per_row = k * (8 + 4) + 8 + 8 + 4  # top-k idx (int64) + logits (float32) + label + row + lse
    for layer in cfg.loss.teacher_layers(cfg.where):
        per_row += 2 * math.prod(cache.feature_spec(layer)["shape"])
    inputs = 4 * math.prod(cache.manifest["input_shape"]) if input_bytes is None else input_bytes
    return inputs + 8 + cache.views * per_row


def estimated_bytes(cache: Cache, cfg: StudentConfig, input_bytes: float | None = None) -> float:
    return len(StreamingSet(cache, Path(), cfg, 0)) * _bytes_per_sample(cache, cfg, input_bytes)


def baseline_set(prepared: Path) -> TransferSet:
    """The labeled split with its true labels: what a baseline twin trains on."""
    rows = data.read_split(prepared / "labeled.parquet")
    return TransferSet(x=torch.tensor(rows.x), ids=np.array(rows.ids), input_shape=rows.input_shape,
                       targets={"label": torch.tensor(rows.y)})
