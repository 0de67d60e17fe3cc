"""The per-token cache of a causal language model, and causal students trained from it.

Real files: CPython's pydoc text cut into 32-token blocks with a 512-entry tokenizer, a tiny
GPT-2 teacher trained for one epoch through `kd teacher`, then `kd label`. The rows are
checked against the teacher run directly, position by position; a tiny GPT-2 student and its
twin train through `kd distill` with the teacher's directory moved away, then `kd eval` and
`kd report`.
"""

from __future__ import annotations

import csv
import json
import math
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
import zarr

from kd import losses, tasks
from kd.cache import Cache
from kd.cache.store import Store
from kd.cache.verify import verify
from kd.cli import distill, label, report
from kd.cli import eval as eval_stage
from kd.errors import ConfigError
from kd.prepared import tokens
from tests.helpers import KILL_DISTILL, assert_streams_like_in_memory, digest, invoke, label_args, ok, text_student
from tests.helpers import LM_BLOCK as BLOCK


@pytest.mark.integration
def test_token_rows_are_the_teachers_next_token_distributions(lm_world, tmp_path):
    from kd import lm

    out = tmp_path / "cache"
    ok(invoke(label.main, *label_args(lm_world, out, "--top-k", 8, "--feature", "transformer.h.0=full")))
    assert verify(out, tasks.for_manifest) == []
    cache = Cache.open(out)
    assert cache.manifest["text"]["positions"] == BLOCK - 1 and cache.views == BLOCK - 1
    table = pq.read_table(out / "soft_targets" / "split=test" / "part-00000.parquet")
    assert table.column_names[:3] == ["id", "view", "position"]
    ids, blocks = tokens.read_blocks(lm_world / "prepared" / "test.parquet")
    model = lm.load(lm_world / "teacher")
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(blocks[:16])).logits[:, :-1].reshape(-1, 512)
    soft = cache.soft_targets("test", [1.0, 4.0], parts=[0])
    assert np.array_equal(soft.ids, np.repeat(ids[:16], BLOCK - 1))
    assert np.array_equal(table["position"].to_numpy(), np.tile(np.arange(BLOCK - 1), 16))
    shifted = logits - logits.max(1, keepdim=True).values
    top = shifted.topk(8, dim=1)
    assert np.array_equal(soft.topk_idx, top.indices.numpy())
    np.testing.assert_allclose(soft.topk_logit.astype(np.float32), top.values.numpy(), atol=2e-3)
    np.testing.assert_allclose(soft.lse[4.0], torch.logsumexp(shifted / 4, 1).numpy(), rtol=1e-6)
    hidden = zarr.open_array(str(out / "features.zarr" / "test" / "transformer.h.0"), mode="r")
    assert hidden.shape == (20 * (BLOCK - 1), 32)
    # the teacher's next-token accuracy, counted over every predicted token of the test split
    truth = blocks[:, 1:].reshape(-1)
    all_rows = cache.soft_targets("test", [])
    accuracy = float((all_rows.topk_idx[:, 0] == truth).mean())
    assert cache.manifest["fidelity"]["test"]["teacher_accuracy"] == pytest.approx(accuracy)


@pytest.mark.integration
def test_k_equal_to_the_vocabulary_reproduces_full_logit_distillation(lm_world, tmp_path):
    from kd import lm

    out = tmp_path / "cache"
    ok(invoke(label.main, *label_args(lm_world, out, "--top-k", 512, "--logit-dtype", "float32")))
    soft = Cache.open(out).soft_targets("test", [4.0], parts=[0])
    _, blocks = tokens.read_blocks(lm_world / "prepared" / "test.parquet")
    with torch.no_grad():
        teacher_logits = lm.load(lm_world / "teacher")(input_ids=torch.from_numpy(blocks[:16])).logits
    teacher_logits = teacher_logits[:, :-1].reshape(-1, 512)
    student = torch.randn(len(teacher_logits), 512, generator=torch.Generator().manual_seed(0)) * 3
    full = losses.soft_target_loss(student, teacher_logits, 4.0)
    for tail in ("bucket", "renorm"):
        cached = losses.topk_soft_target_loss(student, torch.tensor(soft.topk_idx), torch.tensor(soft.topk_logit),
                                              torch.tensor(soft.lse[4.0]), 4.0, tail=tail)
        assert float(cached) == pytest.approx(float(full), rel=1e-6)


