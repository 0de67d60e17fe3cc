"""A language model's cache at two sizes (default 200k and 2M predicted tokens): does `kd label`
and a streamed `kd distill` keep their peak memory and speed as the cache grows 10x?

    python bench/scale_text.py     # about 10 minutes on 2 cores; writes bench/results_scale_text.json

Each size is its own `.txt` corpus (pydoc's topics, repeated with the copy number in every
paragraph so no two are equal), prepared in blocks of 128 tokens with 1% labeled, 98%
unlabeled, 1% test, with a tiny Llama's own tokenizer (`prepare.tokenizer`). The teacher stands
in for a downloaded checkpoint: a Llama built from a config (2 layers, 64 wide, a byte-level BPE
of 4,096 entries, random weights), saved in shards with `save_pretrained`. Then `kd label`
(top-32, T = 1, float16) and one epoch of `kd distill` of a 1-layer Llama student on the
unlabeled split with `--memory-mb 16`, so both sizes stream the cache. Every command runs in a
fresh process (bench/stage_runner.py: wall time without imports, peak RSS). Ratios of the
larger size against the smaller: peak RSS (target <= 1.25, as case 4 of bench/run.py) and
tokens/s (target >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import stamp
from bench.label_text import make_teacher as make_llama
from bench.scale import growth_ratios, run_stage
from kd.cache import Cache

BLOCK = 128
TEACHER = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "max_position_embeddings": BLOCK, "tie_word_embeddings": True}
STUDENT = {"hidden_size": 32, "intermediate_size": 86, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 2, "tie_word_embeddings": True}


def make_teacher(directory: Path) -> None:
    make_llama(directory, TEACHER, shard_size="200KB")


def write_corpus(path: Path, tokens: int, teacher: Path) -> None:
    """pydoc's paragraphs, copy after copy (each paragraph tagged with its copy number), until
    the corpus holds `tokens` tokens of the teacher's tokenizer (to within one paragraph)."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    paragraphs = [p for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(teacher)(paragraphs)["input_ids"]]
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < tokens:
            for paragraph, length in zip(paragraphs, lengths):
                out.write(f"({copy}) {paragraph}\n\n")
                written += length + 3
                if written >= tokens:
                    break
            copy += 1


def one_size(root: Path, tokens: int, teacher: Path, memory_mb: float, threads: int) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    corpus, params = root / "corpus.txt", root / "params.yaml"
    write_corpus(corpus, tokens, teacher)
    params.write_text(yaml.safe_dump({
        "prepare": {"dataset": str(corpus), "tokenizer": str(teacher), "block_size": BLOCK,
                    "shares": {"labeled": 0.01, "unlabeled": 0.98, "test": 0.01}, "seed": 0,
                    "labeled": None, "unlabeled": None, "test": None},
        "label": {"top_k": 32, "temperatures": [1], "logit_dtype": "float16", "batch_size": 4096},
        "text_students": {"tiny": {"arch": "llama", "arch_kwargs": STUDENT, "epochs": 1, "batch_size": 16,
                                   "lr": 0.002, "repeats": 1, "transfer": ["unlabeled"],
                                   "loss": {"soft": {"weight": 0.5, "temperature": 1},
                                            "hard": {"weight": 0.5, "labels": True}}}},
    }, sort_keys=False))
    prepared, cache = root / "prepared", root / "cache"
    stages = {"prepare": run_stage(["prepare", "--params", str(params), "--out", str(prepared)], threads)}
    stages["label"] = run_stage(["label", "--params", str(params), "--teacher", str(teacher), "--prepared",
                                 str(prepared), "--out", str(cache), "--no-progress"], threads)
    stages["distill"] = run_stage([
        "distill", "tiny", "--params", str(params), "--cache", str(cache), "--prepared", str(prepared),
        "--students-dir", str(root / "students"), "--baselines", str(root / "baselines"),
        "--checkpoints", str(root / "checkpoints"), "--memory-mb", str(memory_mb), "--no-progress"], threads)
    splits = Cache.open(cache).manifest["splits"]
    rows = {split: info["rows"] for split, info in splits.items()}
    stages["label"]["tokens_per_second"] = sum(rows.values()) / stages["label"]["seconds"]
    stages["distill"]["tokens_per_second"] = rows["unlabeled"] / stages["distill"]["seconds"]
    stages["cache_rows"] = rows
    stages["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs=2, default=[200_000, 2_000_000])
    parser.add_argument("--memory-mb", type=float, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results_scale_text.json")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "llama"
        make_teacher(teacher)
        for tokens in sorted(args.tokens):
            runs[tokens] = one_size(Path(tmp) / f"t{tokens}", tokens, teacher, args.memory_mb, args.threads)
            print(f"{tokens:,} tokens: " + ", ".join(
                f"{stage} {runs[tokens][stage]['seconds']:.1f} s / {runs[tokens][stage]['peak_rss_mb']:.0f} MB"
                for stage in ("prepare", "label", "distill")), flush=True)
    ratios = growth_ratios(runs, "tokens")
    result = {"ratios": ratios, "details": {"tokens": sorted(runs), "memory_mb": args.memory_mb,
                                            "threads": args.threads, "runs": {str(k): v for k, v in runs.items()}}}
    print(json.dumps(ratios, indent=2))
    stamp.write(args.out, result)


if __name__ == "__main__":
    main()
