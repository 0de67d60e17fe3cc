"""kd: offline knowledge distillation.

A teacher labels data once (`kd label`); its top-k logits, normalisers and chosen features are
cached on disk (`kd.cache`); any number of students then train from the cache without the teacher
(`kd distill`), and `kd eval` / `kd report` say how good each one is and what it costs.

The package is the library and its command line (`kd.cli`, one module per command). `tasks`
(image classification, causal LM, masked LM) is asked everything that depends on the kind of
model; around it: dataset sources (`sources`) and the prepared format (`prepared`), the
teacher-output cache (`cache`), a student's rows (`loader`), loss methods (`methods`) over the
pure losses (`losses`), the one training loop (`training`), evaluation and the report (`report`).
docs/architecture.md follows one cache row through them.

The names below are the public Python API; they are imported on first use, so `import kd` (and
`kd --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("kd-cache")
except metadata.PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

# Public name -> the module that defines it.
_API = {
    "Cache": "kd.cache",
    "label": "kd.cache",
    "train_student": "kd.distill",
    "soft_target_loss": "kd.losses",
    "topk_soft_target_loss": "kd.losses",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'kd' has no attribute {name!r}")
