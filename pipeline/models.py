"""Architectures, and saving/loading models as safetensors plus a JSON config.

Built-in architectures are one explicit dict, `ARCHITECTURES`. A user's own is named as
`package.module:factory`; such a name is imported only when it comes from params.yaml or the
command line, never from a checkpoint or a cache (a file must not be able to run code).
Every factory takes `input_shape` and `num_classes` plus its own keyword arguments and returns
an nn.Module mapping (B, *input_shape) float32 to (B, num_classes) logits.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.files import file_sha256, read_json, write_json


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear. Layers: `hidden.<i>`, `head`."""

    def __init__(self, input_shape: list[int], num_classes: int, hidden: list[int] = (128,)):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(sizes, sizes[1:])
        )
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)


class CNN(nn.Module):
    """Conv stages with max-pooling, then an MLP head.

    Works on (C, H, W) images (2-D convs) and on (L,) or (C, L) signals (1-D convs).
    Named layers for feature distillation: `stages.<i>` (maps after each stage's pooling),
    `embed` (the penultimate vector), `head` (logits).
    """

    def __init__(
        self,
        input_shape: list[int],
        num_classes: int,
        widths: list[int] = (32, 64, 128),
        convs_per_stage: int = 2,
        hidden: int = 1024,
    ):
        super().__init__()
        shape = list(input_shape) if len(input_shape) > 1 else [1, *input_shape]
        spatial = shape[1:]
        conv, norm, pool = {
            1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
            2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d),
        }[len(spatial)]
        self.view_shape = shape
        stages, channels = [], shape[0]
        for width in widths:
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                layers += [conv(channels, width, 3, padding=1, bias=False), norm(width), nn.ReLU()]
                channels = width
            layers.append(pool(2))
            stages.append(nn.Sequential(*layers))
            spatial = [s // 2 for s in spatial]
        self.stages = nn.ModuleList(stages)
        flat = channels * math.prod(spatial)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.view_shape)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.embed(x))


WEIGHTS, CONFIG = "model.safetensors", "config.json"

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN}


def resolve(arch: str, *, allow_import: bool) -> Callable[..., nn.Module]:
    """The factory for `arch`: a built-in name, or `package.module:factory` if allowed."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if ":" not in arch:
        raise ConfigError(
            f"arch {arch!r}: unknown architecture (built-in: {', '.join(ARCHITECTURES)}; "
            "or package.module:factory)"
        )
    if not allow_import:
        raise ConfigError(
            f"arch {arch!r}: custom architectures are imported only when named in params.yaml "
            "or on the command line, never from a checkpoint or cache; pass it with --arch"
        )
    module_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"arch {arch!r}: cannot import ({exc})") from exc
    return factory


def build(arch: str, arch_kwargs: dict[str, Any], input_shape: list[int], num_classes: int,
          *, allow_import: bool = True) -> nn.Module:
    factory = resolve(arch, allow_import=allow_import)
    try:
        return factory(input_shape=list(input_shape), num_classes=num_classes, **arch_kwargs)
    except TypeError as exc:
        raise ConfigError(f"arch {arch!r}: bad arch_kwargs {arch_kwargs} ({exc})") from exc


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(directory: Path, model: nn.Module, config: dict[str, Any]) -> None:
    """Write `model.safetensors` and `config.json` (arch, kwargs, shapes, anything else given).

    Files are written under temporary names and renamed, so a crash never leaves a
    half-written model under its final name.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS
    tmp = weights.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp))
    tmp.replace(weights)
    meta = {**config, "params": count_params(model), "size_bytes": weights.stat().st_size}
    write_json(directory / CONFIG, meta)


def load_model(directory: Path, *, arch: str | None = None,
               arch_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_model`, in eval mode.

    `arch`/`arch_kwargs` come from the caller (params or CLI) and override the saved config;
    only they may name an importable `package.module:factory`.
    """
    weights, config_path = directory / WEIGHTS, directory / CONFIG
    for path in (weights, config_path):
        if not path.is_file():
            raise MissingInputError(f"{path}: not found")
    config = read_json(config_path)
    for key in ("arch", "input_shape", "num_classes"):
        if key not in config:
            raise InputError(f"{config_path}: missing key {key!r}")
    model = build(arch or config["arch"], arch_kwargs if arch_kwargs is not None else config.get("arch_kwargs", {}),
                  config["input_shape"], config["num_classes"], allow_import=arch is not None)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{weights}: not a safetensors file ({exc})") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:2]
        raise InputError(f"{weights}: weights do not match architecture {config['arch']!r}: {' '.join(first)}") from exc
    model.eval()
    return model, config


def fingerprint(directory: Path) -> str:
    """sha256 over the weights file and the config file: what identifies a teacher."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        digest.update(file_sha256(directory / name).encode())
    return digest.hexdigest()
