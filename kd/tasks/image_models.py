"""Image classifiers: architectures, and saving/loading them as safetensors plus a JSON config.

Built-in architectures are one explicit dict, `ARCHITECTURES` (`hf_image` is any Hugging Face
image-classification `model_type`, built from its config fields with random weights). A user's
own is named as `package.module:factory`; such a name is imported only when it comes from
params.yaml or the command line, never from a checkpoint or a cache (a file must not be able
to run code). The module is looked up from the working directory too, so a `models/` folder
beside dvc.yaml works (dvc.yaml lists it as a dependency of the stages that build models).

A factory's signature decides what kd passes (`factory_arguments`): `input_shape` and
`num_classes` where it names them (kd's own), else `num_classes` (torchvision-style; also
through `**kwargs`) plus `in_chans` / `in_channels` = the input's channels where it names them
(timm-style); `arch_kwargs` give the rest. Whatever the model returns, `logits_of` makes the
(B, num_classes) logits of it: a tensor, a tuple or list (its first item), or a dict or
`ModelOutput` (its `logits`). That adapter is a forward hook that `build` and
`load_hf_classifier` attach, so the teacher, `kd label`, the students and `kd eval` all call
`model(x)` and get a tensor.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kd.errors import ConfigError, InputError, MissingInputError
from kd.files import file_sha256, read_json, write_json
from kd.speed import count_params


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


def hf_image(input_shape: list[int], num_classes: int, model_type: str = "vit", **fields: Any) -> nn.Module:
    """A Hugging Face image classifier of `model_type` (vit, resnet, convnext, ...) with random
    weights; `fields` are its config's (e.g. hidden_size). Channels, size and classes come from
    the data."""
    from transformers import AutoConfig, AutoModelForImageClassification

    for key in IGNORED_HF_FIELDS:
        fields.pop(key, None)
    try:
        config = AutoConfig.for_model(model_type, num_labels=num_classes, **fields)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"arch hf_image: model_type {model_type!r}: {str(exc).splitlines()[0]}") from None
    config.num_channels = input_shape[0]
    if hasattr(config, "image_size") and len(input_shape) == 3:
        config.image_size = input_shape[1] if input_shape[1] == input_shape[2] else list(input_shape[1:])
    try:
        return AutoModelForImageClassification.from_config(config)
    except ValueError as exc:
        raise ConfigError(f"arch hf_image: model_type {model_type!r} has no image-classification model "
                          f"({str(exc).splitlines()[0]})") from None


# A saved Hugging Face config's fields that `hf_image` takes from the data or that name no design
IGNORED_HF_FIELDS = ("num_labels", "id2label", "label2id", "architectures", "transformers_version",
                     "_name_or_path", "num_channels", "image_size", "torch_dtype", "dtype")

WEIGHTS, CONFIG = "model.safetensors", "config.json"

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN, "hf_image": hf_image}


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
    if os.getcwd() not in sys.path:  # `kd` is a console script: the project root is not on the path
        sys.path.append(os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"arch {arch!r}: cannot import ({exc})") from exc
    return factory


def factory_arguments(arch: str, factory: Callable[..., Any], arch_kwargs: dict[str, Any],
                      input_shape: list[int], num_classes: int) -> dict[str, Any]:
    """What kd passes to `factory` besides `arch_kwargs`, decided by its signature."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (some builtins): kd's own convention
        return {"input_shape": list(input_shape), "num_classes": num_classes}
    kinds = {name: p.kind for name, p in signature.parameters.items()}
    named = {n for n, k in kinds.items()
             if k in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    described = f"{getattr(factory, '__qualname__', arch)}{signature}"
    given: dict[str, Any] = {}
    if "input_shape" in named:
        given["input_shape"] = list(input_shape)
    if "num_classes" in named or inspect.Parameter.VAR_KEYWORD in kinds.values():
        given["num_classes"] = num_classes
    for name in ("in_chans", "in_channels"):
        if name in named:
            given[name] = input_shape[0] if len(input_shape) > 1 else 1
    if "num_classes" not in given:
        raise ConfigError(f"arch {arch!r}: {described} takes no num_classes; kd passes num_classes, plus "
                          "input_shape, in_chans or in_channels where the factory names them")
    clash = sorted(set(given) & set(arch_kwargs))
    if clash:
        raise ConfigError(f"arch {arch!r}: arch_kwargs sets {', '.join(clash)}, which kd passes from the data; "
                          "remove it")
    try:
        signature.bind(**given, **arch_kwargs)
    except TypeError as exc:
        raise ConfigError(f"arch {arch!r}: bad arch_kwargs {arch_kwargs} for {described} ({exc})") from None
    return given


def build(arch: str, arch_kwargs: dict[str, Any], input_shape: list[int], num_classes: int,
          *, allow_import: bool = True) -> nn.Module:
    """A fresh model (seed torch first) whose forward returns (B, num_classes) logits."""
    factory = resolve(arch, allow_import=allow_import)
    given = factory_arguments(arch, factory, arch_kwargs, input_shape, num_classes)
    try:
        model = factory(**given, **arch_kwargs)
    except TypeError as exc:
        raise ConfigError(f"arch {arch!r}: bad arch_kwargs {arch_kwargs} ({exc})") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"arch {arch!r}: the factory returned {type(model).__name__}, expected a torch nn.Module")
    model = model if isinstance(model, (MLP, CNN)) else with_logits(model, arch)
    check_input(model, arch, input_shape)
    return model


