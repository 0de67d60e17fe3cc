"""What every loss method shares: the base of its config (`Method`: by default it needs no
temperature, no sampled targets and no layer; `LayerPair` names a teacher and a student layer), what it adds to
training (`Built`), the shapes its builder sees (`Shapes`), and the pooling helpers that line
a student layer up with a cached one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import ConfigError
from kd.training import Term


class Method:
    """A method's config: checked by `check(where)`; says which cached temperatures (lse
    columns), teacher layers (with the cache modes that serve) and student layers it reads."""

    def check(self, where: str) -> None:
        for key in ("weight", "distance", "angle"):
            if getattr(self, key, 0) < 0:
                raise ConfigError(f"{where}.{key}: {getattr(self, key)} must be >= 0")

    def temperatures(self) -> list[float]:
        return []

    def sampled_temperatures(self) -> list[float]:
        """The temperatures whose sampled targets (`label.sampling`) it reads."""
        return []

    def teacher_layers(self) -> list[tuple[str, tuple[str, ...]]]:
        return []

    def student_layers(self) -> list[str]:
        return []


@dataclass
class LayerPair(Method):
    """A method between one cached teacher layer (in one of MODES) and one student layer."""

    teacher_layer: str = ""
    student_layer: str = ""
    MODES = ("pooled", "full")

    def check(self, where: str) -> None:
        for key in ("teacher_layer", "student_layer"):
            if not getattr(self, key):
                raise ConfigError(f"{where}.{key}: missing (a layer name)")
        super().check(where)

    def teacher_layers(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(self.teacher_layer, self.MODES)]

    def student_layers(self) -> list[str]:
        return [self.student_layer]


@dataclass
class Built:
    """What one loss method adds to training: named terms, student layers to tap, and modules
    (regressors, projections) trained with the student and dropped afterwards."""

    terms: dict[str, tuple[float, Term]]
    taps: list[str] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)


@dataclass
class Shapes:
    """Per-sample shapes the builders need: student layers (probed) and cached teacher layers."""

    student: dict[str, list[int]]
    teacher: dict[str, dict[str, Any]]  # layer -> manifest feature spec (mode, shape, source_shape)


def pool_to(feature: torch.Tensor, spatial: list[int]) -> torch.Tensor:
    # feature: (B, C, *S) -> (B, C, *spatial) by adaptive average pooling (a no-op when equal)
    if list(feature.shape[2:]) == list(spatial):
        return feature
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}[len(spatial)]
    return pool(feature, spatial)


def vector(feature: torch.Tensor) -> torch.Tensor:
    # (B, C, *S) -> (B, C) by global average pooling; (B, D) unchanged
    return feature.flatten(2).mean(2) if feature.dim() > 2 else feature