@pytest.mark.integration
def test_kept_mass_grows_with_k_and_shards_equal_one_process(lm_world, tmp_path):
    kept = {}
    for k in (8, 32, 128):
        out = tmp_path / f"k{k}"
        ok(invoke(label.main, *label_args(lm_world, out, "--top-k", k)))
        kept[k] = Cache.open(out).manifest["fidelity"]["test"]["t1"]["kept_mass"]
    assert kept[8] < kept[32] < kept[128] <= 1
    sharded = tmp_path / "sharded"
    for shard in (0, 1):
        ok(invoke(label.main, *label_args(lm_world, sharded, "--top-k", 8, "--shard", shard, "--num-shards", 2)))
    digest = lambda root: {rel: Store(root).sha256(rel) for rel in Store(root).files("")  # noqa: E731
                           if not rel.split("/")[-1].startswith(".lock")}
    assert digest(sharded) == digest(tmp_path / "k8")


@pytest.mark.integration
def test_a_null_part_size_holds_a_fixed_number_of_rows_per_part(lm_world, tmp_path, monkeypatch):
    """label.part_size null (the default) cuts parts of PART_ROWS cache rows' worth of blocks,
    not 16,384 blocks (2M rows for 128-token blocks: a streamed student held a whole split),
    and writes exactly the cache that part size given by hand writes."""
    from kd.cache import writer

    args = [a for a in label_args(lm_world, tmp_path / "auto", "--top-k", 8) if a not in ("--part-size", 16)]
    monkeypatch.setattr(writer, "PART_ROWS", 16 * (BLOCK - 1) + 5)  # 16 blocks of BLOCK - 1 rows, and a few over
    ok(invoke(label.main, *args))
    ok(invoke(label.main, *label_args(lm_world, tmp_path / "explicit", "--top-k", 8)))
    auto = Cache.open(tmp_path / "auto")
    assert auto.manifest["label"]["part_size"] == 16 and len(auto.split("labeled")["parts"]) == 120 // 16 + 1
    digest = lambda root: {rel: Store(root).sha256(rel) for rel in Store(root).files("")  # noqa: E731
                           if not rel.split("/")[-1].startswith(".lock")}
    assert digest(tmp_path / "auto") == digest(tmp_path / "explicit")


@pytest.mark.integration
def test_a_pooled_token_feature_and_views_on_text_are_refused(lm_world, tmp_path):
    result = invoke(label.main, *label_args(lm_world, tmp_path / "c", "--feature", "transformer.h.0=pooled"))
    assert result.exit_code == 1 and "token rows cache hidden states in full" in result.output
    result = invoke(label.main, *label_args(lm_world, tmp_path / "c", "--views", 2))
    assert result.exit_code == 1 and "augmented views are for images" in result.output


# --- causal students from the per-token cache --------------------------------------------------


