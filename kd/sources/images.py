"""Image datasets for `kd prepare`: loaded, checked, split and written.

`prepare(cfg, out)` loads `cfg.dataset` (a built-in of kind images or image_folder in
`builtin.SOURCES`; a Parquet file
with `x`, `sources.arrays`; or encoded images: an image folder or a Parquet file with an
`image` column, `sources.encoded`), checks it, splits it into labeled / unlabeled / test
(`sources.splits`: stratified by class, seeded; a split the source names is kept: its test
rows are the test split) and writes

    out/labeled.parquet, out/unlabeled.parquet, out/test.parquet
    out/unlabeled_truth.parquet          (only when the unlabeled rows' labels are known)

in the format of `kd.prepared.images` (encoded images as uint8 pixels with the labeled
split's per-channel mean and std, or `prepare.mean`/`prepare.std`). Rows are in a seeded
shuffled order. Everything is written into a directory beside `out` that replaces `out` only
once complete (`files.replacing`).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kd.config import PrepareConfig
from kd.errors import ConfigError, InputError
from kd.files import replacing
from kd.prepared import images as image_files
from kd.prepared.images import Norm, Split, check_shape
from kd.sources import encoded
from kd.sources.arrays import load_parquet
from kd.sources.builtin import SOURCES, kind_of
from kd.sources.encoded import name_ids
from kd.sources.splits import split


class Source(NamedTuple):
    """A loaded dataset: its rows, the split each row's source names (or None), class names."""

    data: Split
    preset: np.ndarray | None  # (N,) str in encoded.PRESETS
    classes: list[str] | None


@dataclass
class Prepared:
    """What `prepare` wrote: the splits as on disk (unlabeled y = -1) and the unlabeled truth."""

    splits: dict[str, Split]
    truth: np.ndarray | None  # (len(unlabeled),) int64, aligned with unlabeled's rows
    paths: dict[str, Path]
    classes: list[str] | None = None  # class id -> name, where the source names them


# --- config checks ----------------------------------------------------------------------------


def parse_shape(text: str, option: str = "--input-shape") -> list[int]:
    """'1,28,28' (or '[1, 28, 28]', '1x28x28') -> [1, 28, 28]."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("[]()").strip()) if p]
    try:
        shape = [int(p) for p in parts]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"{option}: {text!r} must be positive integers separated by commas, e.g. 1,28,28")
    return shape


def check_config(cfg: PrepareConfig) -> None:
    if cfg.seed is None:
        raise ConfigError("prepare.seed: null; give a number")
    for key in ("labeled", "unlabeled", "test", "seed"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise ConfigError(f"prepare.{key}: {getattr(cfg, key)} must be >= 0")
    if cfg.samples < 1:
        raise ConfigError(f"prepare.samples: {cfg.samples} must be >= 1")
    if cfg.input_shape is not None and (not cfg.input_shape or any(d < 1 for d in cfg.input_shape)):
        raise ConfigError(f"prepare.input_shape: {cfg.input_shape} must be a non-empty list of integers >= 1")
    if cfg.image_size is not None and (len(cfg.image_size) not in (1, 2) or any(d < 1 for d in cfg.image_size)):
        raise ConfigError(f"prepare.image_size: {cfg.image_size} must be [size] or [height, width], integers >= 1")
    for key in ("mean", "std"):
        if (getattr(cfg, key) is None) != (getattr(cfg, "std" if key == "mean" else "mean") is None):
            raise ConfigError(f"prepare.{key}: give prepare.mean and prepare.std together (or neither)")
    if cfg.std is not None and any(v <= 0 for v in cfg.std):
        raise ConfigError(f"prepare.std: {cfg.std} must all be > 0")
    if cfg.channels is not None and cfg.channels not in (1, 3):
        raise ConfigError(f"prepare.channels: {cfg.channels} must be 1, 3 or null (the data's own)")
    if cfg.store not in image_files.STORES:
        raise ConfigError(f"prepare.store: {cfg.store!r} must be one of {', '.join(image_files.STORES)}")


def is_user_file(dataset: str) -> bool:
    return dataset not in SOURCES and (dataset.endswith(".parquet") or Path(dataset).is_file())


# --- loading ----------------------------------------------------------------------------------


def load(cfg: PrepareConfig) -> Source:
    """All rows of `cfg.dataset`, checked; y = -1 where a user file's label is null."""
    check_config(cfg)
    preset = classes = None
    size = None if cfg.image_size is None else list(cfg.image_size) * (3 - len(cfg.image_size))
    kind = kind_of(cfg.dataset)
    if kind == "image_folder" or kind is None and (encoded.is_image_folder(cfg.dataset) or (
            is_user_file(cfg.dataset) and encoded.has_image_column(Path(cfg.dataset)))):
        images = load_encoded(cfg.dataset, size)
        data = Split(images.ids, images.x, images.y, images.input_shape, len(images.classes))
        preset, classes = images.preset, images.classes
    elif cfg.image_size is not None:
        raise ConfigError(f"prepare.image_size: {cfg.image_size} resizes encoded images (an image folder or a "
                          f"Parquet file with an `image` column); {cfg.dataset!r} is neither")
    elif kind == "images":
        data = SOURCES[cfg.dataset].make(cfg)
        if cfg.input_shape is not None:  # a built-in may be reshaped (e.g. flat for an MLP)
            check_shape(cfg.input_shape, data.x.shape[1], f"--input-shape / prepare.input_shape {cfg.input_shape}",
                         cfg.dataset, ConfigError)
            data.input_shape = list(cfg.input_shape)
    elif is_user_file(cfg.dataset):
        data = load_parquet(Path(cfg.dataset), cfg.input_shape)
    else:
        raise ConfigError(
            f"prepare.dataset: {cfg.dataset!r} is not a known dataset or an existing file or folder "
            f"(expected one of {', '.join(SOURCES)}, an image folder, or a path to a .parquet or .txt file)"
        )
    validate(data, cfg.dataset)
    if cfg.channels is not None:
        data = with_channels(data, cfg.channels, cfg.dataset)
    return Source(data, preset, classes)


