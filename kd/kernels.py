"""Compiled CPU kernels, built on first use by torch's C++ extension loader.

There is one: the top-k soft-target KL with the bucket tail (`csrc/topk_kl.cpp`), which
`losses.topk_soft_target_loss` takes for small CPU logits (up to `losses.KERNEL_ELEMENTS`, a
classifier's batch). At 10 classes eager PyTorch spends more time dispatching the loss's ~30
small operations than computing them; the kernel is one pass over each row for the value and
the gradient.

It is built once per machine and source text (about 40 s on 2 cores) into a folder named by
the text's hash in torch's extensions folder (`TORCH_EXTENSIONS_DIR`, by default
`~/.cache/torch_extensions`), which every checkout of the same text shares. Without a C++
compiler, when the build fails, or with `KD_KERNELS=0`, the loss takes its PyTorch form, which
gives the same values and gradients up to float rounding (tests/test_losses.py).

On CUDA, with the optional `liger-kernel` installed (`pip install kd[liger]`), the
hard-label cross-entropy of a language model's rows can be taken from its last hidden state and
output layer by Liger's fused linear cross-entropy (Triton; the logits never exist):
`liger_cross_entropy` says where it is used (`liger_wanted`) and gives kd's quantity, the mean
cross-entropy over the rows whose label is >= 0. Liger's distillation losses need the
teacher's full logits (its hidden state and output layer), not a cached top-k, so kd's soft
terms keep kd's own forms. CPU runs never take it; `KD_LIGER=0` switches it off on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).resolve().parent / "csrc" / "topk_kl.cpp"
SWITCH = "KD_KERNELS"  # 0: never build or use the compiled kernels
LIGER_SWITCH = "KD_LIGER"  # 0: never use liger-kernel's fused losses, even on CUDA with it installed


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def compiler() -> str | None:
    """The C++ compiler torch's loader would call (CXX, else c++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


def topk_kl() -> ModuleType | None:
    """The compiled top-k KL (`topk_kl(logits, idx, topk_logit, lse, T, scale, reduce)`), or None
    when kernels are switched off, there is no compiler or the build failed (said once)."""
    return _build() if enabled() else None


@contextlib.contextmanager
def disabled():
    """Within: the PyTorch forms only (what a machine without a compiler runs)."""
    before = os.environ.get(SWITCH)
    os.environ[SWITCH] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[SWITCH]
        else:
            os.environ[SWITCH] = before


@functools.cache
def _build() -> ModuleType | None:
    if compiler() is None:
        warnings.warn(f"kd: no C++ compiler (CXX or c++), so the top-k loss runs as PyTorch operations; "
                      f"a classifier's step is slower, the results are the same ({SWITCH}=0 silences this)",
                      stacklevel=3)
        return None
    from torch.utils import cpp_extension

    name, folder = build_folder()
    started = time.perf_counter()
    announced = not any(path.suffix in (".so", ".pyd") for path in folder.iterdir())  # else: a quick load
    if announced:
        print(f"kd: compiling the top-k loss kernel for this machine (once, about a minute; {SWITCH}=0 skips it)",
              file=sys.stderr, flush=True)
    try:
        source = folder / SOURCE.name
        if not source.is_file():  # the folder is named by the text's hash: a file there is this text
            tmp = folder / f"{SOURCE.name}.{os.getpid()}.tmp"
            tmp.write_bytes(SOURCE.read_bytes())
            tmp.replace(source)
        module = cpp_extension.load(name=name, sources=[str(source)], build_directory=str(folder),
                                    extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure leaves the PyTorch form, said once
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"kd: the top-k loss kernel did not build ({reason}); the loss runs as PyTorch operations, "
                      f"with the same results ({SWITCH}=0 silences this)", stacklevel=3)
        return None
    if announced:
        print(f"kd: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return module


def build_folder() -> tuple[str, Path]:
    """(module name, folder) of this source's build: named by a hash of its text, under
    TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and a folder per Python and torch
    version. The source is built from a copy in that folder, so every checkout of the same text
    (a clone, a worktree, DVC's copy in a test) shares one build instead of rebuilding it
    for its own path, and a changed text builds beside the old one."""
    import torch

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    name = f"kd_topk_kl_{digest}"
    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    folder = base / f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}" / name
    folder.mkdir(parents=True, exist_ok=True)
    return name, folder


def liger_wanted(device_type: str, installed: bool, switch: str | None) -> bool:
    """The dispatch rule: Liger's fused kernels on CUDA only (they are Triton GPU kernels), with
    liger-kernel importable, unless `KD_LIGER` (`switch`) is 0."""
    return device_type == "cuda" and installed and switch != "0"


def liger_cross_entropy(device_type: str) -> Callable | None:
    """On a device where `liger_wanted`: `ce(hidden (N, H), weight (V, H), labels (N,), bias=None)
    -> the mean cross-entropy of hidden @ weight.T + bias over the rows with label >= 0` (0 when
    none has one, as `training.hard_label_loss`), by Liger's fused linear cross-entropy; else
    None, and the caller computes kd's own form."""
    if not liger_wanted(device_type, importlib.util.find_spec("liger_kernel") is not None,
                        os.environ.get(LIGER_SWITCH)):
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")

    def ce(hidden, weight, labels, bias=None):
        keep = labels >= 0
        if not keep.any():
            return hidden.sum() * 0.0
        return fused(weight, hidden, labels.where(keep, -100), bias)  # kd's unknown labels are any < 0

    return ce
