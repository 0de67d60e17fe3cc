"""Splitting a dataset into labeled / unlabeled / test: stratified by class, seeded.

`split` draws the three splits of the sizes in `prepare` from one pool, each class in
proportion to its share (`_stratified`, largest remainders); rows without a label are the
unlabeled pool. `split_preset` keeps a split the source names (an image folder's test/ or
unlabeled/, a `split` column) and draws the rest from its train rows. Splits are drawn in
DRAW_ORDER, which text documents are dealt in too (`sources.text.deal`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kd.config import SPLITS, PrepareConfig
from kd.errors import ConfigError, InputError
from kd.prepared.images import Split
from kd.sources.encoded import PRESETS, name_ids

# The order in which splits are drawn from each class: the test set does not change when the
# labeled or unlabeled sizes do, and the labeled set does not change with the unlabeled size.
# Text documents are dealt in the same order (`sources.text.deal`).
DRAW_ORDER = ("test", "labeled", "unlabeled")


def split(data: Split, cfg: PrepareConfig, source: str | Path,
          preset: np.ndarray | None = None) -> tuple[dict[str, Split], np.ndarray | None]:
    """labeled / unlabeled / test of the sizes in cfg, stratified by class, seeded by cfg.seed.

    Returns the splits (unlabeled with y = -1) and the unlabeled rows' true labels, or None
    when they are unknown (a user file whose unlabeled rows have null y). With `preset` (the
    split the source names for each row) see `split_preset`.
    """
    if preset is not None:
        return split_preset(data, cfg, source, preset)
    sizes = {"labeled": cfg.labeled, "unlabeled": cfg.unlabeled, "test": cfg.test}
    for name, size in sizes.items():
        if size is None:
            raise ConfigError(f"prepare.{name}: null (all rows) needs a source that names its {name} split "
                              "(an image folder's test/ or unlabeled/, a `split` column), as text datasets do; "
                              "give a number of samples")
    rng = np.random.default_rng(cfg.seed)
    has_label = data.y >= 0
    if has_label.all():  # every row labeled: all three splits are drawn by class
        _check_enough(len(data.y), sizes, ("labeled", "unlabeled", "test"), f"{source} has {len(data.y)} samples")
        rows = _stratified(data.y, sizes, rng)
        truth = data.y[rows["unlabeled"]]
    else:  # rows with null y are the unlabeled pool; labeled and test come from the others
        labeled_rows = np.flatnonzero(has_label)
        unlabeled_rows = np.flatnonzero(~has_label)
        _check_enough(len(labeled_rows), sizes, ("labeled", "test"), f"{source} has {len(labeled_rows)} labeled rows")
        _check_enough(len(unlabeled_rows), sizes, ("unlabeled",),
                      f"{source} has {len(unlabeled_rows)} rows with null y")
        drawn = _stratified(data.y[labeled_rows], {**sizes, "unlabeled": 0}, rng)
        rows = {name: labeled_rows[drawn[name]] for name in ("labeled", "test")}
        rows["unlabeled"] = rng.permutation(unlabeled_rows)[: cfg.unlabeled]
        truth = None
    splits = {name: data.take(rows[name]) for name in SPLITS}
    splits["unlabeled"].y = np.full(len(rows["unlabeled"]), -1, np.int64)
    return splits, truth


def split_preset(data: Split, cfg: PrepareConfig, source: str | Path,
                 preset: np.ndarray) -> tuple[dict[str, Split], np.ndarray | None]:
    """The splits when the source names some: a named split is kept.

    The source's `test` rows are the test split and its `unlabeled` rows the unlabeled split;
    its `train` rows give the labeled split and any split the source does not name (drawn by
    class in DRAW_ORDER, as `split` does). A size counts within its pool; null takes the whole
    pool, which only a pool serving one split allows. The unlabeled truth is known when the
    unlabeled rows all have labels.
    """
    pools = {name: np.flatnonzero(preset == name) for name in PRESETS}
    if not len(pools["train"]):
        raise InputError(f"{source}: no train rows (the source names splits {sorted(set(preset.tolist()))})")
    serves = {"test": "test" if len(pools["test"]) else "train", "labeled": "train",
              "unlabeled": "unlabeled" if len(pools["unlabeled"]) else "train"}
    rng = np.random.default_rng(cfg.seed)
    rows: dict[str, np.ndarray] = {}
    for pool in ("test", "unlabeled", "train"):
        names = [name for name in DRAW_ORDER if serves[name] == pool]
        if not names:
            continue
        where = pools[pool]
        sizes = {name: getattr(cfg, name) for name in names}
        if len(names) == 1 and sizes[names[0]] is None:
            sizes[names[0]] = len(where)
        for name, size in sizes.items():
            if size is None:
                raise ConfigError(f"prepare.{name}: null (all rows) needs its own split in {source}; its "
                                  f"{name} rows are drawn from the {pool} rows with {', '.join(names)}, "
                                  "so give a number")
        _check_enough(len(where), sizes, names, f"{source}: its {pool} split has {len(where)} samples")
        if pool == "unlabeled":
            rows["unlabeled"] = rng.permutation(where)[: sizes["unlabeled"]]
            continue
        unlabeled = where[data.y[where] < 0]
        if len(unlabeled):
            raise InputError(f"{source}: {name_ids(data.ids[unlabeled])} of the {pool} split have no label "
                             "(unlabeled rows belong in the unlabeled split)")
        drawn = _stratified(data.y[where], {**dict.fromkeys(SPLITS, 0), **sizes}, rng)
        rows.update({name: where[drawn[name]] for name in names})
    known = data.y[rows["unlabeled"]]
    truth = known if (known >= 0).all() else None
    splits = {name: data.take(rows[name]) for name in SPLITS}
    splits["unlabeled"].y = np.full(len(rows["unlabeled"]), -1, np.int64)
    return splits, truth


def _check_enough(available: int, sizes: dict[str, int], names: Sequence[str], what: str) -> None:
    asked = sum(sizes[n] for n in names)
    if asked > available:
        parts = " + ".join(f"{n} {sizes[n]}" for n in names) + (f" = {asked}" if len(names) > 1 else "")
        raise ConfigError(f"{what}; asked for {parts} (lower prepare.{'/'.join(names)})")


def _stratified(y: np.ndarray, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row indices into y for each split: per class in proportion to its share of y; shuffled."""
    classes, counts = np.unique(y, return_counts=True)
    weights = counts / counts.sum()
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]  # each class, shuffled
    used = np.zeros(len(classes), np.int64)
    rows = {}
    for name in DRAW_ORDER:
        take = _allocate(sizes[name], weights, counts - used)
        picked = [pool[u : u + t] for pool, u, t in zip(pools, used, take)]
        rows[name] = rng.permutation(np.concatenate(picked)) if picked else np.empty(0, np.int64)
        used += take
    return rows


def _allocate(n: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """n samples over classes, as close to n * weights as the capacity of each class allows."""
    ideal = n * weights
    take = np.minimum(np.floor(ideal).astype(np.int64), capacity)
    while (short := n - int(take.sum())) > 0:  # largest remainders first; ties to the lower class
        room = take < capacity
        assert room.any(), "callers check that the classes hold n samples"
        gap = np.where(room, ideal - take, -np.inf)
        take[np.argsort(-gap, kind="stable")[: min(short, int(room.sum()))]] += 1
    return take
