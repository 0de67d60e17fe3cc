"""A task's subset of the documents (`prepare.keep`) and students scored on several test sets
(`kd eval --out`, `kd report --test-set`): what the task-specific vs general experiment runs."""

from __future__ import annotations

import csv
import json
import re

import pytest

from kd.cli import distill, label, prepare, report
from kd.cli import eval as eval_stage
from kd.config import PrepareConfig, Shares
from kd.prepared import tokens
from kd.sources import text as text_source
from tests.helpers import invoke, ok

KEEP = r"^(Customizing|Basic customization|Emulating|Special method|Class definitions)"


@pytest.mark.unit
def test_keep_filters_after_the_deal_so_a_task_never_trains_on_general_test_text():
    cfg = PrepareConfig(dataset="pydoc", shares=Shares(labeled=0.7, unlabeled=0.2, test=0.1), seed=0)
    docs = text_source.documents(cfg)
    dealt = text_source.deal([len(d) for d in docs], cfg)
    task = PrepareConfig(dataset="pydoc", shares=cfg.shares, seed=0, keep=KEEP)
    for chosen in dealt.values():
        kept = [i for i in chosen if text_source.kept(task, docs[i])]
        assert all(re.search(KEEP, docs[i].splitlines()[0]) for i in kept)
        assert [i for i in chosen if re.search(KEEP, docs[i].splitlines()[0])] == kept
    with pytest.raises(Exception, match="prepare.keep"):
        text_source.kept(PrepareConfig(dataset="pydoc", keep="("), docs[0])


@pytest.fixture(scope="module")
def task_world(lm_world, tmp_path_factory):
    """lm_world plus the task's subset cut with the teacher's tokenizer, both caches, and one
    student distilled on the general text."""
    root = tmp_path_factory.mktemp("task")
    params = root / "params.yaml"
    params.write_text(json.dumps({"students": {"s": {
        "arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "epochs": 1, "batch_size": 8,
        "transfer": ["unlabeled"], "repeats": 2, "loss": {"soft": {"weight": 0.5, "temperature": 1},
                                                          "hard": {"weight": 0.5, "labels": True}}}}}))
    ok(invoke(prepare.main, "--dataset", "pydoc", "--tokenizer", lm_world / "teacher", "--keep", KEEP,
              "--block-size", 32, "--labeled", 10, "--unlabeled", 10, "--test", 10, "--params", params,
              "--out", root / "task_prepared"))
    for prepared, out in ((lm_world / "prepared", root / "general_cache"),
                          (root / "task_prepared", root / "task_cache")):
        ok(invoke(label.main, "--no-progress", "--teacher", lm_world / "teacher", "--prepared", prepared,
                  "--out", out, "--params", params, "--top-k", 8))
    ok(invoke(distill.main, "s", "--no-progress", "--params", params, "--cache", root / "general_cache", "--prepared",
              lm_world / "prepared", "--students-dir", root / "students", "--baselines", root / "baselines",
              "--checkpoints", root / "checkpoints"))
    return root


@pytest.mark.integration
def test_a_student_is_scored_on_another_test_set_and_the_report_puts_both_side_by_side(lm_world, task_world):
    root, params = task_world, task_world / "params.yaml"
    assert tokens.split_info(root / "task_prepared" / "test.parquet")["tokenizer_sha256"] == \
        tokens.split_info(lm_world / "prepared" / "test.parquet")["tokenizer_sha256"]
    ok(invoke(eval_stage.main, "s", "--params", params, "--cache", root / "general_cache", "--prepared",
              lm_world / "prepared", "--students-dir", root / "students"))
    ok(invoke(eval_stage.main, "s", "--params", params, "--cache", root / "task_cache", "--prepared",
              root / "task_prepared", "--students-dir", root / "students", "--out", root / "eval_task" / "s"))
    general = json.loads((root / "students" / "s" / "metrics.json").read_text())
    task = json.loads((root / "eval_task" / "s" / "metrics.json").read_text())
    assert general["test_tokens"] == 20 * 31 and task["test_tokens"] == 10 * 31
    assert general["perplexity"] != task["perplexity"] and task["seeds"] == 2
    ok(invoke(report.main, "--params", params, "--cache", root / "general_cache", "--students-dir", root / "students",
              "--out", root / "report", "--test-set", f"task={root / 'eval_task'}"))
    markdown = (root / "report" / "report.md").read_text()
    assert "## Test sets" in markdown and "| student | cache | task |" in markdown
    with open(root / "report" / "test_sets.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["student"], r["test_set"]) for r in rows] == [("s", "cache"), ("s", "task")]
    assert float(rows[1]["score_mean"]) == pytest.approx(task["perplexity_mean"], rel=1e-5)
    result = invoke(report.main, "--params", params, "--cache", root / "general_cache", "--students-dir",
                    root / "students", "--out", root / "report2", "--test-set", "task", expect=1)
    assert "LABEL=DIR" in result.output
    result = invoke(report.main, "--params", params, "--cache", root / "general_cache", "--students-dir",
                    root / "students", "--out", root / "report2", "--test-set", f"other={root / 'nowhere'}", expect=1)
    assert "kd eval s" in result.output and not (root / "report2").exists()
