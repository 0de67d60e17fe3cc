"""Prototypes of a fused top-k soft-target loss, for the benchmark's what-if rows only.

`pipeline.losses.topk_soft_target_loss` is ~30 small tensor ops forward and as many in
autograd's backward; on a CPU with a small student each op costs more in dispatch than in
arithmetic, so the loss, not the disk, is what a cached student pays over a hard-label one.
This prototype computes the same value with ~15 ops and a closed-form backward (5 ops), so
`bench/cases.py` can show what fusing would buy. It is NOT used by the pipeline; it is a
suggestion for `pipeline/losses.py` (the library's function stays the reference).

Gradient, with s = student_logits / T, q = softmax(s), teacher top-k probabilities p (B, k),
teacher tail mass p_tail and P = sum(p) + p_tail:
  bucket:  dKL/ds = P * q - scatter(p at topk_idx) - p_tail * softmax(s restricted to the tail)
  renorm:  dKL/ds = scatter(softmax(s[topk]) - p / sum(p) at topk_idx)
and d(loss)/d(student_logits) = T^2 / B * dKL/ds / T.

`cpp_topk_soft_target_loss()` builds the same loss (tail="bucket") as one C++ op
(bench/topk_kl.cpp, compiled once by torch.utils.cpp_extension; ~25 s the first time, then
cached): the forward computes the loss and the gradient in one pass, the backward is a multiply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


class _TopkSoftTarget(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, topk_idx, topk_logit, lse, temperature, tail):
        # student_logits: (B, C); topk_idx, topk_logit: (B, k); lse: (B,)
        T = float(temperature)
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        s = student_logits.to(dtype) / T  # (B, C)
        idx = topk_idx.long()
        t_logp = topk_logit.to(dtype) / T - lse.to(dtype)[:, None]  # (B, k) teacher log-probs
        p = t_logp.exp()
        lse_s = s.logsumexp(1, keepdim=True)  # (B, 1)
        s_k = s.gather(1, idx)  # (B, k)
        batch, k, classes = s.shape[0], idx.shape[1], s.shape[1]
        if tail == "renorm":
            log_pn = t_logp - t_logp.logsumexp(1, keepdim=True)
            log_qn = s_k - s_k.logsumexp(1, keepdim=True)
            pn = log_pn.exp()
            kl = (pn * (log_pn - log_qn)).sum(1)
            ctx.save_for_backward(idx, pn, log_qn)
        else:
            log_q_k = s_k - lse_s
            kl = (p * (t_logp - log_q_k)).sum(1)
            if k < classes:
                p_tail = (1 - p.sum(1)).clamp(min=0)  # float16 rounding can push the kept mass past 1
                s_tail = s.scatter(1, idx, float("-inf"))  # (B, C): the student's logits outside the top-k
                lse_tail = s_tail.logsumexp(1, keepdim=True)
                kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * (lse_tail - lse_s)[:, 0]
            else:
                p_tail = s_tail = lse_tail = None
            ctx.save_for_backward(idx, p, s, lse_s, p_tail, s_tail, lse_tail)
        ctx.tail, ctx.T, ctx.shape, ctx.dtype = tail, T, (batch, classes), student_logits.dtype
        return kl.mean() * T * T

    @staticmethod
    def backward(ctx, grad_out):
        T, (batch, classes) = ctx.T, ctx.shape
        scale = grad_out * (T / batch)  # d(T^2 mean(kl)) / ds, and ds/dlogits = 1/T
        if ctx.tail == "renorm":
            idx, pn, log_qn = ctx.saved_tensors
            g = torch.zeros(batch, classes, dtype=pn.dtype).scatter_(1, idx, log_qn.exp() - pn)
        else:
            idx, p, s, lse_s, p_tail, s_tail, lse_tail = ctx.saved_tensors
            total = p.sum(1, keepdim=True)
            if p_tail is not None:
                total = total + p_tail[:, None]
            g = (s - lse_s).exp() * total
            if p_tail is not None:
                g = g - p_tail[:, None] * (s_tail - lse_tail).exp()
            g = g.scatter_add(1, idx, -p)
        return (g * scale).to(ctx.dtype), None, None, None, None, None


def topk_soft_target_loss_fused(student_logits, topk_idx, topk_logit, lse, temperature, tail="bucket"):
    # student_logits: (B, C); topk_idx, topk_logit: (B, k); lse: (B,) -> scalar, as losses.topk_soft_target_loss
    if tail not in ("bucket", "renorm"):
        raise ValueError(f"tail must be bucket or renorm, got {tail!r}")
    return _TopkSoftTarget.apply(student_logits, topk_idx, topk_logit, lse, temperature, tail)


class _CppTopkSoftTarget(torch.autograd.Function):
    extension = None

    @staticmethod
    def forward(ctx, student_logits, topk_idx, topk_logit, lse, temperature):
        loss, grad = _CppTopkSoftTarget.extension.forward(student_logits, topk_idx, topk_logit, lse,
                                                          float(temperature))
        ctx.save_for_backward(grad)
        ctx.dtype = student_logits.dtype
        return loss.to(student_logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.dtype), None, None, None, None


def cpp_topk_soft_target_loss() -> Callable | None:
    """The one-op C++ loss (tail="bucket" only), or None when it cannot be built here."""
    if _CppTopkSoftTarget.extension is None:
        try:
            from torch.utils.cpp_extension import load

            _CppTopkSoftTarget.extension = load(name="kd_bench_topk_kl", extra_cflags=["-O3"],
                                                sources=[str(Path(__file__).with_name("topk_kl.cpp"))])
        except Exception:  # no compiler or headers: the what-if row is skipped
            return None

    def loss(student_logits, topk_idx, topk_logit, lse, temperature, tail="bucket"):
        if tail != "bucket":
            raise ValueError("the C++ prototype implements tail='bucket' only")
        return _CppTopkSoftTarget.apply(student_logits, topk_idx, topk_logit, lse, temperature)
    return loss


def max_difference(reference, candidate, trials: int = 4, seed: int = 0,
                   tails: tuple[str, ...] = ("bucket", "renorm")) -> float:
    """Largest absolute difference in value and gradient between two loss functions on random
    cache-like rows (float16 top-k, k < C and k = C)."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for trial in range(trials):
        for tail in tails:
            for k, classes in ((5, 10), (10, 10), (3, 100)):
                teacher = torch.randn(64, classes, generator=g) * (1 + 3 * trial)
                shifted = teacher - teacher.max(1, keepdim=True).values
                values, idx = shifted.topk(k, dim=1)
                values = values.half()
                lse = torch.logsumexp(shifted / 4.0, dim=1)
                student = torch.randn(64, classes, generator=g) * 2
                grads = []
                for fn in (reference, candidate):
                    x = student.clone().requires_grad_(True)
                    loss = fn(x, idx.int(), values, lse, 4.0, tail=tail)
                    loss.backward()
                    grads.append((loss.detach(), x.grad))
                worst = max(worst, float((grads[0][0] - grads[1][0]).abs()),
                            float((grads[0][1] - grads[1][1]).abs().max()))
    return worst


if __name__ == "__main__":
    from pipeline import losses

    print("max |difference| vs pipeline.losses.topk_soft_target_loss:",
          max_difference(losses.topk_soft_target_loss, topk_soft_target_loss_fused))
    cpp = cpp_topk_soft_target_loss()
    if cpp is not None:
        print("C++ prototype (bucket):", max_difference(losses.topk_soft_target_loss, cpp, tails=("bucket",)))
