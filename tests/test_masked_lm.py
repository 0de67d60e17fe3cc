"""The masked-LM cache (recorded masks) and DistilBERT-style students trained from it.

Real files: CPython's pydoc text in 32-token blocks with a 512-entry tokenizer, a tiny
two-layer BERT teacher trained through `kd teacher`, then `kd label` with two maskings per
block, a hidden layer and a copy of the teacher. The rows are checked against the teacher run
directly on the recorded masked blocks; a one-layer student starts from the teacher's layers
and trains with the triple loss through `kd distill` with the teacher's directory moved away,
then `kd eval` and `kd report`.
"""

from __future__ import annotations

import csv
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from kd import lm, masking, tasks
from kd.cache import Cache
from kd.cache.verify import verify
from kd.cli import distill, label, prepare, report, teacher
from kd.cli import eval as eval_stage
from kd.config import StudentConfig, from_mapping
from kd.errors import ConfigError
from kd.prepared import tokens
from tests.helpers import assert_streams_like_in_memory, invoke, ok

BLOCK, MASKED = 32, 5  # 15% of 32 tokens, rounded
TEACHER_KWARGS = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
LAYER = "bert.encoder.layer.1"  # the teacher's last layer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    params = root / "params.yaml"
    params.write_text("{}\n")
    ok(invoke(prepare.main, "--dataset", "pydoc", "--vocab-size", 512, "--block-size", BLOCK, "--labeled", 100,
              "--unlabeled", 40, "--test", 20, "--params", params, "--out", root / "prepared"))
    ok(invoke(teacher.main, "--arch", "bert", "--arch-kwargs", json.dumps(TEACHER_KWARGS), "--epochs", 2,
              "--batch-size", 16, "--no-progress", "--prepared", root / "prepared", "--out", root / "teacher",
              "--params", params))
    ok(invoke(label.main, "--no-progress", "--teacher", root / "teacher", "--prepared", root / "prepared",
              "--out", root / "cache", "--params", params, "--top-k", 16, "--views", 1, "--keep-teacher",
              "--feature", f"{LAYER}=full", "--part-size", 64))
    return root


