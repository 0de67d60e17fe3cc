"""Exact match: the share of an instruction split's assistant turns that a model answers exactly.

A causal student of instruction data is scored by it beside its perplexity: each assistant turn
of the test split (`tokens.turns`: for a chat every assistant turn, its prompt the block before
it; a prompt/response pair is one turn) answered greedily until eos or the turn's end-of-turn
token (`generate.turn_scores`), against the turn's content and end token, token for token, over
all turns (`exact_match`) and over each block's first (`exact_match_first_turn`), for the student,
its twin and every further seed. The teacher's figures are those `kd label` measured on the same
turns when it wrote the cache (`teacher_scores` in its manifest), else the one `kd generate`
measured when it wrote the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd import evaluation, generate, lm
from kd.files import read_json
from kd.prepared import tokens

KEYS = ("exact_match", "exact_match_first_turn")  # what `scores` gives, as metrics.json names the student's


def scores(model: Any, prepared: Path, batch_size: int) -> dict[str, float]:
    """A causal LM's exact match on the test split's turns of `prepared` (`KEYS`), answering
    until the end of the block at most."""
    pad, eos = generate.special_of(prepared)
    block = tokens.split_info(prepared / "test.parquet")["block_size"]
    return generate.turn_scores(model.eval(), prepared / "test.parquet", batch_size=batch_size,
                                max_new_tokens=block, pad=pad, eos=eos)


def exact_matches(student_dir: Path, record: dict[str, Any], prepared: Path, batch_size: int
                  ) -> list[dict[str, float]]:
    """The exact match of the student and its twin, for every seed (`record`: the student's,
    naming its further seeds) in the order `evaluation.seed_dirs` lists them after the first:
    one {KEY, baseline_KEY} per seed for each of `KEYS`."""
    directories = [student_dir] + [directory for _, directory in evaluation.seed_dirs(student_dir, record)]
    rows = []
    for directory in directories:
        student, twin = (scores(lm.load(d), prepared, batch_size) for d in (directory, directory / "baseline"))
        rows.append({**student, **{f"baseline_{key}": value for key, value in twin.items()}})
    return rows


def teacher_scores(manifest: dict[str, Any], prepared: Path) -> dict[str, float | None]:
    """The teacher's exact match on the test turns (`teacher_KEY` for each of `KEYS`): as `kd
    label` measured it (the cache's `manifest`), else as `kd generate` did when it wrote
    `prepared` (None for data it did not write, or a figure it did not record)."""
    found = manifest.get("teacher_scores")
    if found is None and (prepared / generate.MANIFEST).is_file():
        written = read_json(prepared / generate.MANIFEST)
        found = {key: written.get(f"teacher_{key}") for key in KEYS}
    return {f"teacher_{key}": (found or {}).get(key) for key in KEYS}
