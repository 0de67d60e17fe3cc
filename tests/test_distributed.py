"""Data-parallel `kd distill` under torchrun (DistributedDataParallel, gloo on CPU).

The row split is checked without a process group: every rank's slices of a batch, in rank
order, are the single-process batch. Then `torchrun --nproc-per-node 2 --no-python kd distill`
runs as a subprocess and its student, baseline twin and log are compared with a single-process
run of the same student: the global batches are the same and every loss term sees the whole
batch, so they differ by float rounding only. Measured max |weight difference| on these runs:
at most 5e-8 (0 for the batch-1 student, whose rows are all on rank 0; 3e-6 after 320 steps of
a 40-epoch run); the tolerance, TOLERANCE, is 1e-5. BatchNorm students differ more on CPU
(each rank normalises with its own slice's statistics): the CNN test prints it (~1e-2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kd import augment, loader, parallel
from kd.cache import Cache
from kd.cli import distill, label, prepare, teacher
from kd.config import student
from kd.tasks import image
from tests.helpers import (
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

# 160 + 225 = 385 transfer samples = 6 batches of 64 + 1: in the last batch rank 1 has no rows
SIZES = {"labeled": 160, "unlabeled": 225, "test": 50}
FEATURES = {"hint": {"teacher_layer": "hidden.0", "student_layer": "hidden.0", "weight": 1.0},
            "cosine": {"teacher_layer": "hidden.0", "student_layer": "hidden.0", "weight": 0.5}}
STUDENTS = {
    # hard labels on the labeled rows only, a hint regressor and a cosine projection (extra
    # modules whose gradients must be averaged too), cached augmented views
    "mlp": tiny_student(epochs=2, lr=0.003, views=True, loss={**tiny_student()["loss"], **FEATURES}),
    # relations between all rows of a batch (160 labeled rows: 64, 64, 32)
    "rkd": tiny_student(epochs=2, lr=0.003, transfer=["labeled"],
                        loss={"soft": {"weight": 0.9, "temperature": 4},
                              "rkd": {"teacher_layer": "hidden.0", "student_layer": "hidden.0"}}),
    # a global batch smaller than the world: rank 1 never has a row
    "one_row": tiny_student(batch_size=1, transfer=["labeled"]),
    "cnn": tiny_student(arch="cnn", arch_kwargs={"widths": [4, 8], "hidden": 16}, epochs=2, lr=0.003),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    params = students_params(root / "params.yaml", **STUDENTS)
    prepared, teacher_dir, cache = root / "prepared", root / "teacher", root / "cache"
    ok(invoke(prepare.main, "--dataset", "digits", *[a for s, n in SIZES.items() for a in (f"--{s}", n)],
              "--params", params, "--out", prepared))
    ok(invoke(teacher.main, "--arch", "mlp", "--arch-kwargs", '{"hidden": [32]}', "--epochs", 2, "--no-progress",
              "--prepared", prepared, "--out", teacher_dir, "--params", params))
    ok(invoke(label.main, "--no-progress", "--part-size", 128, "--feature", "hidden.0=full", "--views", 1,
              "--teacher", teacher_dir, "--prepared", prepared, "--out", cache, "--params", params))
    return {"root": root, "params": params, "prepared": prepared, "cache": cache}


# --- the row split, without a process group --------------------------------------------------


def split_batches(data, batch_size: int, views: str, world_size: int) -> None:
    """Each rank's slices, concatenated in rank order, are the single-process batches."""
    whole = list(data.batches(3, batch_size, 7, views))
    ranks = [list(data.batches(3, batch_size, 7, views, shard=(r, world_size))) for r in range(world_size)]
    assert all(len(batches) == len(whole) for batches in ranks)  # every rank takes every step
    for i, batch in enumerate(whole):
        parts = [batches[i] for batches in ranks]
        assert [len(p["x"]) for p in parts] == [len(a) for a in np.array_split(np.arange(len(batch["x"])), world_size)]
        for key in batch:
            assert torch.equal(torch.cat([p[key] for p in parts]), batch[key]), key


@pytest.mark.unit
@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize("views", ["none", "cached"])
def test_ranks_split_every_batch_into_contiguous_disjoint_slices(world_size, views):
    n, per_sample = 23, 3
    g = torch.Generator().manual_seed(0)
    data = image.image_set(torch.rand(n, 16, generator=g), np.arange(100, 100 + n), [1, 4, 4],
                            {"row": torch.arange(n * per_sample)}, views=per_sample, recipe=augment.shift(1))
    for batch_size in (1, 4, 7, 64):  # 1 and 4: batches smaller than the world; 64: one batch
        split_batches(data, batch_size, views, world_size)


@pytest.mark.integration
def test_the_streaming_reader_splits_rows_the_same_way(built):
    cfg = student(built["params"], "mlp")
    data = image.rows(Cache.open(built["cache"]), built["prepared"], cfg, memory_mb=0.01)
    assert isinstance(data, loader.StreamingSet)
    split_batches(data, 64, "cached", 2)


