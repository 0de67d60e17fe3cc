"""Relational KD (Park et al.): the distance and angle structure of a batch's embeddings, from
a cached pooled (or full) teacher layer."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import losses
from pipeline.errors import ConfigError
from pipeline.methods.common import Built, Shapes, vector


@dataclass
class RKDTerm:
    """Relational KD (Park et al.): distance and angle structure of a batch's embeddings."""

    teacher_layer: str = ""  # cached as pooled (or full)
    student_layer: str = ""
    distance: float = 25.0  # weights of Park et al.
    angle: float = 50.0

    def check(self, where: str) -> None:
        for key in ("teacher_layer", "student_layer"):
            if not getattr(self, key):
                raise ConfigError(f"{where}.{key}: missing (a layer name)")
        for key in ("distance", "angle"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: {getattr(self, key)} must be >= 0")

    def temperatures(self) -> list[float]:
        return []

    def teacher_layers(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(self.teacher_layer, ("pooled", "full"))]

    def student_layers(self) -> list[str]:
        return [self.student_layer]


def build(cfg: RKDTerm, shapes: Shapes) -> Built:
    key = f"teacher.{cfg.teacher_layer}"

    def embeddings(batch, out):
        return vector(out[cfg.student_layer]), vector(batch[key].float())

    terms = {}
    if cfg.distance:
        terms["rkd_distance"] = (cfg.distance, lambda batch, out: losses.rkd_distance_loss(*embeddings(batch, out)))
    if cfg.angle:
        terms["rkd_angle"] = (cfg.angle, lambda batch, out: losses.rkd_angle_loss(*embeddings(batch, out)))
    return Built(terms, taps=[cfg.student_layer])
