"""Hinton's soft targets from the cache: the top-k with the lse column of its temperature
(`targets: topk`, the default), or the tokens drawn from the teacher at that temperature
(`targets: sampled`, a cache labeled with `label.sampling`): an unbiased estimate of the full
soft-target loss (RS-KD, `losses.sampled_soft_target_loss`). `divergence` picks what is
measured between teacher and student on the top-k's partition (`kd.divergences`); sampled
targets estimate forward KL only."""

from __future__ import annotations

from dataclasses import dataclass

from kd import divergences, losses
from kd.errors import ConfigError
from kd.methods.common import Built, Method, Shapes

TAIL_MODES = ("bucket", "renorm")
TARGETS = ("topk", "sampled")


@dataclass
class SoftTerm(Method):
    """Hinton soft targets: weight * T^2 * D(teacher_T, student_T) over the transfer set, D the
    forward KL KL(teacher_T || student_T) by default."""

    weight: float = 0.9
    temperature: float = 4
    tail: str = "bucket"  # how the mass outside the cached top-k is treated
    targets: str = "topk"  # topk | sampled (the draws of label.sampling)
    divergence: str = "forward_kl"  # one of divergences.DIVERGENCES
    beta: float | None = None  # jsd's mixing weight in [0, 1] (unset: 0.5)
    alpha: float | None = None  # skew_kl's and skew_reverse_kl's in (0, 1) (unset: 0.1)

    def check(self, where: str) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"{where}.weight: {self.weight} must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature: {self.temperature} must be > 0")
        if self.tail not in TAIL_MODES:
            raise ConfigError(f"{where}.tail: {self.tail!r} must be one of {TAIL_MODES}")
        if self.targets not in TARGETS:
            raise ConfigError(f"{where}.targets: {self.targets!r} must be one of {TARGETS}")
        if self.targets == "sampled" and self.tail != "bucket":
            raise ConfigError(f"{where}.tail: {self.tail!r} is for top-k targets; sampled targets have no tail "
                              "(leave it out)")
        try:
            divergences.resolve(self.divergence, self.beta, self.alpha)
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc}") from None
        if self.targets == "sampled" and self.divergence != "forward_kl":
            raise ConfigError(f"{where}.divergence: {self.divergence!r} needs top-k targets; targets: sampled "
                              "estimates forward_kl only")

    def loss_kwargs(self) -> dict:
        """The keyword arguments of the top-k losses (`losses.topk_soft_target_loss`) it sets."""
        return {"tail": self.tail, "divergence": self.divergence, "beta": self.beta, "alpha": self.alpha}

    def temperatures(self) -> list[float]:
        return [float(self.temperature)] if self.targets == "topk" else []

    def sampled_temperatures(self) -> list[float]:
        return [float(self.temperature)] if self.targets == "sampled" else []


CONFIG = SoftTerm  # students.NAME.loss.soft
TASKS = ("image", "causal_lm", "masked_lm")
OWN_TOKENIZER = False
KIND = "logits"


def build(cfg: SoftTerm, shapes: Shapes) -> Built:
    if cfg.targets == "sampled":
        def sampled(batch, out):
            return losses.sampled_soft_target_loss(out["logits"], batch["sample_idx"], batch["sample_count"],
                                                   batch["entropy"], cfg.temperature)
        return Built({"soft": (cfg.weight, sampled)})

    def term(batch, out):
        return losses.topk_soft_target_loss(out["logits"], batch["topk_idx"], batch["topk_logit"],
                                            batch["lse"], cfg.temperature, **cfg.loss_kwargs())
    return Built({"soft": (cfg.weight, term)})
