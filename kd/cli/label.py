"""`kd label`: run the teacher once over every prepared split and write the cache.

Writes `data/teacher_outputs/` (manifest.json, soft_targets/ Parquet parts, features.zarr, and
with `label.keep_teacher` a copy of the teacher's weights in teacher/). On a masked language
model it caches BERT-style masked positions, recorded so that students see the same masks.
Resumes an interrupted run at the first missing part; an intact cache built from the same
teacher, data and parameters is left as is. Reads only the `label` section of params.yaml.

Sharded: `--shard I --num-shards N` (or RANK / WORLD_SIZE under torchrun) labels every N-th
part; the last shard to finish merges the shards' records into the manifest (or run
`kd cache merge`). The cache may be an object-store URL (s3://bucket/prefix).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from kd.cli.common import PARAMS_OPTION, clean_errors, json_option, numbers_option, override
from kd.errors import ConfigError

if TYPE_CHECKING:
    from kd.cache import Teacher
    from kd.config import LabelConfig


@clean_errors
def main(
    top_k: int | None = typer.Option(None, help="Teacher logits kept per row."),
    temperatures: str | None = typer.Option(None, help="Comma-separated temperatures to store lse for, e.g. 1,4."),
    logit_dtype: str | None = typer.Option(None, help="float16 or float32 (encoding topk)."),
    encoding: str | None = typer.Option(None, help="How the top-k is stored: topk (as is) or compact "
                                        "(ids as gaps, logits in one byte each)."),
    sampling: int | None = typer.Option(None, help="Sampled targets: tokens drawn from the teacher per row and "
                                        "temperature, stored with counts (default: label.sampling, null = none)."),
    sampling_seed: int | None = typer.Option(None, help="Seed of the draws (with each row's id and position)."),
    feature: list[str] | None = typer.Option(None, help="Teacher layer to cache as LAYER=MODE (full, pooled, "
                                             "attention); repeatable."),
    views: int | None = typer.Option(None, help="Augmented views per sample besides the input as is."),
    view_recipe: str | None = typer.Option(None, help="How a view is drawn: shift or crop_flip (images)."),
    view_shift: int | None = typer.Option(None, help="shift: up to this many pixels."),
    view_scale: str | None = typer.Option(None, help="crop_flip: the crop's area fraction range, e.g. 0.35,1.0."),
    view_ratio: str | None = typer.Option(None, help="crop_flip: the crop's aspect ratio range, e.g. 0.75,1.333."),
    view_flip: float | None = typer.Option(None, help="crop_flip: the probability of a horizontal flip."),
    view_seed: int | None = typer.Option(None, help="Seed of the augmented views (default: label.view_seed)."),
    batch_size: int | None = typer.Option(None, help="Samples per teacher forward (default: label.batch_size)."),
    dtype: str | None = typer.Option(None, help="A language-model teacher's dtype: auto (its config's), "
                                     "float32, bfloat16 or float16."),
    device: str | None = typer.Option(None, help="Where a language-model teacher runs: auto (cuda when "
                                      "there is one), cpu or cuda."),
    part_size: int | None = typer.Option(None, help="Samples per Parquet part (the resume step); "
                                         "default: about 16,384 cache rows' worth."),
    keep_teacher: bool | None = typer.Option(None, "--keep-teacher/--no-keep-teacher",
                                             help="Copy the teacher's weights into the cache (for students "
                                             "with `init: teacher`)."),
    teacher: Path = typer.Option(Path("data/teacher"), help="Teacher directory: model.safetensors + config.json."),
    arch: str | None = typer.Option(None, help="The teacher's architecture when it is package.module:factory "
                                    "(default: label.arch)."),
    arch_kwargs: str | None = typer.Option(None, help="JSON keyword arguments for --arch (default: label.arch_kwargs "
                                           "when --arch is label.arch, else the teacher's config.json's)."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Directory written by `kd prepare`."),
    out: str = typer.Option("data/teacher_outputs", help="Cache to write: a directory or s3://bucket/prefix."),
    shard: int | None = typer.Option(None, help="Label only shard I of --num-shards (default: $RANK under torchrun, "
                                     "else 0)."),
    num_shards: int | None = typer.Option(None, help="Number of shards (default: $WORLD_SIZE under torchrun, else 1)."),
    params: Path = PARAMS_OPTION,
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Label every split with the teacher into the cache (defaults: params.yaml `label`)."""
    from kd import tasks
    from kd.cache import label
    from kd.cache.store import location
    from kd.cache.verify import format_info, info
    from kd.config import LabelConfig, section
    temps = None
    if temperatures is not None:
        try:
            temps = [float(t) if "." in t else int(t) for t in temperatures.split(",")]
        except ValueError:
            raise ConfigError(f"--temperatures: {temperatures!r} must be comma-separated numbers") from None
    layers = None
    if feature:
        layers = dict(f.split("=", 1) if "=" in f else (f, "") for f in feature)
    cfg = section(params, "label", LabelConfig)
    kwargs = json_option("--arch-kwargs", arch_kwargs)
    if arch is not None and arch != cfg.arch and kwargs is None:  # not label.arch_kwargs of another arch
        cfg.arch_kwargs = None
    cfg = override(cfg, arch=arch, arch_kwargs=kwargs, top_k=top_k, temperatures=temps, logit_dtype=logit_dtype,
                   encoding=encoding, sampling=sampling, sampling_seed=sampling_seed, features=layers, views=views,
                   view_recipe=view_recipe, view_shift=view_shift,
                   view_scale=numbers_option("--view-scale", view_scale),
                   view_ratio=numbers_option("--view-ratio", view_ratio), view_flip=view_flip, view_seed=view_seed,
                   batch_size=batch_size, part_size=part_size, keep_teacher=keep_teacher, dtype=dtype, device=device)
    loaded = load_teacher(teacher, cfg.arch, cfg.arch_kwargs, cfg)
    shard = int(os.environ.get("RANK", 0)) if shard is None else shard
    num_shards = int(os.environ.get("WORLD_SIZE", 1)) if num_shards is None else num_shards
    manifest = label(loaded, prepared, location(out), cfg, task_inputs=tasks.inputs_for(prepared, loaded),
                     progress=progress, shard=shard, num_shards=num_shards)
    if manifest is None:
        typer.echo(f"shard {shard} of {num_shards} done; the last shard to finish writes the manifest "
                   f"(or run `kd cache merge {out}` once all are done)")
    else:
        typer.echo(format_info(info(location(out)), tasks.for_manifest))


def load_teacher(directory: Path, arch: str | None, arch_kwargs: dict | None, cfg: LabelConfig) -> Teacher:
    """Our image teacher (model.safetensors + our config.json), a Hugging Face image classifier or
    language model directory (its config.json names a `model_type`), with the fingerprint that
    identifies it, in `label.dtype` on `label.device`."""
    from kd import tasks
    return tasks.for_teacher(directory).load_teacher(directory, arch, arch_kwargs, dtype=cfg.dtype, device=cfg.device)
