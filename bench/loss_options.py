"""What would make the soft-target term cheap for a tiny student: three forms of the same loss.

    python bench/loss_options.py          # about a minute on one thread; writes bench/results_loss_options.json

One training step of the 784-128-10 MLP at batch 64 (soft 0.9 + hard 0.1, fused AdamW), timed
per form, side by side in interleaved rounds, as a ratio to the same step with cross-entropy
alone:
- `library`: `losses.topk_soft_target_loss` as `kd distill` runs it (closed-form backward);
- `teacher_side_precomputed`: the teacher's p, tail mass, entropy and top-k mask computed once
  (as a loader could), leaving ~4 ops forward and ~5 backward per step;
- `torch_compile`: that precomputed form through `torch.compile` (Inductor fuses it).
All three give the same loss and gradient (checked here). The point of the file: per-op
dispatch bounds the ratio, and neither precomputing nor compiling removes enough of it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline import losses  # noqa: E402


class _Precomputed(torch.autograd.Function):
    """Bucket top-k KL per row from teacher-side tensors computed once: p (B, k), tail (B,),
    negent = sum p log p + tail log tail (B,), mask (B, C) = the top-k classes."""

    @staticmethod
    def forward(ctx, s, idx, p, tail, negent, mask, T):
        with torch.no_grad():
            logq = F.log_softmax(s / T, 1)
            lq_tail = logq.masked_fill(mask, float("-inf")).logsumexp(1)
            kl = negent - (p * logq.gather(1, idx)).sum(1) - tail * lq_tail
        ctx.save_for_backward(logq, lq_tail, idx, p, tail, mask)
        ctx.T = T
        return kl

    @staticmethod
    def backward(ctx, g):
        logq, lq_tail, idx, p, tail, mask = ctx.saved_tensors
        target = torch.where(mask, 0.0, (logq - lq_tail[:, None]).exp() * tail[:, None]).scatter_(1, idx, p)
        return g[:, None] * (logq.exp() - target) / ctx.T, None, None, None, None, None, None


def _plain(s, idx, p, tail, negent, mask, T):
    logq = F.log_softmax(s / T, 1)
    lq_tail = logq.masked_fill(mask, float("-inf")).logsumexp(1)
    return (negent - (p * logq.gather(1, idx)).sum(1) - tail * lq_tail).mean() * T * T


def measure(rounds: int = 7, steps: int = 300, batch: int = 64, classes: int = 10, k: int = 5,
            T: float = 4.0) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(batch, 784), torch.randint(0, classes, (batch,))
    shifted = torch.randn(batch, classes) * 3
    shifted = shifted - shifted.max(1, keepdim=True).values
    topk_logit, topk_idx = shifted.topk(k, 1)
    lse = torch.logsumexp(shifted / T, 1)
    p = torch.exp(topk_logit / T - lse[:, None])
    tail = (1 - p.sum(1)).clamp(min=0)
    negent = torch.xlogy(p, p).sum(1) + torch.xlogy(tail, tail)
    mask = torch.zeros(batch, classes, dtype=torch.bool).scatter_(1, topk_idx, True)
    compiled = torch.compile(_plain, dynamic=False)
    forms = {
        "cross_entropy_only": None,
        "library": lambda out: losses.topk_soft_target_loss(out, topk_idx, topk_logit, lse, T),
        "teacher_side_precomputed": lambda out: _Precomputed.apply(out, topk_idx, p, tail, negent, mask, T).mean() * T * T,
        "torch_compile": lambda out: compiled(out, topk_idx, p, tail, negent, mask, T),
    }
    checks = {}
    for name, form in forms.items():
        if form is None:
            continue
        logits = model(x).detach().requires_grad_()
        form(logits).backward()
        reference = logits.detach().requires_grad_()
        value = losses.topk_soft_target_loss(reference, topk_idx, topk_logit, lse, T)
        value.backward()
        checks[name] = {"loss_abs_diff": float((form(logits) - value).abs()),
                        "grad_max_abs_diff": float((logits.grad - reference.grad).abs().max())}

    def run(form) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            out = model(x)
            loss = F.cross_entropy(out, y) if form is None else 0.9 * form(out) + 0.1 * F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - started

    times = {name: [] for name in forms}
    for _ in range(rounds):
        for name, form in forms.items():
            times[name].append(run(form))
    base = times["cross_entropy_only"]
    return {"batch": batch, "classes": classes, "k": k, "steps_per_round": steps, "rounds": rounds,
            "ratio_to_cross_entropy_step": {n: statistics.median(t / b for t, b in zip(v, base))
                                            for n, v in times.items()},
            "median_ms_per_step": {n: 1000 * statistics.median(v) / steps for n, v in times.items()},
            "equal_to_library": checks}


if __name__ == "__main__":
    results = measure()
    print(json.dumps(results, indent=2))
    (REPO / "bench" / "results_loss_options.json").write_text(json.dumps(results, indent=2) + "\n")