def check_input(model: nn.Module, arch: str, input_shape: list[int]) -> None:
    """One forward of two zero inputs of the data's shape (no gradient, eval mode, no random
    numbers drawn): a model that cannot take them is refused before training, in one line."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    except ConfigError:  # already one line (an output without logits)
        raise
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = ("; set prepare.channels to the channels its first layer wants" if len(input_shape) == 3
                and "channels" in first else "")
        raise ConfigError(f"arch {arch!r}: cannot take the data's inputs of shape {input_shape} ({first}){hint}") \
            from None
    finally:
        model.train(training)


def logits_of(output: Any, arch: str) -> torch.Tensor:
    """The logits in a model's output: a tensor, a tuple/list's first item, a dict's or
    ModelOutput's `logits`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    what = type(output).__name__ + (f" with keys {list(output)}" if isinstance(output, Mapping) else "")
    raise ConfigError(f"arch {arch!r}: the model returned {what}; expected a tensor of logits, a tuple "
                      "(logits first), or a dict or ModelOutput with 'logits'")


def _logits_hook(arch: str, module: nn.Module, args: Any, output: Any) -> torch.Tensor:
    return logits_of(output, arch)


def with_logits(model: nn.Module, arch: str) -> nn.Module:
    """`model`, its forward now returning `logits_of` its output (a hook: weights and layer
    names stay as they are)."""
    model.register_forward_hook(functools.partial(_logits_hook, arch))
    return model


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


def is_hf_classifier(directory: Path) -> bool:
    """Whether `directory` holds a Hugging Face image classifier (its config.json names a
    ...ForImageClassification architecture) rather than one of ours."""
    config = Path(directory) / CONFIG
    if not config.is_file():
        return False
    found = read_json(config)
    return "model_type" in found and any(str(a).endswith("ForImageClassification")
                                         for a in found.get("architectures") or [])


def load_hf_classifier(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A local Hugging Face image-classification directory (`save_pretrained`, safetensors, no
    remote code), in eval mode, and the config recorded for it: `arch: hf_image` with its
    config fields, so `build` makes a random-weight twin of it (for `kd eval`'s timing)."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageClassification

    directory = Path(directory)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for path in (directory / CONFIG, directory / WEIGHTS):
        if not path.is_file():
            raise MissingInputError(f"{path}: not found (a Hugging Face image classifier keeps model.safetensors "
                                    "beside config.json)")
    try:
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        model = AutoModelForImageClassification.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                                trust_remote_code=False)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise InputError(f"{directory}: cannot load the image classifier ({str(exc).splitlines()[0]})") from None
    model.eval()
    fields = {k: v for k, v in hf_config.to_diff_dict().items() if k not in IGNORED_HF_FIELDS}
    size = getattr(hf_config, "image_size", None)
    config = {"arch": "hf_image", "arch_kwargs": {"model_type": hf_config.model_type, **fields},
              "num_classes": hf_config.num_labels, "params": count_params(model), "hf_config": hf_config.to_dict()}
    if isinstance(size, int):
        config["input_shape"] = [hf_config.num_channels, size, size]
    model.register_forward_pre_hook(functools.partial(_check_input, directory, hf_config, model))
    return with_logits(model, "hf_image"), config


def _check_input(directory: Path, hf_config: Any, model: nn.Module, module: nn.Module, args: Any) -> None:
    """A Hugging Face classifier's inputs: its channels, and its image size where the model
    cannot take another (a `interpolate_pos_encoding` switch, off by default)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return
    channels = getattr(hf_config, "num_channels", x.shape[1])
    size = getattr(hf_config, "image_size", None)
    fixed = isinstance(size, int) and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    if x.shape[1] != channels or (fixed and tuple(x.shape[2:]) != (size, size)):
        want = f"{channels}x{size}x{size}" if fixed else f"{channels} channels"
        raise InputError(f"{directory}: the teacher takes {want} images (its config.json), the data gives "
                         f"{'x'.join(map(str, x.shape[1:]))}; prepare the images to match (prepare.image_size)")


def fingerprint(directory: Path) -> str:
    """sha256 over the weights file and the config file: what identifies a teacher."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        digest.update(file_sha256(directory / name).encode())
    return digest.hexdigest()
