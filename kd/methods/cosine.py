"""DistilBERT's cosine alignment of a (projected) student layer with a cached teacher layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kd import losses
from kd.methods.common import Built, LayerPair, Shapes, vector


@dataclass
class CosineTerm(LayerPair):
    """DistilBERT's alignment: 1 - cos(projection(student layer), teacher layer); the teacher
    layer cached as pooled (or full)."""

    weight: float = 1.0


CONFIG = CosineTerm  # students.NAME.loss.cosine
TASKS = ("image", "masked_lm")
OWN_TOKENIZER = False
KIND = "feature"


def build(cfg: CosineTerm, shapes: Shapes) -> Built:
    width_s = shapes.student[cfg.student_layer][0]
    width_t = shapes.teacher[cfg.teacher_layer]["shape"][0]
    projection = nn.Linear(width_s, width_t) if width_s != width_t else nn.Identity()
    key = f"teacher.{cfg.teacher_layer}"

    def term(batch, out):
        return losses.cosine_embedding_loss(projection(vector(out[cfg.student_layer])), vector(batch[key].float()))
    return Built({"cosine": (cfg.weight, term)}, taps=[cfg.student_layer], modules=[projection])
