"""Attention transfer (Zagoruyko & Komodakis) over [teacher layer, student layer] pairs: from
a cached map (mode attention, p = 2) or from a cached full map."""

from __future__ import annotations

from dataclasses import dataclass, field

from kd import losses
from kd.errors import ConfigError
from kd.methods.common import Built, Method, Shapes, pool_to


@dataclass
class AttentionTerm(Method):
    """Attention transfer over [teacher layer, student layer] pairs (Zagoruyko & Komodakis).

    The default weight is their beta / 2 with beta = 1000.
    """

    pairs: list[list[str]] = field(default_factory=list)
    p: float = 2
    weight: float = 500.0

    def check(self, where: str) -> None:
        if not self.pairs or any(len(pair) != 2 for pair in self.pairs):
            raise ConfigError(f"{where}.pairs: {self.pairs!r} must be a list of [teacher_layer, student_layer] pairs")
        if self.p <= 0:
            raise ConfigError(f"{where}.p: {self.p} must be > 0")
        super().check(where)

    def teacher_layers(self) -> list[tuple[str, tuple[str, ...]]]:
        modes = ("attention", "full") if self.p == 2 else ("full",)  # a cached map is made with p = 2
        return [(pair[0], modes) for pair in self.pairs]

    def student_layers(self) -> list[str]:
        return [pair[1] for pair in self.pairs]


CONFIG = AttentionTerm  # students.NAME.loss.attention
TASKS = ("image",)
OWN_TOKENIZER = False
KIND = "feature"


def build(cfg: AttentionTerm, shapes: Shapes) -> Built:
    pairs = []
    for teacher_layer, student_layer in cfg.pairs:
        spec, source = shapes.teacher[teacher_layer], shapes.student[student_layer]
        if len(source) < 2:
            raise ConfigError(f"loss.attention: student layer {student_layer!r} has shape {source}, not a spatial map")
        teacher_spatial = spec["source_shape"][1:]
        if spec["mode"] == "attention" and any(s < t for s, t in zip(source[1:], teacher_spatial)):
            raise ConfigError(
                f"loss.attention: student layer {student_layer!r} ({source[1:]}) is smaller than teacher layer "
                f"{teacher_layer!r} ({teacher_spatial}), whose cached map cannot be pooled exactly; "
                f"set label.features.{teacher_layer}: full")
        pairs.append((f"teacher.{teacher_layer}", student_layer, spec["mode"], teacher_spatial))

    def term(batch, out):
        total = 0.0
        for key, student_layer, mode, spatial in pairs:
            feature, teacher = out[student_layer], batch[key].float()
            if mode == "attention":  # the cached map (B, H*W), made with p = 2
                student_map = losses.attention_map(pool_to(feature, spatial), cfg.p)
                total = total + losses.attention_map_loss(student_map, teacher)
            else:
                total = total + losses.attention_transfer_loss(feature, teacher, cfg.p)
        return total
    return Built({"attention": (cfg.weight, term)}, taps=[s for _, s, _, _ in pairs])
