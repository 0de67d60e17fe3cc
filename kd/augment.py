"""Deterministic augmentation: each view is a pure function of (sample id, view, seed).

The teacher labels view v of sample `id` once; the student later regenerates exactly the
same input from the same three numbers, bit for bit, so cached soft targets always match
the pixels the student sees ("consistent teaching", Beyer et al. 2022; FKD, Shen & Xing
2022, caches the soft targets of each crop). View 0 is the input as is. A recipe is a dict,
recorded as it is in the cache manifest's `views.recipe`, so a student draws its views from
the cache's recipe, never from its own params:

- `{"name": "shift", "max_shift": s}`: a random shift of up to s positions along each
  spatial axis with zero fill (images: H and W; 1-D signals: L);
- `{"name": "crop_flip", "scale": [lo, hi], "ratio": [lo, hi], "flip": p}` (images only):
  torchvision's RandomResizedCrop, then RandomHorizontalFlip(p). The crop covers a fraction
  of the image's area drawn uniformly from `scale`, with an aspect ratio (width / height)
  drawn log-uniformly from `ratio`, at a uniform position, resized back to H x W by bilinear
  sampling. Unlike torchvision a crop that does not fit is clamped to the image (not drawn
  again up to 10 times), and crop corners are not rounded to whole pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kd.errors import ConfigError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

Recipe = dict[str, Any]
# crop_flip's view_scale, view_ratio and view_flip when a config leaves them null
CROP_FLIP_DEFAULTS = {"view_scale": [0.35, 1.0], "view_ratio": [3 / 4, 4 / 3], "view_flip": 0.5}


def shift(max_shift: int) -> Recipe:
    return {"name": "shift", "max_shift": max_shift}


def crop_flip(scale: list[float], ratio: list[float], flip: float) -> Recipe:
    return {"name": "crop_flip", "scale": [float(v) for v in scale], "ratio": [float(v) for v in ratio],
            "flip": float(flip)}


def from_config(cfg: Any, max_shift: int) -> Recipe:
    """The recipe of a config's views (`label`, `teacher`: its view_* keys, null for crop_flip's
    defaults) as the cache manifest records it; `max_shift`: the shift recipe's (`label.view_shift`,
    `teacher.shift`)."""
    if cfg.view_recipe == "shift":
        return shift(max_shift)
    values = {key: CROP_FLIP_DEFAULTS[key] if getattr(cfg, key) is None else getattr(cfg, key)
              for key in CROP_FLIP_DEFAULTS}
    return crop_flip(values["view_scale"], values["view_ratio"], values["view_flip"])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # x: uint64 array; a well-mixed 64-bit hash of each element (Steele et al., SplitMix64).
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _view_keys(ids: np.ndarray, views: np.ndarray, seed: int) -> np.ndarray:
    # (N,) uint64: one hash per (id, view, seed), the root of every draw for that view
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    views = np.asarray(views, dtype=np.int64)
    with np.errstate(over="ignore"):
        return _splitmix64(ids ^ _splitmix64(np.uint64(seed) * np.uint64(1_000_003) + views.astype(np.uint64)))


def view_shifts(ids: np.ndarray, views: np.ndarray, seed: int, max_shift: int, axes: int) -> np.ndarray:
    """(N, axes) integer shifts in [-max_shift, max_shift]; all zero where view == 0."""
    key = _view_keys(ids, views, seed)
    span = np.uint64(2 * max_shift + 1)
    shifts = np.empty((len(key), axes), dtype=np.int64)
    for axis in range(axes):
        key = _splitmix64(key + np.uint64(axis))
        shifts[:, axis] = (key % span).astype(np.int64) - max_shift
    shifts[np.asarray(views) == 0] = 0
    return shifts


def view_crops(ids: np.ndarray, views: np.ndarray, seed: int, recipe: Recipe, height: int, width: int) -> np.ndarray:
    """(N, 5) float64 per (id, view): crop left, top, width, height in pixels, and 1.0 where
    the crop is flipped (0.0 else); view 0 is the whole image, unflipped."""
    key = _view_keys(ids, views, seed)
    u = np.empty((len(key), 5))
    for i in range(5):  # five uniforms in [0, 1), 53 bits each
        key = _splitmix64(key + np.uint64(i))
        u[:, i] = (key >> np.uint64(11)).astype(np.float64) * 2.0**-53
    (s_lo, s_hi), (r_lo, r_hi) = recipe["scale"], recipe["ratio"]
    area = height * width * (s_lo + (s_hi - s_lo) * u[:, 0])
    ratio = np.exp(np.log(r_lo) + (np.log(r_hi) - np.log(r_lo)) * u[:, 1])
    w = np.minimum(np.sqrt(area * ratio), width)
    h = np.minimum(np.sqrt(area / ratio), height)
    boxes = np.stack([(width - w) * u[:, 2], (height - h) * u[:, 3], w, h,
                      (u[:, 4] < recipe["flip"]).astype(np.float64)], axis=1)
    boxes[np.asarray(views) == 0] = [0, 0, width, height, 0]
    return boxes


def check_shape(recipe: Recipe, input_shape: list[int], where: str) -> None:
    """Refuse a recipe the inputs cannot take: crop_flip needs (C, H, W) images."""
    if recipe["name"] == "crop_flip" and len(input_shape) != 3:
        raise ConfigError(f"{where}.view_recipe: crop_flip crops images (C, H, W); the prepared inputs have "
                          f"shape {list(input_shape)} (use shift)")


def spatial_axes(input_shape: list[int]) -> int:
    """How many trailing axes are spatial: 2 for (C, H, W), 1 for (L,) or (C, L)."""
    return 2 if len(input_shape) == 3 else 1


def apply_views(x: torch.Tensor, ids: np.ndarray, views: np.ndarray, input_shape: list[int],
                seed: int, recipe: Recipe) -> torch.Tensor:
    """The inputs for (id, view) pairs: x (N, D) flattened -> (N, D), view 0 left as is."""
    views = np.asarray(views)
    if not views.any() or (recipe["name"] == "shift" and recipe["max_shift"] == 0):
        return x
    out = x.clone()
    if recipe["name"] == "crop_flip":
        rows = np.flatnonzero(views != 0)
        images = x[torch.from_numpy(rows)].reshape(len(rows), *input_shape)
        boxes = view_crops(ids[rows], views[rows], seed, recipe, *input_shape[1:])
        out[torch.from_numpy(rows)] = _crop_flip(images, boxes).reshape(len(rows), -1)
        return out
    axes = spatial_axes(input_shape)
    shifts = view_shifts(ids, views, seed, recipe["max_shift"], axes)
    images = x.reshape(len(x), *input_shape)
    shaped = out.view(len(x), *input_shape)
    # One vectorised slice copy per distinct shift: at most (2s+1)^axes groups, no per-row loop.
    groups, inverse = np.unique(shifts, axis=0, return_inverse=True)
    for g, offsets in enumerate(groups):
        if not offsets.any():
            continue
        rows = torch.from_numpy(np.flatnonzero(inverse.reshape(-1) == g))
        shaped[rows] = _shift(images[rows], offsets)
    return out


def _crop_flip(images: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    # images: (n, C, H, W); boxes: (n, 5) from `view_crops` -> (n, C, H, W), every row in one
    # grid_sample call. The grid is built elementwise (no matmul), and bilinear grid_sample on
    # CPU treats each output pixel alone, so a row's pixels do not depend on the rest of the
    # batch: the student's regenerated view equals the teacher's bit for bit.
    n, _, height, width = images.shape
    left, top, w, h, flipped = (torch.from_numpy(c).to(torch.float32)[:, None, None] for c in boxes.T)
    # Output pixel centres in [-1, 1] (align_corners=False) map to the crop's, around its centre.
    xs = ((torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1)[None, None, :]
    ys = ((torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1)[None, :, None]
    x_scale = w / width * (1 - 2 * flipped)
    gx = (xs * x_scale + ((2 * left + w) / width - 1)).expand(n, height, width)
    gy = (ys * (h / height) + ((2 * top + h) / height - 1)).expand(n, height, width)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
