"""Fully sharded text students (`parallel.strategy: fsdp`, FSDP2 with gloo on CPU) under torchrun.

`torchrun --nproc-per-node 2 --no-python kd distill` trains a two-block GPT-2 student and its
twin with each rank holding half of every parameter, gradient and AdamW state; they must equal
a single-process run within the data-parallel tolerance (TOLERANCE, 1e-5), and be saved as
ordinary Hugging Face directories. A run whose rank 0 is SIGKILLed after its first checkpoint
resumes under torchrun to the same result; the checkpoint holds the whole state, gathered on
rank 0, in the single-process form, so one process resumes it as well. Measured on these runs:
the sharded student is bit-identical to the DDP one, and differs from one process by at most
3.4e-6 (the twin's weights after 2 epochs), data-parallel rounding.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kd.cli import distill, label
from tests.helpers import (
    KILL_DISTILL,
    TOLERANCE,
    assert_clean_error,
    both_ways,
    distill_args,
    invoke,
    label_args,
    log_difference,
    max_difference,
    ok,
    students_params,
    text_student,
    tiny_student,
)


def fsdp_student(epochs: int) -> dict:
    """Two GPT-2 blocks (two FSDP units besides the root), no dropout (each rank draws its own masks)."""
    entry = text_student()
    entry["arch_kwargs"] |= {"n_layer": 2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return {**entry, "epochs": epochs, "transfer": ["unlabeled"], "parallel": {"strategy": "fsdp"}}


@pytest.fixture(scope="module")
def world(lm_world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    ok(invoke(label.main, *label_args(lm_world, root / "cache", "--top-k", 8)))
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"gpt": fsdp_student(2), "long": fsdp_student(3)}}))
    return {"cache": root / "cache", "prepared": lm_world / "prepared", "params": params}


def same_as(single: Path, sharded: Path) -> None:
    for rel in ("model.safetensors", "baseline/model.safetensors"):
        assert max_difference(single / rel, sharded / rel) < TOLERANCE, rel
    assert log_difference(single / "train_log.csv", sharded / "train_log.csv") < TOLERANCE
    assert log_difference(single / "baseline" / "train_log.csv", sharded / "baseline" / "train_log.csv") < TOLERANCE


@pytest.mark.e2e
def test_a_fully_sharded_text_student_matches_a_single_process(world, tmp_path):
    from transformers import AutoModelForCausalLM

    single, sharded, stdout = both_ways(world, tmp_path, "gpt")
    same_as(single, sharded)
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    assert stdout.count("student gpt:") == 1
    assert not any((tmp_path / "parallel" / "checkpoints").glob("*.pt"))
    model = AutoModelForCausalLM.from_pretrained(sharded)  # an ordinary Hugging Face directory
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2


@pytest.mark.e2e
def test_a_fully_sharded_run_killed_after_its_first_checkpoint_resumes_to_the_same_result(world, tmp_path):
    single, out, alone = tmp_path / "single", tmp_path / "resumed", tmp_path / "resumed_alone"
    ok(invoke(distill.main, "long", *distill_args(world, single)))
    script = tmp_path / "kill_distill.py"
    script.write_text(KILL_DISTILL)  # rank 0 (the one that writes checkpoints) SIGKILLs itself after the first

    def torchrun(*command):
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *command]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(run, capture_output=True, text=True, timeout=300, env=env)

    killed = torchrun(str(script), "1", "long", *map(str, distill_args(world, out)))
    assert killed.returncode != 0 and f"exitcode  : {-signal.SIGKILL}" in killed.stderr, killed.stderr[-3000:]
    assert not (out / "students" / "long").exists()
    (checkpoint,) = (out / "checkpoints").glob("long-*.pt")
    first_epoch = torch.load(checkpoint, weights_only=True)["log"][0]
    shutil.copytree(out, alone)
    ok(invoke(distill.main, "long", *distill_args(world, alone)))  # the same checkpoint, resumed by one process
    resumed = torchrun("--no-python", str(Path(sys.executable).with_name("kd")), "distill", "long",
                       *map(str, distill_args(world, out)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run in (out, alone):
        same_as(single / "students" / "long", run / "students" / "long")
        with open(run / "students" / "long" / "train_log.csv", newline="") as handle:
            assert float(next(csv.DictReader(handle))["seconds"]) == first_epoch["seconds"]  # resumed, not rerun
    assert not checkpoint.exists()


@pytest.mark.integration
def test_an_unknown_strategy_is_one_clear_line(tmp_path):
    params = students_params(tmp_path / "params.yaml", odd={**tiny_student(), "parallel": {"strategy": "zero3"}})
    result = invoke(distill.main, "odd", "--params", params, "--cache", tmp_path / "none")
    assert_clean_error(result, "students.odd.parallel.strategy: 'zero3' must be ddp or fsdp")
