"""The divergences a soft-target loss can use, between two distributions over the same few
classes: the teacher's P and the student's Q on a cached row's partition (its k kept classes,
plus the tail bucket), both at temperature T. Pure functions of (B, K) log-probabilities, no
reduction, nothing written to disk; `kd.losses` turns them into a loss over the student's
logits.

For each divergence D(P, Q) a row gives its value and h = dD / dlog Q (closed forms, so a
class either side has no mass in gives no NaN). The fused top-k loss needs nothing else: on
the student's logits z = s / T its gradient is h_j - q_j * sum_c h_c (see `losses._TopkKL`).

    forward_kl        KL(P || Q)                          Hinton; h = -P
    reverse_kl        KL(Q || P)                          MiniLLM
    jsd               b KL(P || M) + (1-b) KL(Q || M),    GKD (Agarwal et al. 2024), TRL's
                      M = b P + (1-b) Q                   `generalized_jsd_loss`; b = `beta`;
                                                          b = 0 is forward_kl, b = 1 reverse_kl
                                                          (TRL's convention, not the limits)
    skew_kl           KL(P || a P + (1-a) Q)              DistiLLM (Ko et al. 2024); a = `alpha`
    skew_reverse_kl   KL(Q || a Q + (1-a) P)              DistiLLM
    tvd               0.5 * sum |P - Q|                   total variation distance
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
# The divergences with a mixing weight: divergence -> (its key, its default: GKD's and TRL's
# beta, DistiLLM's alpha). The one place that says which divergence reads which key.
WEIGHTS = {"jsd": ("beta", 0.5), "skew_kl": ("alpha", 0.1), "skew_reverse_kl": ("alpha", 0.1)}
# reverse KL weighs log P by Q: a teacher class of probability 0 (a tail bucket whose cached
# mass rounds to 1) would make it infinite. Such log-probabilities are raised to log(1e-30).
LOG_FLOOR = math.log(1e-30)


@dataclass(frozen=True)
class Divergence:
    """A checked divergence: its name and mixing weight (`beta` for jsd, `alpha` for the
    skews, else 0). jsd with beta 0 or 1 is resolved to forward_kl or reverse_kl."""

    name: str = "forward_kl"
    weight: float = 0.0


def resolve(divergence: str = "forward_kl", beta: float | None = None, alpha: float | None = None) -> Divergence:
    """The Divergence that `divergence`, `beta` and `alpha` name (None: unset, the default of
    WEIGHTS). A bad one is a ValueError whose message opens with the key's name (`beta: ...`),
    for config checks to prefix with where the key lives."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: {divergence!r} must be one of {DIVERGENCES}")
    given = {"beta": beta, "alpha": alpha}
    for key, value in given.items():
        if value is not None and WEIGHTS.get(divergence, (None,))[0] != key:
            readers = [name for name, (k, _) in WEIGHTS.items() if k == key]
            raise ValueError(f"{key}: set, but divergence {divergence!r} does not read it "
                             f"(only {' and '.join(readers)})")
    if divergence not in WEIGHTS:
        return Divergence(divergence)
    key, default = WEIGHTS[divergence]
    weight = default if given[key] is None else float(given[key])
    if divergence == "jsd":  # GKD's end points: forward and reverse KL (TRL special-cases them too)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"beta: {weight} must be in [0, 1]")
        return Divergence("forward_kl") if weight == 0 else Divergence("reverse_kl") if weight == 1 else \
            Divergence("jsd", weight)
    if not 0.0 < weight < 1.0:
        raise ValueError(f"alpha: {weight} must be in (0, 1) (0 is the plain KL, 1 a loss of 0)")
    return Divergence(divergence, weight)


def kl_rows(log_p, log_q):
    # log_p, log_q: (B, K) -> (B,) sum_k p (log p - log q), with 0 log 0 = 0
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=1)


def _log_mix(log_a, log_b, a):
    # log(a * exp(log_a) + (1 - a) * exp(log_b)), 0 < a < 1, elementwise
    return torch.logaddexp(log_a + math.log(a), log_b + math.log1p(-a))


def _where_q(log_q, value):
    # value where Q has mass, else 0 (Q log Q's terms vanish there; their NaNs must not leak)
    return torch.where(log_q.exp() > 0, value, 0.0)


@torch.no_grad()
def value_and_h(div: Divergence, log_p, log_q, p=None):
    """(D per row (B,), h = dD/dlog Q (B, K)) for teacher log-probs `log_p` and student
    log-probs `log_q`, each (B, K) over the same classes (rows summing to 1); `p`: the
    teacher's probabilities where the caller has them exactly (else exp(log_p))."""
    p = log_p.exp() if p is None else p
    q = log_q.exp()
    if div.name == "forward_kl":
        return kl_rows(log_p, log_q), -p
    if div.name == "reverse_kl":
        log_p = log_p.clamp(min=LOG_FLOOR)
        return kl_rows(log_q, log_p), _where_q(log_q, q * (log_q - log_p + 1))
    if div.name == "jsd":  # dD/dQ = (1-b) log(Q / M): the P terms cancel
        b = div.weight
        log_m = _log_mix(log_p, log_q, b)
        value = b * kl_rows(log_p, log_m) + (1 - b) * kl_rows(log_q, log_m)
        return value, _where_q(log_q, (1 - b) * q * (log_q - log_m))
    if div.name == "skew_kl":  # dD/dQ = -(1-a) P / M
        a = div.weight
        log_m = _log_mix(log_p, log_q, a)
        return kl_rows(log_p, log_m), torch.where(p > 0, -(1 - a) * p * (log_q - log_m).exp(), 0.0)
    if div.name == "skew_reverse_kl":  # dD/dQ = log(Q / M) + 1 - a Q / M
        a = div.weight
        log_m = _log_mix(log_q, log_p, a)
        return kl_rows(log_q, log_m), _where_q(log_q, q * (log_q - log_m + 1 - a * (log_q - log_m).exp()))
    if div.name == "tvd":  # dD/dQ = sign(Q - P) / 2 (0 where they are equal)
        return 0.5 * (p - q).abs().sum(dim=1), 0.5 * q * torch.sign(q - p)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {div.name!r}")
