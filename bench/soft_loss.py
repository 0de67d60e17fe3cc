"""What the soft-target loss costs beside cross-entropy, at a language model's vocabulary.

    python bench/soft_loss.py                   # about a minute on 2 cores; writes bench/results_soft_loss.json
    python bench/soft_loss.py --repo OTHER_CHECKOUT --out other.json   # the same for another version of kd/

One training step's loss on rows x V logits, forward and backward, in two forms:
- `cross_entropy`: `F.cross_entropy(logits, labels)`, the floor (one log-softmax and a gather);
- `soft`: `losses.topk_soft_target_loss` from a cached top-k row (k = 32, tail bucket, T = 2);
- `soft_hidden` (at `--hidden-vocab`): `losses.topk_soft_target_loss_from_hidden` from a
  256-wide hidden state and the output layer, the logits never made; its extra peak memory is
  set beside the size of the float32 logits it avoids.
Each form runs in a process of its own with one torch thread, so that its peak memory is its
own: the time is the median over `--steps` steps, the extra peak memory is the rise of the
process's peak resident memory (reset by /proc/self/clear_refs, so Linux only) over what it
held before the first step, the logits and their targets: the gradient and whatever the loss
keeps or makes. The processes alternate, form
after form, `--processes` times, and the ratios are of the medians over all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORMS = ("cross_entropy", "soft")
TOP_K, TEMPERATURE, HIDDEN = 32, 2.0, 256


def child(form: str, rows: int, vocab: int, steps: int, repo: Path) -> dict[str, float]:
    """One form's step in this process: median seconds and extra peak MB."""
    sys.path.insert(0, str(repo))
    import torch
    import torch.nn.functional as F

    from kd import losses

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    if form == "soft_hidden":  # the student's last hidden state and output layer instead of its logits
        hidden = torch.randn(rows, HIDDEN, generator=g).requires_grad_()
        weight = (torch.randn(vocab, HIDDEN, generator=g) * 3 / HIDDEN**0.5).requires_grad_()
    else:
        logits = (torch.randn(rows, vocab, generator=g) * 3).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=g) * 3
    shifted = teacher - teacher.max(1, keepdim=True).values
    topk_logit, topk_idx = shifted.topk(TOP_K, dim=1)
    lse = (shifted / TEMPERATURE).logsumexp(1)
    labels = topk_idx[:, 0].clone()
    del teacher, shifted
    topk_logit = topk_logit.half()

    def step() -> None:
        if form == "cross_entropy":
            loss = F.cross_entropy(logits, labels)
        elif form == "soft":
            loss = losses.topk_soft_target_loss(logits, topk_idx, topk_logit, lse, TEMPERATURE)
        else:
            loss = losses.topk_soft_target_loss_from_hidden(hidden, weight, topk_idx, topk_logit, lse,
                                                            TEMPERATURE).mean() * TEMPERATURE**2
        loss.backward()
        for leaf in (hidden, weight) if form == "soft_hidden" else (logits,):
            leaf.grad = None

    Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts again from here (Linux)
    before = _status_kib("VmRSS")
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"seconds": statistics.median(times[1:]), "extra_peak_mb": (_status_kib("VmHWM") - before) / 1024}


def _status_kib(key: str) -> int:
    """A figure of /proc/self/status, in KiB (VmRSS: resident now; VmHWM: the peak since clear_refs)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="*", default=[4096, 32000])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose kd/ is measured")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results_soft_loss.json")
    parser.add_argument("--hidden-vocab", type=int, nargs="*", default=[128000],
                        help="vocabularies at which the hidden-state variant is measured too")
    parser.add_argument("--child", nargs=2, metavar=("FORM", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.rows, int(args.child[1]), args.steps, args.repo)))
        return
    results = {"rows": args.rows, "top_k": TOP_K, "temperature": TEMPERATURE, "repo": str(args.repo), "vocab": {}}
    for vocab in sorted(set(args.vocab) | set(args.hidden_vocab)):
        forms = (FORMS if vocab in args.vocab else ()) + (("soft_hidden",) if vocab in args.hidden_vocab else ())
        runs: dict[str, list[dict[str, float]]] = {form: [] for form in forms}
        for _ in range(args.processes):
            for form in forms:
                out = subprocess.run([sys.executable, __file__, "--child", form, str(vocab), "--rows", str(args.rows),
                                      "--steps", str(args.steps), "--repo", str(args.repo)],
                                     check=True, capture_output=True, text=True).stdout
                runs[form].append(json.loads(out))
        summary = {form: {key: statistics.median(r[key] for r in runs[form]) for key in ("seconds", "extra_peak_mb")}
                   for form in forms}
        if "soft_hidden" in summary:
            summary["logits_mb"] = args.rows * vocab * 4 / 2**20  # the float32 logits, were they made
            extra = summary["soft_hidden"]["extra_peak_mb"]
            print(f"V={vocab}: the hidden-state variant's extra peak memory {extra:.0f} MB, "
                  f"the logits alone {summary['logits_mb']:.0f} MB", flush=True)
        if "soft" not in summary:
            results["vocab"][str(vocab)] = summary
            continue
        summary["time_ratio"] = summary["soft"]["seconds"] / summary["cross_entropy"]["seconds"]
        summary["memory_ratio"] = summary["soft"]["extra_peak_mb"] / summary["cross_entropy"]["extra_peak_mb"]
        results["vocab"][str(vocab)] = summary
        print(f"V={vocab}: soft/CE time {summary['time_ratio']:.2f}, extra peak memory {summary['memory_ratio']:.2f} "
              f"({summary['soft']['extra_peak_mb']:.0f} MB vs {summary['cross_entropy']['extra_peak_mb']:.0f} MB)",
              flush=True)
    from bench import stamp  # the parent alone: a child imports the kd of --repo, nothing of this checkout

    stamp.write(args.out, results)


if __name__ == "__main__":
    main()