@pytest.mark.unit
def test_shard_sizes_follow_array_split():
    for rows in range(0, 12):
        for world_size in (1, 2, 3, 5):
            slices = [parallel.shard(rows, r, world_size) for r in range(world_size)]
            expected = np.array_split(np.arange(rows), world_size)
            assert [list(range(rows))[s] for s in slices] == [list(e) for e in expected]


# --- torchrun ------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("name, options", [
    ("mlp", ()),  # soft, hard, hint, cosine, cached views; a rank without rows in each last batch
    ("rkd", ()),
    ("one_row", ("--memory-mb", "0.01")),  # batch 1 < 2 ranks, streamed part by part
])
def test_two_process_torchrun_matches_a_single_process(built, tmp_path, name, options):
    single, data_parallel, stdout = both_ways(built, tmp_path, name, *options)
    assert max_difference(single / "model.safetensors", data_parallel / "model.safetensors") < TOLERANCE
    assert max_difference(single / "baseline" / "model.safetensors",
                          data_parallel / "baseline" / "model.safetensors") < TOLERANCE
    assert log_difference(single / "train_log.csv", data_parallel / "train_log.csv") < TOLERANCE
    assert log_difference(single / "baseline" / "train_log.csv",
                          data_parallel / "baseline" / "train_log.csv") < TOLERANCE
    assert sorted(p.name for p in data_parallel.iterdir()) == sorted(p.name for p in single.iterdir())
    assert stdout.count(f"student {name}:") == 1  # rank 0 alone reports
    assert not any((tmp_path / "parallel" / "checkpoints").glob("*.pt"))  # removed by rank 0


@pytest.mark.e2e
def test_batchnorm_student_differs_by_per_rank_statistics_on_cpu(built, tmp_path):
    single, data_parallel, _ = both_ways(built, tmp_path, "cnn")
    difference = max_difference(single / "model.safetensors", data_parallel / "model.safetensors")
    print(f"cnn student, 2 ranks vs 1 process: max |weight difference| {difference:.3g}")
    assert difference < 0.5  # same training, other normalisation statistics
    assert log_difference(single / "train_log.csv", data_parallel / "train_log.csv") < 0.05


@pytest.mark.integration
def test_a_process_group_that_cannot_form_is_one_clear_line(built, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    result = invoke(distill.main, "mlp", *distill_args(built, tmp_path))
    assert_clean_error(result, "cannot join the process group", "WORLD_SIZE=2", "torchrun")
    assert not (tmp_path / "students").exists()


@pytest.mark.integration
def test_fsdp_for_an_image_student_is_one_clear_line(built, tmp_path):
    params = students_params(tmp_path / "params.yaml", img={**tiny_student(), "parallel": {"strategy": "fsdp"}})
    result = invoke(distill.main, "img", *distill_args({**built, "params": params}, tmp_path))
    assert_clean_error(result, "students.img.parallel.strategy: fsdp", "image student trains with ddp")


# --- text students -------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("world_size", [2, 3])
def test_text_ranks_split_every_batch_of_blocks_and_their_rows(world_size):
    from kd.tasks.masked_lm import masked_set
    from kd.tasks.next_token import block_set

    g = torch.Generator().manual_seed(0)
    n, length, maskings, masked = 23, 6, 3, 2
    tokens = torch.randint(50, (n, length), generator=g)
    positions = torch.randint(length, (n, maskings, masked), generator=g)
    seen = torch.randint(50, (n, maskings, masked), generator=g)
    for batch_size in (1, 4, 7, 64):
        ids = np.arange(n)
        split_batches(block_set(tokens, ids, {"label": torch.arange(n * (length - 1))}), batch_size, "none",
                      world_size)
        split_batches(masked_set(tokens, ids, positions, seen, {"label": torch.arange(n * maskings * masked)}),
                      batch_size, "cached", world_size)


@pytest.mark.e2e
def test_two_process_torchrun_text_student_matches_a_single_process(lm_world, tmp_path):
    """A causal GPT-2 student without dropout (each rank would draw its own masks) and its twin."""
    cache = tmp_path / "cache"
    ok(invoke(label.main, *label_args(lm_world, cache, "--top-k", 8)))
    entry = text_student()
    entry["arch_kwargs"] |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"gpt": {**entry, "epochs": 2, "transfer": ["unlabeled"]}}}))
    single, data_parallel, stdout = both_ways({"cache": cache, "prepared": lm_world / "prepared", "params": params},
                                              tmp_path, "gpt")
    for rel in ("model.safetensors", "baseline/model.safetensors"):
        assert max_difference(single / rel, data_parallel / rel) < TOLERANCE, rel
    assert log_difference(single / "train_log.csv", data_parallel / "train_log.csv") < TOLERANCE
    assert stdout.count("student gpt:") == 1
