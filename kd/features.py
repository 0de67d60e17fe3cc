"""Intermediate activations of named modules, captured with forward hooks.

Used on both sides: the teacher's taps feed the cache (`kd label`), the student's taps feed
the feature losses (`kd distill`). A feature mode turns an activation into what is cached:
`full` (as is), `pooled` (global average over spatial axes -> (B, C)), `attention` (the
Zagoruyko & Komodakis spatial attention map -> (B, H*W)).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kd.errors import ConfigError
from kd.losses import attention_map


def reduce(feature: torch.Tensor, mode: str) -> torch.Tensor:
    # feature: (B, C, *spatial) or (B, D)
    if mode == "full":
        return feature
    if mode == "pooled":
        return feature.flatten(2).mean(2) if feature.dim() > 2 else feature
    if mode == "attention":
        if feature.dim() < 3:
            raise ConfigError(f"feature mode 'attention' needs a spatial map, got shape {tuple(feature.shape[1:])}")
        return attention_map(feature)
    raise ConfigError(f"feature mode {mode!r}: expected full, pooled or attention")


def find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        layers = ", ".join(n for n in modules if n) or "none"
        raise ConfigError(f"layer {name!r} not found in {type(model).__name__} (layers: {layers})")
    return modules[name]


@contextmanager
def tap(model: nn.Module, layers: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, `captured[layer]` holds the latest output of each named module."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        def hook(_module, _inputs, output, name=name):
            captured[name] = output
        handles.append(find_module(model, name).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