@pytest.mark.integration
def test_a_causal_student_trains_from_the_cache_alone_and_is_evaluated(lm_world, tmp_path):
    from kd.loader import SampleSet
    from kd.tasks.causal_lm import rows as token_set

    cache = tmp_path / "cache"
    ok(invoke(label.main, *label_args(lm_world, cache, "--top-k", 32)))
    teacher_dir = lm_world / "teacher"
    hidden = teacher_dir.with_name("teacher-hidden")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"s": text_student()}}))
    common = ["--cache", cache, "--prepared", lm_world / "prepared", "--students-dir", tmp_path / "students",
              "--params", params]
    teacher_dir.rename(hidden)  # the student never needs the teacher
    try:
        trained = ok(invoke(distill.main, "s", "--no-progress", *common))
    finally:
        hidden.rename(teacher_dir)
    assert "baseline twin next-token loss" in trained.output
    out = tmp_path / "students" / "s"
    for directory in (out, out / "baseline"):
        assert {"model.safetensors", "config.json", "tokenizer.json", "train_log.csv"} <= {
            p.name for p in directory.iterdir()}
    assert set(csv_header(out / "train_log.csv")) >= {"soft", "hard", "total"}
    assert set(csv_header(out / "baseline" / "train_log.csv")) >= {"hard"} and "soft" not in csv_header(
        out / "baseline" / "train_log.csv")
    evaluated = ok(invoke(eval_stage.main, "s", "--batch-size", 4, "--throughput-runs", 1, *common))
    assert "test perplexity" in evaluated.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"perplexity", "baseline_perplexity", "teacher_perplexity", "agreement", "kl_to_teacher", "params",
            "teacher_params", "size_bytes", "throughput_tokens_per_s", "speedup_vs_teacher", "ece"} <= set(metrics)
    assert 1 < metrics["perplexity"] < 512 * 2 and 0 <= metrics["agreement"] <= 1 and 0 < metrics["ece"] < 1
    # the per-position losses average to the perplexities (every position has as many tokens)
    positions = list(csv.DictReader((out / "plots" / "per_position.csv").open()))
    assert [int(r["position"]) for r in positions] == list(range(1, BLOCK))
    for column, key in (("student", "perplexity"), ("baseline", "baseline_perplexity")):
        mean = sum(float(r[column]) for r in positions) / len(positions)
        assert math.exp(mean) == pytest.approx(metrics[key], rel=1e-5)

    report_dir = tmp_path / "report"
    reported = ok(invoke(report.main, "--cache", cache, "--students-dir", tmp_path / "students", "--params", params,
                         "--out", report_dir))
    assert "text report on 1 students (best: s)" in reported.output
    text = (report_dir / "report.md").read_text()
    kept = Cache.open(cache).manifest["fidelity"]["test"]["t1"]["kept_mass"]
    assert f"T=1: {100 * kept:.1f}%" in text and "top-32 of 512" in text
    assert "| one seed (no spread) |" in text and "± 0.0" not in text  # one seed: no spread to show
    assert f"test perplexity {metrics['perplexity']:.1f}" in text
    assert f"twin's {metrics['baseline_perplexity']:.1f}" in text
    assert {p.name for p in report_dir.iterdir()} == {"report.md", "leaderboard.csv", "perplexity_vs_params.png",
                                                     "training_curves.png", "per_position.png"}
    # every cache row lines up with the student's logits row of the same (block, position)
    rows = token_set(Cache.open(cache), lm_world / "prepared", from_mapping_student(text_student()), memory_mb=2048)
    assert isinstance(rows, SampleSet) and len(rows.targets["label"]) == len(rows) * (BLOCK - 1)
    batch = next(rows.batches(0, 4, 0))
    assert torch.equal(batch["label"], batch["x"][:, 1:].reshape(-1))


@pytest.mark.integration
def test_text_students_refuse_what_they_cannot_do_yet(lm_world, tmp_path):
    cache = tmp_path / "cache"
    ok(invoke(label.main, *label_args(lm_world, cache, "--top-k", 8)))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"students": {
        "mlp": {**text_student(), "arch": "mlp"},
        "hint": text_student(soft={"temperature": 4}, hint={"teacher_layer": "a", "student_layer": "b"}),
        "hot": text_student(soft={"temperature": 3})}}))
    common = ["--no-progress", "--cache", cache, "--prepared", lm_world / "prepared", "--students-dir",
              tmp_path / "students", "--params", params]
    for name, message in (("mlp", "must be gpt2"), ("hint", "hint not supported for causal LM students"),
                          ("hot", "needs temperature 3")):
        result = invoke(distill.main, name, *common)
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "students" / name).exists()


def csv_header(path) -> list[str]:
    return path.read_text().splitlines()[0].split(",")


def from_mapping_student(entry: dict[str, Any]):
    from kd.config import StudentConfig, from_mapping

    return from_mapping(StudentConfig, {**entry, "name": "s"}, "students.s")


@pytest.mark.unit
def test_text_students_is_the_students_section_under_another_name(tmp_path):
    from kd.config import student, student_names

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"students": {"a": {}}, "text_students": {"b": text_student()}}))
    assert student_names(params) == ["a", "b"]
    assert student(params, "b").where == "text_students.b" and student(params, "b").arch == "gpt2"
    params.write_text(yaml.safe_dump({"students": {"a": {}}, "text_students": {"a": {}}}))
    with pytest.raises(ConfigError, match="students/text_students.a is defined twice"):
        student(params, "a")
    with pytest.raises(ConfigError, match=r"students.c is not defined \(defined: a, a\)"):
        student(params, "c")