@pytest.mark.integration
def test_masked_rows_record_their_masks_and_are_the_teachers_outputs_on_them(world):
    cache = Cache.open(world / "cache")
    info = cache.manifest["text"]
    assert info["objective"] == "masked" and info["positions"] == MASKED and cache.views == 2 * MASKED
    assert verify(world / "cache", tasks.for_manifest) == []
    model = lm.load(world / "teacher")
    _, special = tokens.load_tokenizer(world / "prepared")
    ids, blocks = tokens.read_blocks(world / "prepared" / "test.parquet")
    table = pq.read_table(world / "cache" / cache.split("test")["parts"][0]["path"]).slice(0, 8 * 2 * MASKED)
    assert table.column_names[:5] == ["id", "view", "position", "input_token", "topk_idx"]
    rows_ids, views = table["id"].to_numpy(), table["view"].to_numpy()
    assert (rows_ids == np.repeat(ids[:8], 2 * MASKED)).all()
    assert (views == np.tile(np.repeat([0, 1], MASKED), 8)).all()
    position = torch.tensor(table["position"].to_numpy(), dtype=torch.long).reshape(16, MASKED)
    seen = torch.tensor(table["input_token"].to_numpy(), dtype=torch.long).reshape(16, MASKED)
    block_tensor = torch.from_numpy(blocks[:8]).long().repeat_interleave(2, 0)
    # the masks are BERT's, a pure function of (seed, id, view): drawn again, they are the same
    drawn_position, drawn_seen = masking.fixed_masks(block_tensor, np.repeat(ids[:8], 2), np.tile([0, 1], 8), MASKED,
                                                     special, 512, seed=0)
    assert torch.equal(drawn_position, position) and torch.equal(drawn_seen, seen)
    assert not torch.equal(position[0::2], position[1::2])  # the two maskings differ
    assert (seen == special.mask).float().mean() > 0.5
    # each row is the teacher's output at that position of the masked block
    inputs = masking.apply_masks(block_tensor, position, seen)
    with torch.no_grad():
        out = model(input_ids=inputs, output_hidden_states=True)
    at = (torch.arange(16)[:, None], position)
    logits = out.logits[at].reshape(-1, 512)
    top = logits.topk(16, dim=1)
    cached_idx = np.stack(table["topk_idx"].to_numpy(zero_copy_only=False))
    assert (cached_idx[:, 0] == top.indices[:, 0].numpy()).all()
    cached_logit = np.stack(table["topk_logit"].to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(cached_logit, (top.values - top.values[:, :1]).numpy(), atol=2e-2)
    features = cache.feature("test", LAYER)[:16 * MASKED]
    np.testing.assert_allclose(features, out.hidden_states[2][at].reshape(-1, 32).numpy(), atol=1e-2)


@pytest.mark.integration
def test_the_teachers_copy_is_checked_by_verify(world, tmp_path):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(world / "cache", copy)
    weights = copy / "teacher" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert any("teacher/model.safetensors: sha256 differs" in p for p in verify(copy, tasks.for_manifest))


def masked_student(**changes: Any) -> dict[str, Any]:
    entry = {"arch": "bert", "arch_kwargs": {**TEACHER_KWARGS, "num_hidden_layers": 1}, "epochs": 2,
             "batch_size": 16, "lr": 0.003, "init": "teacher", "views": True,
             "loss": {"soft": {"weight": 0.5, "temperature": 4}, "hard": {"weight": 0.3, "labels": True},
                      "cosine": {"teacher_layer": LAYER, "student_layer": "hidden.1", "weight": 0.2}}}
    return {**entry, **changes}


@pytest.mark.integration
def test_a_masked_student_with_the_triple_loss_trains_from_the_cache_alone(world, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"mlm_students": {"m": masked_student(repeats=2)}}))
    common = ["--cache", world / "cache", "--prepared", world / "prepared", "--students-dir", tmp_path / "students",
              "--params", params]
    hidden = world / "teacher-hidden"
    (world / "teacher").rename(hidden)  # the student never needs the teacher's directory
    try:
        trained = ok(invoke(distill.main, "m", "--no-progress", *common))
    finally:
        hidden.rename(world / "teacher")
    assert "cosine" in trained.output and "baseline twin masked-LM loss" in trained.output
    assert "seeds 0, 1" in trained.output
    out = tmp_path / "students" / "m"
    assert json.loads((out / "seeds" / "1" / "student.json").read_text())["student"]["seed"] == 1
    assert (out / "seeds" / "1" / "baseline" / "model.safetensors").is_file()
    header = (out / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"soft", "hard", "cosine", "total"} <= set(header)
    assert "soft" not in (out / "baseline" / "train_log.csv").read_text().splitlines()[0]
    evaluated = ok(invoke(eval_stage.main, "m", "--batch-size", 8, "--throughput-runs", 1, *common))
    assert "masked-token accuracy" in evaluated.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "masked" and metrics["test_tokens"] == 20 * 2 * MASKED
    assert 0 <= metrics["masked_accuracy"] <= 1 and metrics["params"] < metrics["teacher_params"]
    # the teacher is scored on the same masked tokens: its cached top-1 against the true tokens
    cache = Cache.open(world / "cache")
    position, _ = cache.masks("test")
    _, blocks = tokens.read_blocks(world / "prepared" / "test.parquet")
    truth = np.take_along_axis(np.repeat(blocks, 2, axis=0), position.reshape(-1, MASKED), 1).reshape(-1)
    top1 = cache.soft_targets("test", []).topk_idx[:, 0]
    assert metrics["teacher_masked_accuracy"] == pytest.approx((top1 == truth).mean())
    seeds = list(csv.DictReader((out / "plots" / "seeds.csv").open()))
    assert [int(r["seed"]) for r in seeds] == [0, 1] and metrics["seeds"] == 2
    assert float(seeds[0]["student"]) == pytest.approx(metrics["masked_accuracy"])
    assert float(seeds[0]["baseline"]) == pytest.approx(metrics["baseline_masked_accuracy"])
    gains = [100 * (float(r["student"]) - float(r["baseline"])) for r in seeds]
    assert metrics["accuracy_gain_points_mean"] == pytest.approx(np.mean(gains))
    assert metrics["accuracy_gain_points_std"] == pytest.approx(np.std(gains, ddof=1))
    # calibration of every seed's predicted token, the first seed's beside its twin's
    assert 0 < metrics["ece"] < 1 and 0 < metrics["baseline_ece"] < 1 and metrics["ece_std"] > 0
    assert metrics["ece_change_mean"] == pytest.approx(metrics["ece_mean"] - metrics["baseline_ece_mean"])
    assert "over 2 seeds" in evaluated.output
    reported = ok(invoke(report.main, "--cache", world / "cache", "--students-dir", tmp_path / "students",
                         "--params", params, "--out", tmp_path / "report"))
    assert "text report on 1 students" in reported.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"masked-token accuracy {metrics['masked_accuracy']:.4f}" in md and "accuracy_vs_params.png" in md
    assert f"Over 2 seeds: {metrics['masked_accuracy_mean']:.4f} ± {metrics['masked_accuracy_std']:.4f}" in md


