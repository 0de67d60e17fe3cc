"""Universal Logit Distillation (Boizard et al. 2024) for a student with any tokenizer: the L1
distance between the sorted teacher probabilities (cached top-k at T) and the student's sorted
probabilities at the aligned positions; no vocabulary mapping (`losses.uld_loss` says how the
tail outside the cached top-k is treated)."""

from __future__ import annotations

from dataclasses import dataclass

from kd import losses
from kd.errors import ConfigError
from kd.methods.common import Built, Method, Shapes
from kd.methods.mapped import aligned, lse_key, on_aligned_rows


@dataclass
class ULDTerm(Method):
    """weight * ULD distance at temperature T (no T^2: an L1 of probabilities, at most 2)."""

    weight: float = 0.5
    temperature: float = 1

    def check(self, where: str) -> None:
        super().check(where)  # weight >= 0
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature: {self.temperature} must be > 0")

    def temperatures(self) -> list[float]:
        return [float(self.temperature)]


CONFIG = ULDTerm  # students.NAME.loss.uld
TASKS = ("causal_lm",)
OWN_TOKENIZER = True
KIND = "logits"
ROWS = aligned


def build(cfg: ULDTerm, shapes: Shapes) -> Built:
    key = lse_key(cfg.temperature)
    term = on_aligned_rows(lambda rows, logits: losses.uld_loss(logits, rows["topk_logit"], rows[key],
                                                               cfg.temperature))
    return Built({"uld": (cfg.weight, term)})
