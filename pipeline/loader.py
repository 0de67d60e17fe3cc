"""Feeding a student: prepared inputs lined up with the cached teacher targets.

Two ways to serve the same rows, chosen by size against a memory budget:
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

Batch = dict[str, torch.Tensor]


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
        if views == "cached":
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
            cache_rows = rows * self.views + (v if views == "cached" else 0)
            batch = {"x": x.view(len(rows), *self.input_shape)}
            for name, target in self.targets.items():
                batch[name] = target[cache_rows]
            yield batch


def needed_temperatures(cfg: StudentConfig) -> list[float]:
    temps = []
    if cfg.loss.soft is not None:
        temps.append(cfg.loss.soft.temperature)
    if cfg.loss.hard is not None and cfg.loss.hard.pseudo and cfg.loss.hard.threshold > 0:
        temps.append(1)  # the teacher's top-1 probability at T=1 decides confidence
    return list(dict.fromkeys(float(t) for t in temps))


def hard_labels(cfg: StudentConfig, split: str, y: np.ndarray, soft: SoftTargets, views: int) -> np.ndarray:
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


def _rows(cache: Cache, prepared: Path, cfg: StudentConfig, split: str, row_offset: int,
          parts: list[int] | None = None) -> TransferSet:
    """The student's rows of one split (or of some of its parts), as an in-memory set."""
    source = prepared / f"{split}.parquet"
    soft = cache.soft_targets(split, needed_temperatures(cfg), parts=parts)
    first_row = cache.split(split)["parts"][parts[0]]["first_row"] if parts else 0
    samples = data.read_rows(source, first_row // cache.views, first_row // cache.views + len(soft.ids) // cache.views)
    if not np.array_equal(soft.ids[::cache.views], samples.ids):
        raise StaleCacheError(f"{cache.root}: ids of split {split} differ from {source}; run `kd label` again")
    targets = {
        "row": torch.arange(row_offset + first_row, row_offset + first_row + len(soft.ids)),
        "topk_idx": torch.tensor(soft.topk_idx, dtype=torch.long),
        "topk_logit": torch.tensor(soft.topk_logit, dtype=torch.float32),
        "label": torch.from_numpy(hard_labels(cfg, split, samples.y, soft, cache.views)),
    }
    if cfg.loss.soft is not None:
        targets["lse"] = torch.tensor(soft.lse[float(cfg.loss.soft.temperature)])
    for layer in cfg.loss.teacher_layers(cfg.where):
        # float16 as cached; terms upcast per batch, which halves the memory of big maps
        block = cache.feature(split, layer)[first_row:first_row + len(soft.ids)]
        targets[f"teacher.{layer}"] = torch.from_numpy(np.ascontiguousarray(block))
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


def _bytes_per_sample(cache: Cache, cfg: StudentConfig) -> float:
    k = cache.manifest["top_k"]
    per_row = k * (8 + 4) + 8 + 8 + 4  # top-k idx (int64) + logits (float32) + label + row + lse
    for layer in cfg.loss.teacher_layers(cfg.where):
        per_row += 2 * math.prod(cache.feature_spec(layer)["shape"])
    return 4 * math.prod(cache.manifest["input_shape"]) + 8 + cache.views * per_row


def estimated_bytes(cache: Cache, cfg: StudentConfig) -> float:
    return len(StreamingSet(cache, Path(), cfg, 0)) * _bytes_per_sample(cache, cfg)


def baseline_set(prepared: Path) -> TransferSet:
    """The labeled split with its true labels: what a baseline twin trains on."""
    rows = data.read_split(prepared / "labeled.parquet")
    return TransferSet(x=torch.tensor(rows.x), ids=np.array(rows.ids), input_shape=rows.input_shape,
                       targets={"label": torch.tensor(rows.y)})
