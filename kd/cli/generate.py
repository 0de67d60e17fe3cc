"""`kd generate`: the teacher (or any causal LM, `--model`) answers the prompts of a prepared split.

Reads a causal LM teacher directory (or, with `--model DIR`, any causal LM of the prompts'
tokenizer: a student kd distilled, for on-policy rounds) and a prepared instruction directory (`--prepared IN`);
writes `--out OUT`, a prepared directory of the same format whose `generate.split` (the
unlabeled one by default) holds the writer's responses with its per-token log-probabilities,
plus `generation.json` (the writer's role, directory and fingerprint, the settings, what was
kept) and `parts/` (the resume step). `kd label --prepared
OUT` then caches the teacher's per-token soft targets over those responses. Resumes an
interrupted run at the first missing part; an intact OUT of the same writer, data and
settings is left as is. Sharded like `kd label`: `--shard I --num-shards N` (or RANK /
WORLD_SIZE under torchrun) answers every N-th part; the last shard to finish writes OUT. Reads
only the `generate` section of params.yaml; the work is in `kd.generate`.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from kd.cli.common import PARAMS_OPTION, clean_errors, override


@clean_errors
def main(
    split: str | None = typer.Option(None, help="The split whose prompts the teacher answers (default: unlabeled)."),
    max_new_tokens: int | None = typer.Option(None, help="Most tokens per response, its eos included."),
    do_sample: bool | None = typer.Option(None, "--do-sample/--greedy", help="Sample (temperature, top_p) or "
                                          "take the most likely token."),
    temperature: float | None = typer.Option(None, help="Sampling temperature."),
    top_p: float | None = typer.Option(None, help="Sampling: keep the smallest set of tokens holding this mass."),
    samples: int | None = typer.Option(None, help="Responses per prompt (more than 1 needs --do-sample)."),
    seed: int | None = typer.Option(None, help="Seed of the draws (with each example's id and sample index)."),
    batch_size: int | None = typer.Option(None, help="Prompts per batched forward."),
    part_size: int | None = typer.Option(None, help="Prompts per part file (the resume step)."),
    min_logprob: float | None = typer.Option(None, help="Keep a response only if its mean token "
                                             "log-probability under the teacher is at least this."),
    dtype: str | None = typer.Option(None, help="The teacher's dtype: auto, float32, bfloat16 or float16."),
    device: str | None = typer.Option(None, help="Where the teacher runs: auto, cpu or cuda."),
    teacher: Path = typer.Option(Path("data/teacher"), help="A causal LM directory (transformers) with its tokenizer."),
    model: Path | None = typer.Option(None, help="Any causal LM directory of the prompts' tokenizer (a student kd "
                                      "distilled, for on-policy rounds) writes the responses instead of --teacher."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Prepared instruction data whose prompts are answered."),
    out: Path = typer.Option(Path("data/generated"), help="Directory to write: the same splits, one answered."),
    shard: int | None = typer.Option(None, help="Answer only shard I of --num-shards (default: $RANK under "
                                     "torchrun, else 0)."),
    num_shards: int | None = typer.Option(None, help="Number of shards (default: $WORLD_SIZE under torchrun, "
                                          "else 1)."),
    params: Path = PARAMS_OPTION,
    progress: bool = typer.Option(True, help="Show a progress bar (responses, tokens/s)."),
) -> None:
    """Answer the prompts of a prepared split with the teacher or --model (defaults: params.yaml `generate`)."""
    from kd import generate, lm
    from kd.config import GenerateConfig, section
    cfg = section(params, "generate", GenerateConfig)
    cfg = override(cfg, split=split, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                   top_p=top_p, samples=samples, seed=seed, batch_size=batch_size, part_size=part_size,
                   min_logprob=min_logprob, dtype=dtype, device=device)
    role = "teacher" if model is None else "model"
    loaded = lm.load_teacher(teacher if model is None else model, dtype=cfg.dtype, device=cfg.device)
    shard = int(os.environ.get("RANK", 0)) if shard is None else shard
    num_shards = int(os.environ.get("WORLD_SIZE", 1)) if num_shards is None else num_shards
    manifest = generate.run(loaded, prepared, out, cfg, progress=progress, shard=shard, num_shards=num_shards,
                            role=role)
    if manifest is None:
        typer.echo(f"shard {shard} of {num_shards} done; the last shard to finish writes {out}")
        return
    r = manifest["responses"]
    same = "" if r["same_as_source"] is None else f", {100 * r['same_as_source']:.1f}% the same as the source's"
    typer.echo(f"{cfg.split:<9} {r['kept']:>7} of {r['responses']} responses kept ({r['prompts']} prompts, "
               f"{r['finished']} ended with eos, {r['filtered']} under min_logprob, mean log-probability "
               f"{r['mean_logprob']:.3f}{same})  -> {out / f'{cfg.split}.parquet'}")
    first = manifest.get("writer_exact_match_first_turn")
    typer.echo(f"{role:<9} greedy exact match on test {manifest['writer_exact_match']:.4f} per assistant turn"
               + ("" if first is None else f", {first:.4f} on first turns") + f"  -> {out / generate.MANIFEST}")