@pytest.mark.unit
def test_a_student_starts_from_every_other_teacher_layer():
    _, special = None, tokens.SpecialIds(pad=0, eos=1, mask=2)
    torch.manual_seed(0)
    teacher_model = lm.build("bert", {**TEACHER_KWARGS, "num_hidden_layers": 4}, 64, 16, special)
    student = lm.build("bert", {**TEACHER_KWARGS, "num_hidden_layers": 2}, 64, 16, special)
    assert lm.init_from_teacher(student, teacher_model) == [0, 2]
    for s, t in ((0, 0), (1, 2)):
        for (name, a), (_, b) in zip(student.bert.encoder.layer[s].named_parameters(),
                                     teacher_model.bert.encoder.layer[t].named_parameters()):
            assert torch.equal(a, b), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight,
                       teacher_model.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.cls.predictions.transform.dense.weight,
                       teacher_model.cls.predictions.transform.dense.weight)
    wide = lm.build("bert", {**TEACHER_KWARGS, "hidden_size": 64}, 64, 16, special)
    with pytest.raises(ConfigError, match="hidden_size is 64, the teacher's 32"):
        lm.init_from_teacher(wide, teacher_model)


@pytest.mark.integration
def test_masked_students_refuse_what_the_cache_cannot_give(world, tmp_path):
    bare = tmp_path / "bare"
    ok(invoke(label.main, "--no-progress", "--teacher", world / "teacher", "--prepared", world / "prepared",
              "--out", bare, "--params", world / "params.yaml", "--top-k", 16))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {
        "init": masked_student(loss={"hard": {"labels": True}}, views=False),
        "views": masked_student(loss={"hard": {"labels": True}}, init=None),
        "layer": masked_student(init=None, views=False, loss={"cosine": {"teacher_layer": LAYER,
                                                                        "student_layer": "bert.encoder.layer.0"}}),
        "gpt": {**masked_student(init=None, views=False), "arch": "gpt2", "arch_kwargs": {}}}}))
    for name, message in (("init", "set label.keep_teacher: true"), ("views", "holds one masking per block"),
                          ("layer", "a masked LM student's layers are hidden.N"),
                          ("gpt", "a student of a masked LM cache must be bert")):
        result = invoke(distill.main, name, "--no-progress", "--cache", bare, "--prepared", world / "prepared",
                        "--students-dir", tmp_path / "students", "--params", params)
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "students" / name).exists()


@pytest.mark.integration
def test_a_masked_student_over_the_memory_budget_streams_the_cache(world):
    from kd.loader import SampleSet, StreamingSet
    from kd.tasks import masked_lm

    cache = Cache.open(world / "cache")
    cfg = from_mapping(StudentConfig, {**masked_student(), "transfer": ["labeled", "unlabeled"]}, "mlm_students.m")
    in_memory = masked_lm.rows(cache, world / "prepared", cfg, memory_mb=2048)
    streamed = masked_lm.rows(cache, world / "prepared", cfg, memory_mb=0.01)
    assert isinstance(in_memory, SampleSet) and isinstance(streamed, StreamingSet)
    assert (in_memory.views, in_memory.per_view) == (2, MASKED) and len(cache.split("labeled")["parts"]) > 1
    assert_streams_like_in_memory(in_memory, streamed, views="cached")
    # the twin: the same blocks and maskings, the original tokens as labels
    twin = masked_lm.twin_rows(cache, world / "prepared", cfg, streamed)
    assert torch.equal(twin.inputs["positions"], in_memory.inputs["positions"])
    assert torch.equal(twin.targets["label"], in_memory.inputs["tokens"].gather(
        1, in_memory.inputs["positions"].flatten(1)).reshape(-1))
