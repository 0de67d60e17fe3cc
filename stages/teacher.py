"""`kd teacher`: train the teacher on the labeled split.

Writes `data/teacher/model.safetensors`, `config.json` (architecture, shapes, training
params) and `metrics.json` (test accuracy). To bring your own teacher instead, put its
safetensors weights and a config.json in a directory and point `kd label --teacher` at it.

On text data (`kd prepare` of a text dataset) the teacher is a Hugging Face language model
(`arch: gpt2` causal or `bert` masked): `model.safetensors`, its HF `config.json`,
`tokenizer.json`, `training.json` (where it came from) and `metrics.json` (test perplexity or
masked-token accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.prepared import tokens as text
from pipeline.config import TeacherConfig, section
from pipeline.files import staging_dir, swap_into_place, write_json
from pipeline.models import save_model
from pipeline.teacher import train_teacher
from stages.common import PARAMS_OPTION, clean_errors, json_option, override


@clean_errors
def main(
    arch: Optional[str] = typer.Option(None, help="Built-in architecture (cnn, mlp) or package.module:factory; gpt2 or bert for text."),
    arch_kwargs: Optional[str] = typer.Option(None, help='Architecture keyword arguments as JSON, e.g. \'{"hidden": 512}\'.'),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    weight_decay: Optional[float] = typer.Option(None),
    shift: Optional[int] = typer.Option(None, help="Random-shift augmentation in pixels (0 = off; images only)."),
    seed: Optional[int] = typer.Option(None),
    prepared: Path = typer.Option(Path("data/prepared"), help="Directory written by `kd prepare`."),
    out: Path = typer.Option(Path("data/teacher"), help="Where to write the teacher."),
    params: Path = PARAMS_OPTION,
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train the teacher on the labeled split (defaults: params.yaml `teacher`)."""
    cfg = override(section(params, "teacher", TeacherConfig), arch=arch,
                   arch_kwargs=json_option("--arch-kwargs", arch_kwargs), epochs=epochs,
                   batch_size=batch_size, lr=lr, weight_decay=weight_decay, shift=shift, seed=seed)
    if text.modality(prepared / "labeled.parquet") == "text":
        from pipeline import lm  # (here: transformers takes seconds to import; image runs never need it)

        model, provenance, metrics = lm.train_teacher(cfg, prepared, progress=progress)
        staging = staging_dir(out)
        lm.save(staging, model, prepared / text.TOKENIZER_FILE)
        write_json(staging / "training.json", provenance)
        write_json(staging / "metrics.json", metrics)
        swap_into_place(staging, out)
        score = (f"test perplexity {metrics['perplexity']:.2f} (unigram {metrics['unigram_perplexity']:.1f})"
                 if "perplexity" in metrics else f"test masked-token accuracy {metrics['masked_accuracy']:.4f}")
        typer.echo(f"teacher {cfg.arch}: {score} -> {out}")
        return
    model, config, metrics = train_teacher(cfg, prepared, progress=progress)
    staging = staging_dir(out)
    save_model(staging, model, config)
    write_json(staging / "metrics.json", metrics)
    swap_into_place(staging, out)
    typer.echo(f"teacher {cfg.arch}: test accuracy {metrics['test_accuracy']:.4f} -> {out}")
