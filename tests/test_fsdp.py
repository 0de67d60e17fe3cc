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

from kd import parallel, training
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


# --- the sharded state against the single-process one, in this process (a group of one) --------


@pytest.mark.integration
def test_a_sharded_trainees_checkpoint_is_the_single_process_one(tmp_path):
    """A GPT-2 with two blocks and a loss term holding an extra module in a closure (as
    `kd.methods` builds them), one AdamW step sharded and one plain: `parallel.full_state`, as
    `training._save` writes it, holds what the plain checkpoint holds; `load_optimizer_state`
    puts it back; `unshard_into` gives the model its trained weights."""
    import torch.distributed as dist
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    from kd.tasks.next_token import TokenRows

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    models = [GPT2LMHeadModel(config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    extras = [nn.Linear(64, 4) for _ in range(2)]
    extras[1].load_state_dict(extras[0].state_dict())
    x = torch.randint(64, (3, 8), generator=torch.Generator().manual_seed(1))

    def terms(extra: nn.Module) -> dict:
        return {"logits": (1.0, lambda batch, out: out["logits"].square().mean()),
                "extra": (1.0, lambda batch, out: extra(out["logits"]).square().mean())}

    def one_step(trainee: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        sum(trainee({"x": x}).values()).backward()
        optimizer.step()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = training._Trainee(TokenRows(models[1]), [extras[1]], terms(extras[1]), [])
        sharded = parallel.fully_sharded(training._Trainee(TokenRows(parallel.vacated_copy(models[0])), [extras[0]],
                                                           terms(extras[0]), []))
        assert all(p.numel() == 0 for p in models[0].parameters())  # the model gave its weights up
        optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01, fused=True) for m in (sharded, plain)]
        schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for o in optimizers]  # as `fit` has
        one_step(sharded, optimizers[0])
        one_step(plain, optimizers[1])
        full = parallel.full_state(sharded, optimizers[0])
        sharded.zero_grad(set_to_none=True)  # as a resumed run's fresh model has none
        again = torch.optim.AdamW(sharded.parameters(), lr=0.01, fused=True)
        torch.optim.lr_scheduler.LambdaLR(again, lambda step: 1.0)
        parallel.load_optimizer_state(sharded, again, full["optimizer"])
        assert_close(parallel.full_state(sharded, again)["optimizer"], full["optimizer"])
        parallel.unshard_into(sharded.model.model, models[0])
    finally:
        dist.destroy_process_group()
    saved = {}
    for name, i, weights in (("sharded", 0, full), ("plain", 1, None)):
        training._save(tmp_path / f"{name}.pt", plain.model, [extras[1]], optimizers[i], schedules[i], [], weights)
        saved[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    assert saved["plain"]["optimizer"]["state"][0]["step"] == 1  # one step taken
    for key in ("model", "extra", "optimizer"):
        assert_close(saved["sharded"][key], saved["plain"][key])
    assert_close(models[0].state_dict(), models[1].state_dict())


def assert_close(a, b) -> None:
    """Nested dicts and lists of tensors and plain values: the same keys, values within 1e-6."""
    kinds = [next((k for k in (dict, (list, tuple), torch.Tensor) if isinstance(v, k)), type(v)) for v in (a, b)]
    assert kinds[0] == kinds[1], (type(a), type(b))  # (a dict or an OrderedDict; betas come back a list)
    if isinstance(a, dict):
        assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
        for key in a:
            assert_close(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y)
    elif torch.is_tensor(a):
        assert a.shape == b.shape and torch.allclose(a.detach().float(), b.detach().float(), atol=1e-6)
    else:
        assert a == b


# --- kd distill under torchrun -------------------------------------------------------------------


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
