"""The whole pipeline through DVC on a tiny configuration, as a new user runs it.

Copies the repository's dvc.yaml with the stage and library sources into a fresh git + DVC
repository, writes a tiny params.yaml (the 8x8 digits, small models, one or two epochs) and a
tiny params_text.yaml (pydoc in 32-token blocks, a one-layer GPT-2 teacher and student) and a
tiny params_mlm.yaml (a two-layer BERT teacher, a one-layer student started from it), a tiny
params_images.yaml (the digits again, with crop-and-flip views) and a tiny params_gen.yaml (300
sums, a teacher's answers to 150 of them) and runs `dvc repro`: every stage of the five
pipelines, then nothing, then only a newly added student of the image, text and generative
pipelines.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import copy_pipelines, dvc_repo
from tests.helpers import run_in as run

pytestmark = pytest.mark.e2e

TINY = {
    "prepare": {"dataset": "digits", "labeled": 200, "unlabeled": 300, "test": 200, "seed": 0},
    "teacher": {"arch": "cnn", "arch_kwargs": {"widths": [8, 16], "hidden": 64}, "epochs": 8, "batch_size": 32,
                "lr": 0.005, "shift": 0, "seed": 0},
    "label": {"top_k": 5, "temperatures": [1, 4]},
    "assistants": {},
    "students": {
        "mlp": {"arch": "mlp", "arch_kwargs": {"hidden": [32]}, "epochs": 2, "batch_size": 32, "lr": 0.003,
                "loss": {"soft": {"weight": 0.9, "temperature": 4}, "hard": {"weight": 0.1}}},
        "pseudo": {"arch": "mlp", "arch_kwargs": {"hidden": [32]}, "epochs": 2, "batch_size": 32, "lr": 0.003,
                   "loss": {"hard": {"weight": 1.0, "labels": True, "pseudo": True}}},
    },
    "eval": {"latency_runs": 5, "throughput_runs": 2, "throughput_batch": 64},
}

TINY_TEXT = {
    "prepare": {"dataset": "pydoc", "vocab_size": 512, "block_size": 32, "labeled": 100, "unlabeled": 40,
                "test": 20, "seed": 0},
    "teacher": {"arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "epochs": 1,
                "batch_size": 16, "lr": 0.003, "seed": 0},
    "label": {"top_k": 8, "temperatures": [1, 4], "batch_size": 1024},
    "text_students": {
        "gpt_tiny": {"arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16}, "epochs": 1,
                     "batch_size": 16, "lr": 0.003, "transfer": ["unlabeled"],
                     "loss": {"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5, "labels": True}}},
    },
    "eval": {"batch_size": 8, "throughput_runs": 2},
}
BERT = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
TINY_MLM = {
    "teacher": {"arch": "bert", "arch_kwargs": BERT, "epochs": 1, "batch_size": 16, "lr": 0.003, "seed": 0},
    "label": {"top_k": 8, "temperatures": [1, 4], "views": 1, "keep_teacher": True,
              "features": {"bert.encoder.layer.1": "full"}, "batch_size": 1024},
    "mlm_students": {
        "distil": {"arch": "bert", "arch_kwargs": {**BERT, "num_hidden_layers": 1}, "init": "teacher", "views": True,
                   "epochs": 1, "batch_size": 16, "lr": 0.003,
                   "loss": {"soft": {"weight": 0.5, "temperature": 4}, "hard": {"weight": 0.3, "labels": True},
                            "cosine": {"teacher_layer": "bert.encoder.layer.1", "student_layer": "hidden.1",
                                       "weight": 0.2}}},
    },
    "eval": {"batch_size": 8, "throughput_runs": 2},
}
TINY_IMAGES = {
    "prepare": {"dataset": "digits", "labeled": 100, "unlabeled": 100, "test": 100, "seed": 0},
    "teacher": {"arch": "cnn", "arch_kwargs": {"widths": [4], "hidden": 16}, "epochs": 1, "batch_size": 32,
                "lr": 0.005, "view_recipe": "crop_flip", "seed": 0},
    "label": {"top_k": 5, "temperatures": [1, 4], "views": 2, "view_recipe": "crop_flip"},
    "img_students": {
        "views": {"arch": "mlp", "arch_kwargs": {"hidden": [16]}, "epochs": 1, "batch_size": 32, "lr": 0.003,
                  "views": True, "loss": {"soft": {"weight": 1.0, "temperature": 4}}},
    },
    "eval": {"latency_runs": 5, "throughput_runs": 2, "throughput_batch": 64},
}
TINY_GEN = {
    "prepare": {"dataset": "addition", "samples": 300, "shares": {"labeled": 0.2, "unlabeled": 0.5, "test": 0.3},
                "labeled": None, "unlabeled": None, "test": 40, "vocab_size": 259, "block_size": 12, "seed": 0},
    "teacher": {"arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16}, "epochs": 1,
                "batch_size": 32, "lr": 0.003, "seed": 0},
    "generate": {"max_new_tokens": 4, "batch_size": 64, "part_size": 64},
    "label": {"top_k": 4, "temperatures": [1], "batch_size": 1024},
    "gen_students": {
        "answers": {"arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16}, "epochs": 1,
                    "batch_size": 32, "lr": 0.003, "transfer": ["labeled", "unlabeled"],
                    "loss": {"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5, "labels": True}}},
    },
    "eval": {"batch_size": 64, "throughput_runs": 2},
}
GEN_STAGES = ["gen_prepare", "gen_teacher", "gen_generate", "gen_label", "gen_distill@answers", "gen_eval@answers",
              "gen_report"]
IMG_STAGES = ["img_prepare", "img_teacher", "img_label", "img_distill@views", "img_eval@views", "img_report"]
MLM_STAGES = ["mlm_teacher", "mlm_label", "mlm_distill@distil", "mlm_eval@distil", "mlm_report"]
TEXT_STAGES = ["text_prepare", "text_teacher", "text_label", "text_distill@gpt_tiny", "text_eval@gpt_tiny",
               "text_report"]

METRIC_KEYS = {"accuracy", "baseline_accuracy", "teacher_accuracy", "accuracy_retained", "agreement",
               "kl_to_teacher", "ece", "params", "teacher_params", "size_bytes", "latency_ms", "throughput",
               "speedup_vs_teacher", "pseudo_label_accuracy"}


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def stale_stages(project: Path) -> set[str]:
    """The stages `dvc status` reports as changed."""
    return set(json.loads(run(["dvc", "status", "--json"], project) or "{}"))


def check_code_edits_make_the_stages_that_run_them_stale(project: Path, stages: list[str]) -> None:
    """An edit to any module of the package makes every stage stale (each depends on the whole
    package); Python's byte-code caches, none."""
    (project / "kd" / "__pycache__").mkdir(exist_ok=True)
    (project / "kd" / "__pycache__" / "augment.cpython-311.pyc").write_bytes(b"compiled")
    assert stale_stages(project) == set()
    for edited, expected in (("kd/augment.py", set(stages)), ("kd/cli/eval.py", set(stages))):
        path = project / edited
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        assert stale_stages(project) == expected, edited
        path.write_text(original)
    assert stale_stages(project) == set()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = copy_pipelines(tmp_path_factory.mktemp("e2e"))  # its tiny params files replace the copies
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    (repo / "params_text.yaml").write_text(yaml.safe_dump(TINY_TEXT, sort_keys=False))
    (repo / "params_mlm.yaml").write_text(yaml.safe_dump(TINY_MLM, sort_keys=False))
    (repo / "params_images.yaml").write_text(yaml.safe_dump(TINY_IMAGES, sort_keys=False))
    (repo / "params_gen.yaml").write_text(yaml.safe_dump(TINY_GEN, sort_keys=False))
    return dvc_repo(repo)


