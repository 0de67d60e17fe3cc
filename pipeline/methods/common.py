"""What every loss method shares: what a method adds to training (`Built`), the shapes its
builder sees (`Shapes`), and the pooling helpers that line a student layer up with a cached one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.training import Term


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
