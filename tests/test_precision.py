"""`precision: bf16-mixed` and `gradient_checkpointing` for language models: the same weights
with and without checkpointing, bf16-mixed through `kd distill` and `kd teacher` on text, and the
refusals (an unknown precision, an image model)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml

from kd import lm, methods, training
from kd.cli import distill, label, teacher
from kd.config import StudentConfig, from_mapping
from kd.errors import ConfigError
from kd.methods.common import Shapes
from kd.tasks.next_token import TokenRows
from tests.helpers import LM_BLOCK, assert_clean_error, invoke, label_args, ok, text_student


def _gpt2(checkpointing: bool) -> TokenRows:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # dropout 0.1 everywhere: the recomputed forward must draw the same masks
    config = GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return TokenRows(lm.checkpointing(GPT2LMHeadModel(config), checkpointing))


@pytest.mark.unit
def test_gradient_checkpointing_gives_the_same_weights():
    cfg = from_mapping(StudentConfig, {"arch": "gpt2", "name": "s", "section": "text_students",
                                       "loss": {"soft": {"weight": 0.5}, "hard": {"weight": 0.5}}}, "s")
    terms = methods.student_terms(cfg, Shapes({}, {})).terms
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        blocks = torch.randint(0, 61, (4, 12), generator=g)
        teacher = torch.randn(4 * 11, 61, generator=g)
        top = teacher.topk(5, dim=1)
        batches.append({"x": blocks, "topk_idx": top.indices, "topk_logit": top.values - teacher.max(1).values[:, None],
                        "lse": ((teacher - teacher.max(1, keepdim=True).values) / 4).logsumexp(1),
                        "label": blocks[:, 1:].reshape(-1)})
    weights = []
    for checkpointing in (False, True):
        model = _gpt2(checkpointing)
        model.train()
        assert getattr(model.model, "is_activation_checkpointing", None) in (checkpointing, None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        torch.manual_seed(5)
        for batch in batches:
            training.update(model, batch, terms, optimizer)
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        # atol: the attention's key bias has a gradient of ~0 (softmax ignores it), whose rounding
        # AdamW scales up to ~1e-6; every other weight agrees to ~1e-7
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.unit
def test_an_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match=r"text_students.s.precision: 'fp16' must be one of fp32, bf16-mixed"):
        from_mapping(StudentConfig, {"arch": "gpt2", "name": "s", "section": "text_students", "precision": "fp16",
                                     "loss": {"hard": {}}}, "text_students.s")


@pytest.mark.integration
@pytest.mark.slow
def test_bf16_mixed_and_checkpointing_train_a_text_student_and_teacher_through_the_cli(lm_world, tmp_path):
    cache = tmp_path / "cache"
    ok(invoke(label.main, *label_args(lm_world, cache, "--top-k", 8)))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"s": {**text_student(), "precision": "bf16-mixed"}}}))
    common = ["--cache", cache, "--prepared", lm_world / "prepared", "--students-dir", tmp_path / "students",
              "--baselines", tmp_path / "baselines", "--checkpoints", tmp_path / "checkpoints", "--params", params]
    trained = ok(invoke(distill.main, "s", "--no-progress", "--gradient-checkpointing", *common))
    assert "student s" in trained.output
    out = tmp_path / "students" / "s"
    with open(out / "train_log.csv", newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    assert all(math.isfinite(float(row[key])) for key in ("soft", "hard", "total"))
    record = json.loads((out / "student.json").read_text())["student"]
    assert record["precision"] == "bf16-mixed" and record["gradient_checkpointing"] is True
    assert lm.load(out).dtype == torch.float32  # float32 master weights, saved as such
    # the same student in fp32: another twin (its key holds the precision), a close loss
    ok(invoke(distill.main, "s", "--no-progress", "--precision", "fp32", "--students-dir", tmp_path / "fp32",
              *common[:4], *common[6:]))
    assert len(list((tmp_path / "baselines").iterdir())) == 2
    with open(tmp_path / "fp32" / "s" / "train_log.csv", newline="") as handle:
        fp32 = list(csv.DictReader(handle))[-1]
    assert float(row["total"]) == pytest.approx(float(fp32["total"]), rel=0.05)
    assert_clean_error(invoke(distill.main, "s", "--no-progress", "--precision", "fp16", *common),
                       "text_students.s.precision", "'fp16'", "bf16-mixed")

    ok(invoke(teacher.main, "--arch", "gpt2", "--arch-kwargs", '{"n_layer": 1, "n_head": 2, "n_embd": 32}',
              "--epochs", 1, "--batch-size", 16, "--no-progress", "--prepared", lm_world / "prepared",
              "--out", tmp_path / "teacher", "--params", lm_world / "params.yaml", "--precision", "bf16-mixed",
              "--gradient-checkpointing"))
    metrics = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] < 512
    assert json.loads((tmp_path / "teacher" / "training.json").read_text())["training"]["precision"] == "bf16-mixed"
    assert LM_BLOCK == 32


@pytest.mark.integration
def test_precision_and_checkpointing_are_refused_for_image_models(tmp_path):
    from kd.cli import prepare

    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    ok(invoke(prepare.main, "--dataset", "digits", "--labeled", 50, "--unlabeled", 10, "--test", 10,
              "--params", params, "--out", tmp_path / "prepared"))
    common = ["--arch", "mlp", "--epochs", 1, "--no-progress", "--prepared", tmp_path / "prepared",
              "--out", tmp_path / "teacher", "--params", params]
    assert_clean_error(invoke(teacher.main, *common, "--precision", "bf16-mixed"),
                       "teacher.precision", "'bf16-mixed'", "language models")
    assert_clean_error(invoke(teacher.main, *common, "--gradient-checkpointing"),
                       "teacher.gradient_checkpointing", "language models")
