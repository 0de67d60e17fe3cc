"""What the soft-target term costs in a small classifier's training step, side by side in one process.

    python bench/soft_step.py        # about a minute; writes bench/results_soft_step.json

`mlp_soft`'s step (a 784-128-10 MLP, batch 64, AdamW) three ways, interleaved round by round:
- `hard`: cross-entropy on the labels alone (the baseline twin's step);
- `soft`: 0.1 x cross-entropy + 0.9 x `losses.topk_soft_target_loss` (k = 5 of 10, T = 4,
  tail bucket), which at this size takes the compiled kernel (`kernels.topk_kl`);
- `soft_pytorch`: the same with kernels off (`KD_KERNELS=0`, what a machine without a C++
  compiler runs): the PyTorch form (`_TopkKL`).
Times are CPU seconds of this process (`time.process_time`), so that other work on a shared
machine slows the wall clock more than the figures; the ratios are of the medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/soft_step.py` puts bench/, not the repository, on sys.path
    sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F
from torch import nn

from bench import stamp
from kd import kernels, losses

BATCH, CLASSES, TOP_K, TEMPERATURE = 64, 10, 5, 4.0


def pytorch_soft(logits, idx, topk_logit, lse, T):
    with kernels.disabled():
        return losses.topk_soft_target_loss(logits, idx, topk_logit, lse, T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per form and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results_soft_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(BATCH, 784, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
    teacher = torch.randn(BATCH, CLASSES, generator=g) * 3
    shifted = teacher - teacher.max(1, keepdim=True).values
    topk_logit, topk_idx = shifted.topk(TOP_K, dim=1)
    lse = (shifted / TEMPERATURE).logsumexp(1).half()
    topk_logit = topk_logit.half()
    forms = {
        "hard": lambda out: F.cross_entropy(out, y),
        "soft": lambda out: 0.1 * F.cross_entropy(out, y) + 0.9 * losses.topk_soft_target_loss(
            out, topk_idx, topk_logit, lse, TEMPERATURE),
        "soft_pytorch": lambda out: 0.1 * F.cross_entropy(out, y) + 0.9 * pytorch_soft(
            out, topk_idx, topk_logit, lse, TEMPERATURE),
    }
    times: dict[str, list[float]] = {form: [] for form in forms}
    for _ in range(args.rounds):
        for form, loss_of in forms.items():
            started = time.process_time()
            for _ in range(args.steps):
                loss = loss_of(model(x))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            times[form].append((time.process_time() - started) / args.steps)
    median = {form: statistics.median(t) for form, t in times.items()}
    results = {"batch": BATCH, "classes": CLASSES, "top_k": TOP_K, "temperature": TEMPERATURE,
               "step_us": {form: m * 1e6 for form, m in median.items()},
               "soft_over_hard": median["soft"] / median["hard"],
               "soft_pytorch_over_hard": median["soft_pytorch"] / median["hard"],
               "kernel": kernels.topk_kl() is not None}
    print(f"step: hard {results['step_us']['hard']:.0f} us, soft {results['step_us']['soft']:.0f} us "
          f"({results['soft_over_hard']:.2f}x{'' if results['kernel'] else ', no kernel: PyTorch form'}), "
          f"PyTorch form {results['step_us']['soft_pytorch']:.0f} us ({results['soft_pytorch_over_hard']:.2f}x)")
    stamp.write(args.out, results)


if __name__ == "__main__":
    main()
