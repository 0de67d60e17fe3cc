"""Relational KD (Park et al.): the distance and angle structure of a batch's embeddings, from
a cached pooled (or full) teacher layer."""

from __future__ import annotations

from dataclasses import dataclass

from kd import losses
from kd.methods.common import Built, LayerPair, Shapes, vector


@dataclass
class RKDTerm(LayerPair):
    """Relational KD (Park et al.): distance and angle structure of a batch's embeddings;
    the teacher layer cached as pooled (or full)."""

    distance: float = 25.0  # weights of Park et al.
    angle: float = 50.0


CONFIG = RKDTerm  # students.NAME.loss.rkd
TASKS = ("image",)
OWN_TOKENIZER = False
KIND = "feature"


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
