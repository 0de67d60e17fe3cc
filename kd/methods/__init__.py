"""Loss methods: one module per method, each holding its config dataclass (the keys of
`students.NAME.loss.<method>` in params.yaml, checked by its `check`), the cache layers and
temperatures it needs, and `build(cfg, shapes) -> Built`, its named terms over a batch.

`METHODS` is the one lookup from a params name to its module; adding a method is one module
plus one line here (and its field in `config.LossConfig`). The pure loss functions stay in
`kd.losses`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from kd.errors import ConfigError
from kd.methods import attention, cosine, hard, hint, mapped, rkd, soft, uld
from kd.methods.common import Built, Shapes

# Loss-method name -> module. The one place a config name meets code.
METHODS: dict[str, ModuleType] = {"soft": soft, "hard": hard, "hint": hint, "attention": attention, "rkd": rkd,
                                  "cosine": cosine, "mapped": mapped, "uld": uld}


def chosen(loss: Any) -> dict[str, Any]:
    """The methods a student's `loss` section sets: name -> its config, in METHODS' order."""
    return {name: getattr(loss, name) for name in METHODS if getattr(loss, name) is not None}


def student_terms(cfg: Any, shapes: Shapes) -> Built:
    """All of a student's terms, taps and trainable helper modules, composed from its config."""
    built = Built({})
    for name, term_cfg in chosen(cfg.loss).items():
        try:
            part = METHODS[name].build(term_cfg, shapes)
        except ConfigError as exc:
            raise ConfigError(f"{cfg.where}.{exc}") from None
        built.terms.update(part.terms)
        built.taps += [t for t in part.taps if t not in built.taps]
        built.modules += part.modules
    return built


def student_layers(cfg: Any) -> list[str]:
    """The student layers the methods tap, each once."""
    return list(dict.fromkeys(layer for term in chosen(cfg.loss).values() for layer in term.student_layers()))


def needed_temperatures(cfg: Any) -> list[float]:
    """The cached temperatures (lse columns) the methods read."""
    return list(dict.fromkeys(t for term in chosen(cfg.loss).values() for t in term.temperatures()))


def needed_samples(cfg: Any) -> list[float]:
    """The temperatures whose sampled targets the methods read."""
    return list(dict.fromkeys(t for term in chosen(cfg.loss).values() for t in term.sampled_temperatures()))


__all__ = ["METHODS", "Built", "Shapes", "chosen", "needed_samples", "needed_temperatures", "student_layers",
           "student_terms"]
