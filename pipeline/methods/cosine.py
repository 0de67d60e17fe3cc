"""DistilBERT's cosine alignment of a (projected) student layer with a cached teacher layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pipeline import losses
from pipeline.errors import ConfigError
from pipeline.methods.common import Built, Shapes, vector


@dataclass
class CosineTerm:
    """DistilBERT's alignment: 1 - cos(projection(student layer), teacher layer)."""

    teacher_layer: str = ""  # cached as pooled (or full)
    student_layer: str = ""
    weight: float = 1.0

    def check(self, where: str) -> None:
        for key in ("teacher_layer", "student_layer"):
            if not getattr(self, key):
                raise ConfigError(f"{where}.{key}: missing (a layer name)")
        if self.weight < 0:
            raise ConfigError(f"{where}.weight: {self.weight} must be >= 0")

    def temperatures(self) -> list[float]:
        return []

    def teacher_layers(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(self.teacher_layer, ("pooled", "full"))]

    def student_layers(self) -> list[str]:
        return [self.student_layer]


def build(cfg: CosineTerm, shapes: Shapes) -> Built:
    width_s = shapes.student[cfg.student_layer][0]
    width_t = shapes.teacher[cfg.teacher_layer]["shape"][0]
    projection = nn.Linear(width_s, width_t) if width_s != width_t else nn.Identity()
    key = f"teacher.{cfg.teacher_layer}"

    def term(batch, out):
        return losses.cosine_embedding_loss(projection(vector(out[cfg.student_layer])), vector(batch[key].float()))
    return Built({"cosine": (cfg.weight, term)}, taps=[cfg.student_layer], modules=[projection])
