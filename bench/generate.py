"""What the KV cache buys `kd generate`: tokens/s of batched generation with the cache against
a naive loop that runs the whole sequence again for every new token, side by side.

Both sides answer the same left-padded batch of prompts greedily with the same model (random
weights: they do not change the cost of a forward pass), never stopping at eos, so they write
the same number of tokens; the tokens themselves are compared too. The two run in one process,
one after the other in rotating order, `--repeats` times, with one torch thread (see
bench/README.md, "How timing is done"); the speedup is the median of the per-round ratios.
Prints a Markdown table and writes bench/results_generate.json.

    python bench/generate.py                       # the text teacher (examples/text/params.yaml) and the gen teacher
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import typer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"  # the example projects whose params and data a bench reads
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import stamp
from kd import generate
from kd.config import TeacherConfig, section
from kd.lm import build
from kd.prepared.tokens import SpecialIds

NO_EOS = -1  # no token is eos: every row writes max_new_tokens tokens on both sides


@torch.no_grad()
def naive(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, pad: int) -> list[list[int]]:
    """Greedy, batched and left-padded like `generate.generate_batch`, but every step runs the
    whole sequence so far (no KV cache)."""
    ids, mask = generate.left_padded(prompts, pad)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
    return ids[:, -max_new_tokens:].tolist()


def cached(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, block_size: int,
           pad: int) -> list[list[int]]:
    found = generate.generate_batch(model, prompts, max_new_tokens=max_new_tokens, block_size=block_size, pad=pad,
                                    eos=NO_EOS)
    return [r.tokens for r in found]


def case(name: str, params: Path, prompt_tokens: tuple[int, int], new_tokens: int, batch: int, repeats: int
         ) -> dict:
    cfg = section(params, "teacher", TeacherConfig)
    vocab, block = 4096 if "text" in params.name else 259, prompt_tokens[1] + new_tokens
    torch.manual_seed(0)
    model = build(cfg.arch, cfg.arch_kwargs, vocab, block, SpecialIds(pad=0, eos=1, mask=None)).eval()
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_tokens[0], prompt_tokens[1] + 1, (batch,), generator=rng).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=rng).tolist() for n in lengths]
    sides = {"kv_cache": lambda: cached(model, prompts, new_tokens, block, 0),
             "naive": lambda: naive(model, prompts, new_tokens, 0)}
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    tokens = {}
    for round_ in range(repeats):
        for side in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
            started = time.perf_counter()
            tokens[side] = sides[side]()
            seconds[side].append(time.perf_counter() - started)
    written = batch * new_tokens
    ratios = [n / k for n, k in zip(seconds["naive"], seconds["kv_cache"])]
    return {"case": name, "arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "vocab_size": vocab, "batch": batch,
            "prompt_tokens": list(prompt_tokens), "new_tokens": new_tokens,
            "tokens_per_s": {side: written / statistics.median(s) for side, s in seconds.items()},
            "seconds": seconds, "speedup": statistics.median(ratios),
            "same_tokens": tokens["kv_cache"] == tokens["naive"]}


def main(repeats: int = 3, threads: int = 1, out: Path = REPO / "bench/results_generate.json") -> None:
    torch.set_num_threads(threads)
    load = os.getloadavg()
    results = [
        case("text teacher (examples/text/params.yaml): 16 prompts of 16-32 tokens, 64 new",
             EXAMPLES / "text" / "params.yaml", (16, 32), 64, 16, repeats),
        case("gen teacher (examples/generate/params.yaml): 512 sums, 4 new",
             EXAMPLES / "generate" / "params.yaml", (7, 7), 4, 512, repeats),
    ]
    print("| case | tokens/s, KV cache | tokens/s, naive loop | speedup | same tokens |")
    print("|---|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['case']} | {r['tokens_per_s']['kv_cache']:,.0f} | {r['tokens_per_s']['naive']:,.0f} | "
              f"{r['speedup']:.2f}x | {r['same_tokens']} |")
    stamp.write(out, {"results": results, "threads": threads, "repeats": repeats,
                      "load_average": {"before": load, "after": os.getloadavg()}})


if __name__ == "__main__":
    typer.run(main)
