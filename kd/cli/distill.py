"""`kd distill NAME`: train student NAME from the cache and the prepared inputs.

Never loads the teacher: it reads `data/teacher_outputs/` and `data/prepared/` only.
Writes `data/students/NAME/` (model.safetensors, config.json, train_log.csv) with the
student's hard-label baseline twin in `baseline/`. Reads `students.NAME` of params.yaml.
Under `torchrun --nproc-per-node N --no-python kd distill NAME` it trains data-parallel
(`kd.parallel`); rank 0 writes the outputs and prints the summary. The cache's task
(`kd.tasks`) decides the student: an image classifier, a GPT-2 on a language model's
per-token cache (causal) or a BERT with DistilBERT's triple loss (masked), each with its
baseline twin (for text, the same student on the text alone).
"""

from __future__ import annotations

from pathlib import Path

import typer

from kd.cli.common import PARAMS_OPTION, clean_errors, override


@clean_errors
def main(
    name: str = typer.Argument(..., help="A student defined under `students` (or `text_students`, `mlm_students`) in "
                               "the params file."),
    epochs: int | None = typer.Option(None, help="Epochs over the transfer set (default: the student's `epochs`)."),
    batch_size: int | None = typer.Option(None, help="Rows per batch (default: the student's `batch_size`)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: the student's `lr`)."),
    seed: int | None = typer.Option(None, help="First seed; `repeats` seeds run from it (default: the student's "
                                    "`seed`)."),
    precision: str | None = typer.Option(None, help="Language models: fp32 or bf16-mixed (bfloat16 autocast, float32 "
                                         "weights and loss; default: the student's `precision`)."),
    gradient_checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                       help="Language models: recompute activations in the backward "
                                                       "(default: the student's `gradient_checkpointing`)."),
    init: str | None = typer.Option(None, help="Start from 'teacher' or a local pretrained model directory, e.g. "
                                    "the previous on-policy round's student (default: the student's `init`)."),
    cache: str = typer.Option("data/teacher_outputs", help="The teacher's cache (written by `kd label`; a directory or "
                              "s3://bucket/prefix)."),
    assistants: Path = typer.Option(Path("data/assistants"), help="Where `kd assistants` writes assistants; a "
                                    "student with `assistant: A` learns from ASSISTANTS/A/outputs."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Directory written by `kd prepare`."),
    students_dir: Path = typer.Option(Path("data/students"), help="Students are written to STUDENTS_DIR/NAME."),
    baselines: Path = typer.Option(Path("data/baselines"), help="Shared store of baseline twins."),
    checkpoints: Path = typer.Option(Path("data/checkpoints"), help="Per-epoch training state, to resume an "
                                     "interrupted run (removed when training is done)."),
    memory_mb: float = typer.Option(2048, help="Hold the transfer set in memory up to this size; stream the cache "
                                    "above it."),
    params: Path = PARAMS_OPTION,
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train student NAME and its baseline twin from the cache (never the teacher)."""
    from kd import parallel
    from kd.cache import Cache
    from kd.config import student
    from kd.distill import assistant_cache, train_student
    rank, _ = parallel.init_from_env()
    try:
        cfg = override(student(params, name), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                       precision=precision, gradient_checkpointing=gradient_checkpointing,
                       init=init)
        source = cache if cfg.assistant is None else assistant_cache(assistants, cfg.assistant)
        summary = train_student(cfg, Cache.open(source), prepared, students_dir / name, baselines,
                                memory_mb=memory_mb, checkpoints=checkpoints, progress=progress)
    finally:
        parallel.finish()
    if rank != 0:
        return
    final, twin = summary["final"], summary["baseline_final"]
    terms = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k not in ("epoch", "lr", "seconds"))
    twins = ", ".join(f"{key} {'reused' if reused else 'trained'}" for key, reused in summary["twins"])
    seeds = ", ".join(map(str, summary["seeds"]))
    typer.echo(f"student {name}: seeds {seeds}, {summary['epochs']} epochs, final (seed {summary['seeds'][0]}) "
               f"{terms}; baseline twin {summary['twin_loss']} loss {twin['hard']:.4f} ({twins}) "
               f"-> {students_dir / name}")
