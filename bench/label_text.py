"""What `kd label` costs on a Hugging Face causal LM beyond the teacher's own forward pass, and
what a cached token takes on disk.

    python bench/label_text.py      # a few minutes on 2 cores; writes bench/results_label_text.json

The teacher stands in for a downloaded checkpoint: a Llama built from a config (4 layers, 256
wide, random weights: weights do not change the cost of a forward pass) with a byte-level BPE
of 4,096 entries trained by `tokenizers` on pydoc, saved with `save_pretrained` in shards and
loaded from that directory by `kd label`'s own loader. pydoc is prepared with that tokenizer
(`prepare.tokenizer`) in blocks of 128 tokens, 300 of them (`BLOCKS`). Two forms over the same
blocks (every split) and batches, timed side by side in interleaved rounds, one torch thread:
- `bare_forward`: the teacher's forward over every batch of blocks (`model(input_ids).logits`),
  nothing kept;
- `kd_label`: `kd.cache.label` into a fresh directory: the same forward, the top-k, the
  normalisers, the fidelity statistics, the teacher's loss, Parquet parts and the manifest.
The ratio is the median over rounds of the per-round time ratio; tokens/s are each form's
median. Bytes per cached token are the soft-target Parquet bytes over the rows, for each k.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import stamp
from kd import tasks
from kd.cache import Cache, label
from kd.cache.layout import SOFT_TARGETS
from kd.config import LabelConfig, PrepareConfig, Shares
from kd.prepared import tokens
from kd.sources import text as text_source
from kd.tasks import causal_lm

ROUNDS = 5
BLOCKS = (150, 100, 50)  # labeled, unlabeled, test: 300 blocks, 38,100 predicted tokens
LLAMA = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 128, "tie_word_embeddings": True}


def make_teacher(directory: Path, llama: dict = LLAMA, shard_size: str = "4MB") -> None:
    """A Llama of `llama`'s config fields with a 4,096-entry byte-level BPE trained on pydoc,
    random weights, saved in shards of `shard_size` with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.tokenizer import pydoc_tokenizer

    tokenizer = pydoc_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **llama)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size=shard_size)
    tokenizer.save_pretrained(directory)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_teacher(root / "llama")
        text_source.prepare(PrepareConfig(dataset="pydoc", tokenizer=str(root / "llama"), block_size=128,
                                          labeled=BLOCKS[0], unlabeled=BLOCKS[1], test=BLOCKS[2], shares=Shares()),
                            root / "prepared")
        teacher = causal_lm.load_teacher(root / "llama", dtype="float32", device="cpu")
        cfg = LabelConfig(top_k=32, temperatures=[1.0], batch_size=4096)
        splits = [torch.from_numpy(tokens.read_blocks(root / "prepared" / f"{s}.parquet")[1])
                  for s in ("labeled", "unlabeled", "test")]
        block = splits[0].shape[1]
        per_batch = max(1, cfg.batch_size // (block - 1))
        predicted = sum(len(t) for t in splits) * (block - 1)

        def bare_forward() -> None:
            with torch.no_grad():
                for blocks in splits:
                    for batch in blocks.split(per_batch):
                        _ = teacher.model(input_ids=batch).logits

        def kd_label(out: Path) -> None:
            label(teacher, root / "prepared", out, cfg, task_inputs=tasks.inputs_for(root / "prepared", teacher),
                  progress=False)

        times: dict[str, list[float]] = {"bare_forward": [], "kd_label": []}
        for round_ in range(ROUNDS):
            for name in (["bare_forward", "kd_label"] if round_ % 2 == 0 else ["kd_label", "bare_forward"]):
                started = time.perf_counter()
                bare_forward() if name == "bare_forward" else kd_label(root / f"cache-{round_}")
                times[name].append(time.perf_counter() - started)
        ratios = [b / a for a, b in zip(times["bare_forward"], times["kd_label"])]
        sizes = {}
        for k in (8, 32, 128):
            out = root / f"size-{k}"
            label(teacher, root / "prepared", out, LabelConfig(top_k=k, temperatures=[1.0], batch_size=4096),
                  task_inputs=tasks.inputs_for(root / "prepared", teacher), progress=False)
            cache = Cache.open(out)
            parquet = sum(f.stat().st_size for f in (out / SOFT_TARGETS).rglob("*.parquet"))
            rows = sum(info["rows"] for info in cache.manifest["splits"].values())
            sizes[f"k{k}"] = {"bytes_per_token": parquet / rows,
                              "kept_mass_t1": cache.manifest["fidelity"]["test"]["t1"]["kept_mass"]}
    result = {
        "teacher": {"arch": "llama", **LLAMA, "vocab_size": 4096,
                    "params": sum(p.numel() for p in teacher.model.parameters())},
        "tokens": predicted, "block_size": int(block), "label_batch_rows": cfg.batch_size, "threads": 1,
        "rounds": ROUNDS,
        "tokens_per_s": {name: predicted / statistics.median(values) for name, values in times.items()},
        "kd_label_over_bare_forward": statistics.median(ratios),
        "bytes_per_cached_token": sizes,
        "details": {"seconds": times},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))
    stamp.write(REPO / "bench" / "results_label_text.json", result)


if __name__ == "__main__":
    main()
