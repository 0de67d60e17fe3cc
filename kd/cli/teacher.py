"""`kd teacher`: train the teacher on the labeled split.

Writes `data/teacher/model.safetensors`, `config.json` (architecture, shapes, training
params) and `metrics.json` (test accuracy). To bring your own teacher instead, put its
safetensors weights and a config.json in a directory and point `kd label --teacher` at it.

The prepared data's task (`kd.tasks`) trains and writes it. On text data (`kd prepare`
of a text dataset) the teacher is a Hugging Face language model
(`arch: gpt2` causal or `bert` masked): `model.safetensors`, its HF `config.json`,
`tokenizer.json`, `training.json` (where it came from) and `metrics.json` (test perplexity or
masked-token accuracy).
"""

from __future__ import annotations

from pathlib import Path

import typer

from kd.cli.common import PARAMS_OPTION, clean_errors, json_option, numbers_option, override


@clean_errors
def main(
    arch: str | None = typer.Option(None, help="Built-in architecture (cnn, mlp) or package.module:factory; gpt2 or "
                                    "bert for text."),
    arch_kwargs: str | None = typer.Option(None, help='Architecture keyword arguments as JSON, e.g. '
                                           '\'{"hidden": 512}\'.'),
    epochs: int | None = typer.Option(None, help="Training epochs (default: teacher.epochs)."),
    batch_size: int | None = typer.Option(None, help="Samples per batch (default: teacher.batch_size)."),
    lr: float | None = typer.Option(None, help="Learning rate (default: teacher.lr)."),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay (default: teacher.weight_decay)."),
    shift: int | None = typer.Option(None, help="Random-shift augmentation in pixels (0 = off; images only)."),
    view_recipe: str | None = typer.Option(None, help="Augmentation: shift or crop_flip (images only)."),
    view_scale: str | None = typer.Option(None, help="crop_flip: the crop's area fraction range, e.g. 0.35,1.0."),
    view_ratio: str | None = typer.Option(None, help="crop_flip: the crop's aspect ratio range, e.g. 0.75,1.333."),
    view_flip: float | None = typer.Option(None, help="crop_flip: the probability of a horizontal flip."),
    seed: int | None = typer.Option(None, help="Seed of initialisation and batch order (default: teacher.seed)."),
    precision: str | None = typer.Option(None, help="Text teachers: fp32 or bf16-mixed (bfloat16 autocast, float32 "
                                         "weights and loss; default: teacher.precision)."),
    gradient_checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                       help="Text teachers: recompute activations in the backward "
                                                       "(default: teacher.gradient_checkpointing)."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Directory written by `kd prepare`."),
    out: Path = typer.Option(Path("data/teacher"), help="Where to write the teacher."),
    params: Path = PARAMS_OPTION,
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train the teacher on the labeled split (defaults: params.yaml `teacher`)."""
    from kd import tasks
    from kd.config import TeacherConfig, section
    from kd.files import replacing
    cfg = section(params, "teacher", TeacherConfig)
    kwargs = json_option("--arch-kwargs", arch_kwargs)
    if arch is not None and arch != cfg.arch and kwargs is None:  # not teacher.arch_kwargs of another arch
        kwargs = {}
    cfg = override(cfg, arch=arch, arch_kwargs=kwargs, epochs=epochs,
                   batch_size=batch_size, lr=lr, weight_decay=weight_decay, shift=shift, view_recipe=view_recipe,
                   view_scale=numbers_option("--view-scale", view_scale),
                   view_ratio=numbers_option("--view-ratio", view_ratio), view_flip=view_flip, seed=seed,
                   precision=precision, gradient_checkpointing=gradient_checkpointing)
    with replacing(out) as staging:  # nothing half-written where `kd label` looks
        score = tasks.for_prepared(prepared).train_teacher(cfg, prepared, staging, progress=progress)
    typer.echo(f"teacher {cfg.arch}: {score} -> {out}")
