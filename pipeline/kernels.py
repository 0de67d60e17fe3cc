"""Compiled CPU kernels, built on first use by torch's C++ extension loader.

There is one: the top-k soft-target KL with the bucket tail (`csrc/topk_kl.cpp`), which
`losses.topk_soft_target_loss` takes for CPU logits that fit one chunk, a classifier's batch.
At 10 classes eager PyTorch spends more time dispatching the loss's ~30 small operations than
computing them; the kernel is one pass over each row, forward and backward.

It is built once per machine and source (about a minute on 2 cores) into torch's extensions
folder (`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`). Without a C++
compiler, when the build fails, or with `KD_KERNELS=0`, the loss takes its PyTorch form, which
gives the same values and gradients up to float rounding (tests/test_losses.py).
"""

from __future__ import annotations

import contextlib
import functools
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

    started = time.perf_counter()
    announced = False
    if not _built_before(cpp_extension):
        print(f"kd: compiling the top-k loss kernel for this machine (once, about a minute; {SWITCH}=0 skips it)",
              file=sys.stderr, flush=True)
        announced = True
    try:
        module = cpp_extension.load(name="kd_topk_kl", sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure leaves the PyTorch form, said once
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"kd: the top-k loss kernel did not build ({reason}); the loss runs as PyTorch operations, "
                      f"with the same results ({SWITCH}=0 silences this)", stacklevel=3)
        return None
    if announced:
        print(f"kd: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return module


def _built_before(cpp_extension) -> bool:
    """Whether torch's extensions folder already holds a build of this name (then loading is quick)."""
    try:  # torch's own folder for the name (not a public function: a miss only costs the notice)
        root = Path(cpp_extension._get_build_directory("kd_topk_kl", verbose=False))
    except Exception:  # noqa: BLE001
        return False
    return any(root.glob("*.so")) or any(root.glob("*.pyd"))