def test_dvc_repro_runs_every_stage_then_nothing_then_only_a_new_student(project):
    first = ran_stages(run(["dvc", "repro"], project))
    images = [s for s in first if not s.startswith(("text_", "mlm_", "img_", "gen_"))]
    assert images[:4] == ["prepare", "teacher", "label", "assistants"]
    assert set(images[4:]) == {"distill@mlp", "distill@pseudo", "eval@mlp", "eval@pseudo", "report"}
    assert [s for s in first if s.startswith("text_")] == TEXT_STAGES
    assert [s for s in first if s.startswith("mlm_")] == MLM_STAGES
    assert [s for s in first if s.startswith("img_")] == IMG_STAGES
    assert [s for s in first if s.startswith("gen_")] == GEN_STAGES
    generated = json.loads((project / "data/gen/generated/generation.json").read_text())
    assert generated["complete"] and generated["responses"]["prompts"] == 150
    gen_metrics = json.loads((project / "data/gen/students/answers/metrics.json").read_text())
    assert 0 <= gen_metrics["exact_match"] <= 1
    assert gen_metrics["teacher_exact_match"] == generated["teacher_exact_match"]
    assert "test exact match" in (project / "data/gen/report/report.md").read_text()
    img_cache = json.loads((project / "data/images/teacher_outputs/manifest.json").read_text())
    assert img_cache["views"]["recipe"]["name"] == "crop_flip" and img_cache["views"]["count"] == 2
    mlm_metrics = json.loads((project / "data/mlm/students/distil/metrics.json").read_text())
    assert 0 <= mlm_metrics["masked_accuracy"] <= 1 and mlm_metrics["params"] < mlm_metrics["teacher_params"]
    assert "masked-token accuracy" in (project / "data/mlm/report/report.md").read_text()
    text_cache = json.loads((project / "data/text/teacher_outputs/manifest.json").read_text())
    assert text_cache["complete"] and text_cache["text"]["positions"] == 31 and text_cache["top_k"] == 8
    text_metrics = json.loads((project / "data/text/students/gpt_tiny/metrics.json").read_text())
    assert text_metrics["perplexity"] > 1 and text_metrics["params"] < text_metrics["teacher_params"]
    assert "perplexity" in (project / "data/text/report/report.md").read_text()

    for name in ("mlp", "pseudo"):
        metrics = json.loads((project / f"data/students/{name}/metrics.json").read_text())
        assert METRIC_KEYS <= set(metrics), METRIC_KEYS - set(metrics)
        assert 0 <= metrics["accuracy"] <= 1 and metrics["params"] < metrics["teacher_params"]
    report = (project / "data/report/report.md").read_text()
    assert "of the teacher's parameters" in report and "of the teacher's accuracy" in report
    assert (project / "data/report/leaderboard.csv").is_file()
    assert "mlp" in run(["dvc", "metrics", "show"], project)

    assert ran_stages(run(["dvc", "repro"], project)) == []
    check_code_edits_make_the_stages_that_run_them_stale(project, first)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["students"]["added"] = {**TINY["students"]["mlp"], "seed": 1}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run(["dvc", "repro"], project)) == ["distill@added", "eval@added", "report"]

    text_params = yaml.safe_load((project / "params_text.yaml").read_text())
    text_params["text_students"]["gpt_added"] = {**TINY_TEXT["text_students"]["gpt_tiny"], "seed": 1}
    (project / "params_text.yaml").write_text(yaml.safe_dump(text_params, sort_keys=False))
    assert ran_stages(run(["dvc", "repro"], project)) == ["text_distill@gpt_added", "text_eval@gpt_added",
                                                         "text_report"]

    gen_params = yaml.safe_load((project / "params_gen.yaml").read_text())
    gen_params["gen_students"]["added"] = {**TINY_GEN["gen_students"]["answers"], "transfer": ["labeled"]}
    (project / "params_gen.yaml").write_text(yaml.safe_dump(gen_params, sort_keys=False))
    assert ran_stages(run(["dvc", "repro"], project)) == ["gen_distill@added", "gen_eval@added", "gen_report"]
    assert "gpt_added" in (project / "data/text/report/leaderboard.csv").read_text()


@pytest.mark.slow
def test_the_default_generative_pipeline_beats_the_labeled_pairs_alone(tmp_path):
    """`dvc repro gen_report` with the repository's own params_gen.yaml (about 25 minutes on 2 busy
    cores): the students on the teacher's answers beat the one on the labeled pairs alone, over
    3 seeds, and the report ranks them by exact match."""
    project = dvc_repo(copy_pipelines(tmp_path))
    (project / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))  # dvc.yaml reads its students
    out = run(["dvc", "repro", "gen_report"], project)
    assert ran_stages(out)[:4] == GEN_STAGES[:4]
    scores = {name: json.loads((project / f"data/gen/students/{name}/metrics.json").read_text())
              for name in ("labeled_only", "teacher_answers", "teacher_answers_soft")}
    assert all(m["seeds"] == 3 for m in scores.values())
    for name in ("teacher_answers", "teacher_answers_soft"):
        assert scores[name]["exact_match_mean"] > scores["labeled_only"]["exact_match_mean"], name
    assert scores["labeled_only"]["teacher_exact_match"] > scores["teacher_answers"]["exact_match_mean"]
    assert (project / "data/gen/report/leaderboard.csv").read_text().startswith("student,params,size_bytes,")