@pytest.mark.integration
def test_a_causal_student_killed_with_sigkill_resumes_to_the_same_weights(lm_world, tmp_path, child_env):
    import signal
    import subprocess
    import sys

    cache = tmp_path / "cache"
    ok(invoke(label.main, *label_args(lm_world, cache, "--top-k", 8)))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"s": {**text_student(), "epochs": 3}}}))

    def args(out):
        return ["s", "--no-progress", "--cache", str(cache), "--prepared", str(lm_world / "prepared"),
                "--students-dir", str(out / "students"), "--baselines", str(out / "baselines"),
                "--checkpoints", str(out / "checkpoints"), "--params", str(params)]

    ok(invoke(distill.main, *args(tmp_path / "reference")))
    out = tmp_path / "resumed"
    killed = subprocess.run([sys.executable, "-c", KILL_DISTILL, "2", *args(out)], capture_output=True, text=True,
                            env=child_env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "students" / "s").exists()  # nothing that looks finished
    assert any((out / "checkpoints").glob("*.pt"))
    ok(invoke(distill.main, *args(out)))
    assert digest(out / "students" / "s") == digest(tmp_path / "reference" / "students" / "s")
    assert not any((out / "checkpoints").glob("*.pt"))  # removed once training is done


@pytest.mark.integration
def test_hard_threshold_keeps_only_confident_pseudo_labels_of_a_text_student(lm_world, tmp_path):
    from kd.tasks import causal_lm

    cache = tmp_path / "cache"
    ok(invoke(label.main, *label_args(lm_world, cache, "--top-k", 8)))
    opened = Cache.open(cache)
    soft = opened.soft_targets("unlabeled", [1.0])
    confidence = np.exp(-soft.lse[1.0])  # the teacher's p(top-1) at T=1
    threshold = float(np.median(confidence))
    cfg = from_mapping_student({**text_student(hard={"weight": 1.0, "labels": False, "pseudo": True,
                                                     "threshold": threshold}), "transfer": ["unlabeled"]})
    rows = causal_lm.rows(opened, lm_world / "prepared", cfg, memory_mb=2048)
    label_ = rows.targets["label"].numpy()
    confident = confidence >= threshold
    assert 0 < confident.sum() < len(confident)
    np.testing.assert_array_equal(label_[~confident], -1)
    np.testing.assert_array_equal(label_[confident], soft.topk_idx[confident, 0])
    # through the CLI: the student trains on the confident rows' pseudo-labels alone
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"s": {
        **text_student(hard={"weight": 1.0, "labels": False, "pseudo": True, "threshold": threshold}),
        "transfer": ["unlabeled"]}}}))
    ok(invoke(distill.main, "s", "--no-progress", "--cache", cache, "--prepared", lm_world / "prepared",
              "--students-dir", tmp_path / "students", "--baselines", tmp_path / "baselines",
              "--checkpoints", tmp_path / "checkpoints", "--params", params))
    assert (tmp_path / "students" / "s" / "model.safetensors").is_file()


@pytest.mark.integration
def test_a_text_student_over_the_memory_budget_streams_the_cache(lm_world, tmp_path):
    from kd.loader import SampleSet, StreamingSet
    from kd.tasks import causal_lm

    cache = tmp_path / "cache"
    ok(invoke(label.main, *label_args(lm_world, cache, "--top-k", 8)))
    cfg = from_mapping_student({**text_student(), "transfer": ["labeled", "unlabeled"]})
    opened = Cache.open(cache)
    in_memory = causal_lm.rows(opened, lm_world / "prepared", cfg, memory_mb=2048)
    streamed = causal_lm.rows(opened, lm_world / "prepared", cfg, memory_mb=0.01)
    assert isinstance(in_memory, SampleSet) and isinstance(streamed, StreamingSet)
    assert len(opened.split("labeled")["parts"]) > 1  # parts of 16 blocks: several buffers
    assert_streams_like_in_memory(in_memory, streamed, views="none")
    # through the CLI: the student trains from the stream
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"s": text_student()}}))
    ok(invoke(distill.main, "s", "--no-progress", "--memory-mb", 0.01, "--cache", cache, "--prepared",
              lm_world / "prepared", "--students-dir", tmp_path / "students", "--baselines", tmp_path / "baselines",
              "--params", params))
    assert (tmp_path / "students" / "s" / "model.safetensors").is_file()
