"""`kd assistants`: progressive distillation's middle step, for every entry of `assistants`.

Each teacher assistant is distilled from the teacher's cache like a student, then labels the
prepared splits into a cache of its own, `data/assistants/NAME/outputs/` (the `label`
section's top-k, temperatures and views; no features). A student with `assistant: NAME`
learns from that cache instead of the teacher's, and so may an assistant (a chain: teacher ->
large assistant -> small assistant -> student; assistants are distilled in the chain's order).
Unchanged assistants are kept as they are (one whose own assistant changed is not unchanged);
assistants no longer in params.yaml are removed.
Writes `data/assistants/` (created even when `assistants` is empty, so DVC can depend on it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from kd.cli.common import PARAMS_OPTION, clean_errors


@clean_errors
def main(
    cache: str = typer.Option("data/teacher_outputs", help="The teacher's cache (written by `kd label`; a directory or "
                              "s3://bucket/prefix)."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Directory written by `kd prepare`."),
    out: Path = typer.Option(Path("data/assistants"), help="Assistants are written to OUT/NAME."),
    baselines: Path = typer.Option(Path("data/baselines"), help="Shared store of baseline twins."),
    checkpoints: Path = typer.Option(Path("data/checkpoints"), help="Per-epoch training state, to resume."),
    memory_mb: float = typer.Option(2048, help="Hold a transfer set in memory up to this size; stream above it."),
    params: Path = PARAMS_OPTION,
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Distil every assistant of params.yaml from the teacher's cache (or its assistant's), then label with it."""
    from kd.cache import Cache
    from kd.config import LabelConfig, section, student, student_names
    from kd.distill import assistant_cache, chain_order, train_assistant
    configs = [student(params, name, "assistants") for name in student_names(params, "assistants")]
    label_cfg = section(params, "label", LabelConfig)
    out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in {c.name for c in configs}):
        shutil.rmtree(stale)  # an assistant no longer in params.yaml
        typer.echo(f"assistant {stale.name}: no longer in params.yaml, removed")
    teacher_cache = Cache.open(cache) if configs else None
    for cfg in chain_order(configs):
        source = teacher_cache if cfg.assistant is None else Cache.open(assistant_cache(out, cfg.assistant))
        summary = train_assistant(cfg, source, prepared, out, baselines, label_cfg,
                                  memory_mb=memory_mb, checkpoints=checkpoints, progress=progress)
        state = "unchanged, kept" if summary["reused"] else "distilled and labeled"
        typer.echo(f"assistant {cfg.name}: {state} -> {out / cfg.name} (cache {out / cfg.name / 'outputs'})")
    if not configs:
        typer.echo("no assistants in params.yaml; nothing to do")
