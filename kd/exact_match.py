"""Exact match: the share of an instruction split's test prompts that a model answers exactly.

A causal student of instruction data is scored by it beside its perplexity: its greedy answers
(`generate.answers`, until eos or the end of the block) against the test split's responses,
token for token (`generate.exact_match`), for the student, its twin and every further seed. The
teacher's figure is the one `kd generate` measured when it wrote the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd import evaluation, generate, lm
from kd.files import read_json
from kd.prepared import tokens


def exact_matches(student_dir: Path, record: dict[str, Any], prepared: Path, batch_size: int
                  ) -> list[dict[str, float]]:
    """The share of test prompts that the student and its twin answer exactly, for every seed
    (`record`: the student's, naming its further seeds) in the order `evaluation.seed_dirs` lists
    them after the first."""
    _, prompts, truths = generate.prompts_and_responses(prepared / "test.parquet")
    pad, eos = generate.special_of(prepared)
    block = tokens.split_info(prepared / "test.parquet")["block_size"]

    def score(directory: Path) -> float:
        found = generate.answers(lm.load(directory), prompts, batch_size=batch_size, max_new_tokens=block,
                                 block_size=block, pad=pad, eos=eos)
        return generate.exact_match(found, truths)

    directories = [student_dir] + [directory for _, directory in evaluation.seed_dirs(student_dir, record)]
    return [{"student": score(d), "baseline": score(d / "baseline")} for d in directories]


def teacher_exact_match(prepared: Path) -> float | None:
    """The teacher's exact match on the test prompts, as `kd generate` measured it when it wrote
    `prepared` (None for data it did not write)."""
    manifest = prepared / generate.MANIFEST
    return read_json(manifest).get("teacher_exact_match") if manifest.is_file() else None