def with_channels(data: Split, channels: int, source: str) -> Split:
    """`data` with `channels` channels (`prepare.channels`): grayscale repeated into RGB, or RGB
    to grayscale by ITU-R 601-2 luma (Pillow's "L": 0.299 R + 0.587 G + 0.114 B; rounded as
    Pillow rounds for uint8 pixels)."""
    have = data.input_shape[0]
    if channels == have:
        return data
    if len(data.input_shape) != 3 or {have, channels} != {1, 3}:
        raise ConfigError(f"prepare.channels: {channels} for {source}, whose inputs have shape {data.input_shape}; "
                          "kd converts images (C, H, W) between 1 and 3 channels")
    x = data.x.reshape(len(data.x), have, -1)  # (N, C, H*W)
    if channels == 3:
        x = np.repeat(x, 3, axis=1)
    elif x.dtype == np.uint8:
        weights = np.array([19595, 38470, 7471], np.uint32)  # 0.299, 0.587, 0.114 in 1/65536
        x = ((np.einsum("c,ncp->np", weights, x.astype(np.uint32)) + 0x8000) >> 16).astype(np.uint8)[:, None]
    else:
        x = np.einsum("c,ncp->np", np.array([0.299, 0.587, 0.114], x.dtype), x)[:, None]
    shape = [channels, *data.input_shape[1:]]
    return Split(data.ids, np.ascontiguousarray(x.reshape(len(x), -1)), data.y, shape, data.num_classes)


def load_encoded(dataset: str, size: list[int] | None) -> encoded.Images:
    """An image folder or a Parquet file of encoded images; a built-in image_folder is written
    into a scratch folder first and read like any other."""
    if kind_of(dataset) == "image_folder":
        with tempfile.TemporaryDirectory() as scratch:
            return encoded.load_folder(SOURCES[dataset].make(Path(scratch)), size)
    path = Path(dataset)
    return (encoded.load_folder if path.is_dir() else encoded.load_parquet)(path, size)


def validate(data: Split, source: str | Path) -> None:
    """Checks every dataset passes: rows present, finite inputs, labels >= 0, unique ids."""
    if len(data.ids) == 0:
        raise InputError(f"{source}: the dataset has no rows")
    finite = np.isfinite(data.x).all(axis=1)
    if not finite.all():
        raise InputError(f"{source}: x has NaN or Inf values in {(~finite).sum()} rows, {name_ids(data.ids[~finite])}")
    unique, counts = np.unique(data.ids, return_counts=True)
    if len(unique) < len(data.ids):
        raise InputError(f"{source}: column 'id' must be unique; duplicated: {name_ids(unique[counts > 1])}")


# --- writing ----------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig, out: Path) -> Prepared:
    """Load, check, split and write `cfg.dataset` to `out` (replaced as a whole when done)."""
    out = Path(out)
    data, preset, classes = load(cfg)
    splits, truth = split(data, cfg, cfg.dataset, preset)
    if data.x.dtype == np.uint8:  # pixels: stored as they are, with the normalisation to apply
        norm = normalisation(splits["labeled"], cfg)
        for part in splits.values():
            part.norm = norm
    elif cfg.store != "pixels":
        raise ConfigError(f"prepare.store: {cfg.store!r} stores 8-bit pixels; {cfg.dataset!r} has float inputs "
                          "(store: pixels)")
    meta = {"dataset": cfg.dataset, "classes": classes, "store": cfg.store}
    with replacing(out) as tmp:
        for name, part in splits.items():
            image_files.write_split(tmp / f"{name}.parquet", part, **meta)
        if truth is not None:
            image_files.write_truth(tmp / image_files.TRUTH_FILE, splits["unlabeled"].ids, truth, data.num_classes,
                                    cfg.dataset)
    paths = {name: out / f"{name}.parquet" for name in splits}
    if truth is not None:
        paths["unlabeled_truth"] = out / image_files.TRUTH_FILE
    return Prepared(splits, truth, paths, classes)


def normalisation(labeled: Split, cfg: PrepareConfig) -> Norm:
    """`prepare.mean`/`std` if given, else the labeled split's per-channel mean and std of
    pixel / 255 (a constant channel gets std 1)."""
    channels = labeled.input_shape[0]
    if cfg.mean is not None:
        for key in ("mean", "std"):
            if len(getattr(cfg, key)) != channels:
                raise ConfigError(f"prepare.{key}: {getattr(cfg, key)} has {len(getattr(cfg, key))} values; the "
                                  f"images have {channels} channel(s)")
        return Norm([float(v) for v in cfg.mean], [float(v) for v in cfg.std])
    if not len(labeled.x):
        raise ConfigError("prepare.labeled: 0 rows leave no pixels to normalise by; set prepare.mean and prepare.std")
    pixels = labeled.x.reshape(len(labeled.x), channels, -1).transpose(1, 0, 2).reshape(channels, -1)
    mean = pixels.mean(axis=1, dtype=np.float64) / 255.0
    std = pixels.std(axis=1, dtype=np.float64) / 255.0
    return Norm([round(float(m), 6) for m in mean], [round(float(s), 6) if s > 0 else 1.0 for s in std])
