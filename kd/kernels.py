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
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).resolve().parent / "csrc" / "topk_kl.cpp"
SWITCH = "KD_KERNELS"  # 0: never build or use the compiled kernels


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
