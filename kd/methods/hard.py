"""Cross-entropy on each row's hard label (true or pseudo; `loader.hard_labels` decides which)."""

from __future__ import annotations

from dataclasses import dataclass

from kd.errors import ConfigError
from kd.methods.common import Built, Method, Shapes
from kd.training import hard_label_loss, labeled


@dataclass
class HardTerm(Method):
    """Cross-entropy on hard labels: true labels and/or the teacher's argmax (pseudo-labels).
    What each key means for a row is stated once, in `loader.hard_labels`."""

    weight: float = 0.1
    labels: bool = True  # the row's true label, where it is known
    pseudo: bool = False  # otherwise the teacher's argmax
    threshold: float = 0.0  # keep a pseudo-label only if the teacher's p(top-1) at T=1 >= this

    def check(self, where: str) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"{where}.weight: {self.weight} must be in [0, 1]")
        if not (self.labels or self.pseudo):
            raise ConfigError(f"{where}: set labels and/or pseudo to true")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"{where}.threshold: {self.threshold} must be in [0, 1)")

    def temperatures(self) -> list[float]:
        return [1.0] if self.pseudo and self.threshold > 0 else []  # p(top-1) at T=1 decides confidence


CONFIG = HardTerm  # students.NAME.loss.hard
TASKS = ("image", "causal_lm", "masked_lm")
OWN_TOKENIZER = True  # true labels only: a pseudo-label is a teacher token (causal_lm.check)
KIND = "labels"
ROWS = labeled  # the rows with a label: the mean is over them


def build(cfg: HardTerm, shapes: Shapes) -> Built:
    return Built({"hard": (cfg.weight, hard_label_loss)})
