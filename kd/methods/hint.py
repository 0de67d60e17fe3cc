"""FitNets' hint: a regressor maps a student layer onto a cached teacher layer (mode full)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kd import losses
from kd.errors import ConfigError
from kd.methods.common import Built, LayerPair, Shapes, pool_to


@dataclass
class HintTerm(LayerPair):
    """FitNets: MSE between regressor(student layer) and a cached teacher layer (mode full)."""

    weight: float = 1.0
    MODES = ("full",)


CONFIG = HintTerm  # students.NAME.loss.hint
TASKS = ("image",)
OWN_TOKENIZER = False
KIND = "feature"


def build(cfg: HintTerm, shapes: Shapes) -> Built:
    # student feature (B, Cs, *S) -> regressor -> (B, Ct, *S'), compared with the cached (B, Ct, *S')
    target = shapes.teacher[cfg.teacher_layer]["shape"]
    source = shapes.student[cfg.student_layer]
    regressor = _regressor(source, target)
    key = f"teacher.{cfg.teacher_layer}"

    def term(batch, out):
        feature = pool_to(out[cfg.student_layer], target[1:]) if len(target) > 1 else out[cfg.student_layer]
        return losses.hint_loss(regressor(feature), batch[key].float())
    return Built({"hint": (cfg.weight, term)}, taps=[cfg.student_layer], modules=[regressor])


def _regressor(source: list[int], target: list[int]) -> nn.Module:
    """FitNets' regressor: a 1x1 convolution for maps, a linear layer for vectors."""
    if len(source) != len(target):
        raise ConfigError(f"loss.hint: student shape {source} and teacher shape {target} differ in rank")
    if len(source) == 1:
        return nn.Linear(source[0], target[0])
    conv = {2: nn.Conv1d, 3: nn.Conv2d}[len(source)]
    return conv(source[0], target[0], kernel_size=1)
