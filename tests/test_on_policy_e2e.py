"""examples/on_policy through DVC on a tiny configuration.

Copies the examples with the package into a fresh git + DVC repository, writes a tiny
params.yaml into examples/on_policy (300 sums, one-epoch models, one seed, two rounds) and runs
`dvc repro examples/on_policy/dvc.yaml`: round 0's student learns from the teacher's answers,
round 1's from the teacher's labels of round 0's answers, starting from round 0's student, and
round 2 from round 1's; then nothing is stale.
"""

from __future__ import annotations

import json

import pytest
import yaml

from kd.prepared import tokens
from tests.helpers import copy_pipelines, dvc_repo
from tests.helpers import run_in as run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY_ARCH = {"arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16}}
BUDGET = {"epochs": 1, "batch_size": 32, "lr": 0.003, "repeats": 1, "transfer": ["labeled", "unlabeled"],
          "loss": {"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5, "labels": False, "pseudo": True}}}
TINY_ON_POLICY = {
    "prepare": {"dataset": "addition", "samples": 300, "shares": {"labeled": 0.2, "unlabeled": 0.5, "test": 0.3},
                "labeled": None, "unlabeled": None, "test": 40, "vocab_size": 259, "block_size": 12, "seed": 0},
    "teacher": {**TINY_ARCH, "epochs": 1, "batch_size": 32, "lr": 0.003, "seed": 0},
    "generate": {"max_new_tokens": 4, "batch_size": 64, "part_size": 64},
    "label": {"top_k": 4, "temperatures": [1], "batch_size": 1024},
    "on_policy": {"seeds": [0], "rounds": [{"round": 1, "previous": "round0/answers"},
                                           {"round": 2, "previous": "round1/own_answers"}]},
    "students": {"answers": {**TINY_ARCH, **BUDGET}, "own_answers": {"arch": "gpt2", **BUDGET},
                 "teacher_answers": {**TINY_ARCH, **BUDGET, "epochs": 3}},
    "eval": {"batch_size": 64, "throughput_runs": 2, "latency_runs": 2},
}


def test_dvc_repro_runs_the_rounds_each_student_writing_for_the_next(tmp_path):
    project = dvc_repo(copy_pipelines(tmp_path))
    example = project / "examples" / "on_policy"
    (example / "params.yaml").write_text(yaml.safe_dump(TINY_ON_POLICY, sort_keys=False))
    run(["dvc", "repro", "examples/on_policy/dvc.yaml"], project)
    data = example / "data" / "seed0"
    for number, previous in ((1, data / "round0" / "answers"), (2, data / "round1" / "own_answers")):
        generated = data / f"round{number}" / "generated"
        manifest = json.loads((generated / "generation.json").read_text())
        assert manifest["writer"]["role"] == "model" and manifest["writer"]["directory"] == str(previous.relative_to(
            example))  # the previous round's student wrote this round's answers
        assert tokens.writer_logprob(generated / "unlabeled.parquet") is not None
        student = data / f"round{number}" / "own_answers"
        assert json.loads((student / "student.json").read_text())["student"]["init"] == str(previous.relative_to(
            example))
        assert json.loads((student / "metrics.json").read_text())["seeds"] == 1
    assert json.loads((data / "teacher_answers" / "metrics.json").read_text())["seeds"] == 1
    assert json.loads(run(["dvc", "status", "--json", "examples/on_policy/dvc.yaml"], project) or "{}") == {}
