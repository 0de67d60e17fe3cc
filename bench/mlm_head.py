"""What running BERT's MLM head on the masked positions only saves: one training step, two forms.

    python bench/mlm_head.py        # under a minute on 2 cores; writes bench/results_mlm_head.json

One training step (forward, backward, AdamW) of the default masked teacher of params_mlm.yaml
(4 layers, 128 wide, 4096-token vocabulary) on a batch of 16 blocks of 128 tokens, BERT's 15%
masking, in two forms timed side by side in interleaved rounds:
- `full_head`: `model(input_ids).logits` over every position, then the masked rows picked;
- `masked_head`: the encoder, then the head on the masked rows only (`lm_training.token_losses`).
Both give the same loss (checked here); the ratio is the median step time of the first over
the second.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import stamp
from kd import lm, lm_training, masking
from kd.prepared.tokens import SpecialIds

ROUNDS, STEPS = 7, 5


def full_head_loss(model, inputs, labels):
    keep = labels != -100
    return F.cross_entropy(model(input_ids=inputs).logits[keep], labels[keep])


def masked_head_loss(model, inputs, labels):
    return lm_training.token_losses(model, inputs, labels)[0].mean()


def main() -> None:
    teacher = yaml.safe_load((REPO / "examples" / "masked" / "params.yaml").read_text())["teacher"]
    special = SpecialIds(pad=0, eos=1, mask=2)
    torch.manual_seed(0)
    model = lm.build("bert", teacher["arch_kwargs"], 4096, 128, special).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(3, 4096, (teacher["batch_size"], 128))
    inputs, labels = masking.mask_tokens(tokens, special, 4096, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert abs(float(full_head_loss(model, inputs, labels) - masked_head_loss(model, inputs, labels))) < 1e-5
    forms = {"full_head": full_head_loss, "masked_head": masked_head_loss}
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(ROUNDS):
        for name, loss_fn in forms.items():
            started = time.perf_counter()
            for _ in range(STEPS):
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model, inputs, labels).backward()
                optimizer.step()
            times[name].append((time.perf_counter() - started) / STEPS)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"threads": torch.get_num_threads(), "rounds": ROUNDS, "steps_per_round": STEPS,
              "median_step_s": median, "full_over_masked": median["full_head"] / median["masked_head"]}
    stamp.write(REPO / "bench" / "results_mlm_head.json", result)
    print(f"one step: full head {median['full_head'] * 1e3:.0f} ms, masked head {median['masked_head'] * 1e3:.0f} ms "
          f"({result['full_over_masked']:.2f}x) on {result['threads']} threads")


if __name__ == "__main__":
    main()
