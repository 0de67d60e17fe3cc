"""What `kd label` asks of a task: its `Inputs` (prepared samples -> teacher inputs -> cache rows)
and the `Batch` of rows they hand the writer.

The writer knows no task: `label` is given a task's `Inputs` class (`kd.tasks.image.Inputs`,
...), builds it for the prepared splits, and asks it only what `Inputs` below lists. This is
the cache layer's one extension point for a new kind of data; the task modules import it from
here (the cache layer imports no task).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from kd.config import LabelConfig


@dataclass
class Batch:
    """One batch of cache rows from the teacher, as a task's `Inputs.batch` gives it to the writer."""

    ids: np.ndarray  # (R,) int64
    view: np.ndarray  # (R,) int32
    position: np.ndarray | None  # (R,) int32 for token rows
    logits: torch.Tensor  # (R, C) float32, or a language model's on its device in its dtype
    features: dict[str, np.ndarray]  # layer -> (R, *shape) float16
    truth: np.ndarray  # (R,) int64: the true class / next token, -1 where unknown
    scored: np.ndarray  # (R,) bool: rows the fidelity statistics and teacher accuracy count
    input_token: np.ndarray | None = None  # (R,) int32 for masked rows: the token the model saw


class Inputs(Protocol):
    """A task's teacher inputs for the prepared splits, built as `Inputs(prepared, splits, cfg)`.

    `per_sample` is the most cache rows one sample gives (1 + views for images); `row_columns`
    the task's int32 cache columns between `view` and the soft targets (`position`,
    `input_token`), in the order `Batch` fills them.
    """

    per_sample: int
    row_columns: tuple[str, ...]

    def __init__(self, prepared: Path, splits: list[str], cfg: LabelConfig) -> None: ...

    def samples(self, split: str) -> int: ...

    def row_counts(self, split: str) -> np.ndarray:
        """(samples,) int64: the cache rows of each sample of `split`."""

    def check_teacher(self, teacher: Any, prepared: Path) -> None:
        """Raise InputError for a teacher (`writer.Teacher`) that cannot label these inputs."""

    def header(self) -> dict[str, Any]:
        """The task's own manifest keys (`input_shape`, a token cache's `text`)."""

    def teacher_scores(self, model: nn.Module) -> dict[str, float]:
        """The task's own scores of the teacher, measured once when the manifest is started and
        kept in it as `teacher_scores` when there are any (instruction data: its exact match on
        the test turns); {} for none."""

    def probe(self) -> torch.Tensor:
        """One input for the probe forward pass (`writer.plan`)."""

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def feature_spec(self, layer: str, mode: str, captured: Any) -> dict[str, Any]:
        """The manifest's spec of one cached layer, from its probe activation."""

    def read(self, source: Path, first: int, last: int) -> Any:
        """Samples [first, last) of a prepared split, as `batch` takes them."""

    def batch(self, model: nn.Module, rows: Any, start: int, stop: int, specs: dict[str, dict]) -> Batch:
        """The cache rows of samples [start, stop) of `rows` (`read`), with the layers in `specs`."""
