"""Deterministic augmentation: each view is a pure function of (sample id, view, seed).

The teacher labels view v of sample `id` once; the student later regenerates exactly the
same input from the same three numbers, bit for bit, so cached soft targets always match
the pixels the student sees ("consistent teaching", Beyer et al. 2022). View 0 is the
input as is. The recipe is a random shift of up to `max_shift` positions along each
spatial axis with zero fill (images: H and W; 1-D signals: L).
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # x: uint64 array; a well-mixed 64-bit hash of each element (Steele et al., SplitMix64).
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def view_shifts(ids: np.ndarray, views: np.ndarray, seed: int, max_shift: int, axes: int) -> np.ndarray:
    """(N, axes) integer shifts in [-max_shift, max_shift]; all zero where view == 0."""
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    views = np.asarray(views, dtype=np.int64)
    with np.errstate(over="ignore"):
        key = _splitmix64(ids ^ _splitmix64(np.uint64(seed) * np.uint64(1_000_003) + views.astype(np.uint64)))
    span = np.uint64(2 * max_shift + 1)
    shifts = np.empty((len(ids), axes), dtype=np.int64)
    for axis in range(axes):
        key = _splitmix64(key + np.uint64(axis))
        shifts[:, axis] = (key % span).astype(np.int64) - max_shift
    shifts[views == 0] = 0
    return shifts


def spatial_axes(input_shape: list[int]) -> int:
    """How many trailing axes are spatial: 2 for (C, H, W), 1 for (L,) or (C, L)."""
    return 2 if len(input_shape) == 3 else 1


def apply_views(x: torch.Tensor, ids: np.ndarray, views: np.ndarray, input_shape: list[int],
                seed: int, max_shift: int) -> torch.Tensor:
    """The inputs for (id, view) pairs: x (N, D) flattened -> (N, D), view 0 left as is."""
    views = np.asarray(views)
    if max_shift == 0 or not views.any():
        return x
    axes = spatial_axes(input_shape)
    shifts = view_shifts(ids, views, seed, max_shift, axes)
    out = x.clone()
    images = x.reshape(len(x), *input_shape)
    shaped = out.view(len(x), *input_shape)
    # One vectorised slice copy per distinct shift: at most (2s+1)^axes groups, no per-row loop.
    groups, inverse = np.unique(shifts, axis=0, return_inverse=True)
    for g, shift in enumerate(groups):
        if not shift.any():
            continue
        rows = torch.from_numpy(np.flatnonzero(inverse.reshape(-1) == g))
        shaped[rows] = _shift(images[rows], shift)
    return out


def _shift(batch: torch.Tensor, shift: np.ndarray) -> torch.Tensor:
    # batch: (n, ..., *spatial); shift: one offset per trailing spatial axis, zero fill.
    out = torch.zeros_like(batch)
    src, dst = [slice(None)] * batch.dim(), [slice(None)] * batch.dim()
    for axis, s in zip(range(batch.dim() - len(shift), batch.dim()), shift.tolist()):
        size = batch.shape[axis]
        if s >= 0:
            src[axis], dst[axis] = slice(0, size - s), slice(s, size)
        else:
            src[axis], dst[axis] = slice(-s, size), slice(0, size + s)
    out[tuple(dst)] = batch[tuple(src)]
    return out
