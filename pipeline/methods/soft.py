"""Hinton's soft targets from the cached top-k: needs the lse column of its temperature."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import losses
from pipeline.errors import ConfigError
from pipeline.methods.common import Built, Method, Shapes

TAIL_MODES = ("bucket", "renorm")


@dataclass
class SoftTerm(Method):
    """Hinton soft targets: weight * T^2 * KL(teacher_T || student_T) over the transfer set."""

    weight: float = 0.9
    temperature: float = 4
    tail: str = "bucket"  # how the mass outside the cached top-k is treated

    def check(self, where: str) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"{where}.weight: {self.weight} must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature: {self.temperature} must be > 0")
        if self.tail not in TAIL_MODES:
            raise ConfigError(f"{where}.tail: {self.tail!r} must be one of {TAIL_MODES}")

    def temperatures(self) -> list[float]:
        return [float(self.temperature)]


def build(cfg: SoftTerm, shapes: Shapes) -> Built:
    def term(batch, out):
        return losses.topk_soft_target_loss(out["logits"], batch["topk_idx"], batch["topk_logit"],
                                            batch["lse"], cfg.temperature, tail=cfg.tail)
    return Built({"soft": (cfg.weight, term)})
