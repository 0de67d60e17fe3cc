"""The repository's examples through DVC on a tiny configuration.

Copies examples/{mnist,text,masked,images,generate} (their dvc.yaml) with the package into a
fresh git + DVC repository, writes a tiny params.yaml into each (the 8x8 digits, small models,
one or two epochs; pydoc in 32-token blocks, one-layer GPT-2 and BERT teachers; crop-and-flip
views; 300 sums and a teacher's answers to 150 of them) and runs `dvc repro` of the five:
every stage, then nothing, then only a newly added student of the image, text and generative
examples.
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
    "students": {
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
    "students": {
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
    "students": {
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
    "students": {
        "answers": {"arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16}, "epochs": 1,
                    "batch_size": 32, "lr": 0.003, "transfer": ["labeled", "unlabeled"],
                    "loss": {"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5, "labels": True}}},
    },
    "eval": {"batch_size": 64, "throughput_runs": 2},
}
EXAMPLES = {"mnist": TINY, "text": TINY_TEXT, "masked": {"prepare": TINY_TEXT["prepare"], **TINY_MLM},
            "images": TINY_IMAGES, "generate": TINY_GEN}
STAGES = {  # the stages each example runs first, in order (`foreach` ones: NAME@KEY)
    "generate": ["prepare", "teacher", "generate", "label", "distill@answers", "eval@answers", "report"],
    "images": ["prepare", "teacher", "label", "distill@views", "eval@views", "report"],
    "masked": ["prepare", "teacher", "label", "distill@distil", "eval@distil", "report"],
    "text": ["prepare", "teacher", "label", "distill@gpt_tiny", "eval@gpt_tiny", "report"],
}

METRIC_KEYS = {"accuracy", "baseline_accuracy", "teacher_accuracy", "accuracy_retained", "agreement",
               "kl_to_teacher", "ece", "params", "teacher_params", "size_bytes", "latency_ms", "throughput",
               "speedup_vs_teacher", "pseudo_label_accuracy"}


def ran_stages(output: str) -> list[str]:
    """The stages `dvc repro` ran or restored from DVC's run cache (the masked example's prepare is
    the text example's, to the byte), as EXAMPLE:STAGE (DVC names them examples/EXAMPLE/dvc.yaml:STAGE)."""
    found = re.findall(r"Running stage '([^']+)'|Stage '([^']+)' is cached - skipping run", output)
    return [re.sub(r"^examples/(\w+)/dvc\.yaml:", r"\1:", ran or cached) for ran, cached in found]


def of(example: str, stages: list[str]) -> list[str]:
    return [s.split(":", 1)[1] for s in stages if s.startswith(f"{example}:")]


def stale_stages(project: Path) -> set[str]:
    """The stages `dvc status` reports as changed, as EXAMPLE:STAGE."""
    found = json.loads(run(["dvc", "status", "--json", *(f"examples/{e}/dvc.yaml" for e in EXAMPLES)], project) or "{}")
    return {re.sub(r"^examples/(\w+)/dvc\.yaml:", r"\1:", s) for s in found}


def check_code_edits_make_the_stages_that_run_them_stale(project: Path, stages: list[str]) -> None:
    """An edit to any module of the package makes every stage stale (each depends on the whole
    package); Python's byte-code caches, none."""
    (project / "kd" / "__pycache__").mkdir(exist_ok=True)
    (project / "kd" / "__pycache__" / "augment.cpython-311.pyc").write_bytes(b"compiled")
    assert stale_stages(project) == set()
    for edited in ("kd/augment.py", "kd/cli/eval.py"):
        path = project / edited
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        assert stale_stages(project) == set(stages), edited
        path.write_text(original)
    assert stale_stages(project) == set()


def repro(project: Path) -> list[str]:
    return ran_stages(run(["dvc", "repro", *(f"examples/{e}/dvc.yaml" for e in EXAMPLES)], project))


def add_student(project: Path, example: str, name: str, spec: dict) -> None:
    path = project / "examples" / example / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["students"][name] = spec
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = copy_pipelines(tmp_path_factory.mktemp("e2e"))  # its tiny params files replace the copies
    for example, params in EXAMPLES.items():
        (repo / "examples" / example / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dvc_repo(repo)


def test_dvc_repro_runs_every_stage_then_nothing_then_only_a_new_student(project):
    first = repro(project)
    assert of("mnist", first)[:4] == ["prepare", "teacher", "label", "assistants"]
    assert set(of("mnist", first)[4:]) == {"distill@mlp", "distill@pseudo", "eval@mlp", "eval@pseudo", "report"}
    for example, stages in STAGES.items():
        assert of(example, first) == stages, example
    data = {example: project / "examples" / example / "data" for example in EXAMPLES}
    generated = json.loads((data["generate"] / "generated/generation.json").read_text())
    assert generated["complete"] and generated["responses"]["prompts"] == 150
    gen_metrics = json.loads((data["generate"] / "students/answers/metrics.json").read_text())
    assert 0 <= gen_metrics["exact_match"] <= 1
    assert gen_metrics["teacher_exact_match"] is not None
    assert "test exact match" in (data["generate"] / "report/report.md").read_text()
    img_cache = json.loads((data["images"] / "teacher_outputs/manifest.json").read_text())
    assert img_cache["views"]["recipe"]["name"] == "crop_flip" and img_cache["views"]["count"] == 2
    mlm_metrics = json.loads((data["masked"] / "students/distil/metrics.json").read_text())
    assert 0 <= mlm_metrics["masked_accuracy"] <= 1 and mlm_metrics["params"] < mlm_metrics["teacher_params"]
    assert "masked-token accuracy" in (data["masked"] / "report/report.md").read_text()
    text_cache = json.loads((data["text"] / "teacher_outputs/manifest.json").read_text())
    assert text_cache["complete"] and text_cache["text"]["positions"] == 31 and text_cache["top_k"] == 8
    text_metrics = json.loads((data["text"] / "students/gpt_tiny/metrics.json").read_text())
    assert text_metrics["perplexity"] > 1 and text_metrics["params"] < text_metrics["teacher_params"]
    assert "perplexity" in (data["text"] / "report/report.md").read_text()

    for name in ("mlp", "pseudo"):
        metrics = json.loads((data["mnist"] / f"students/{name}/metrics.json").read_text())
        assert METRIC_KEYS <= set(metrics), METRIC_KEYS - set(metrics)
        assert 0 <= metrics["accuracy"] <= 1 and metrics["params"] < metrics["teacher_params"]
    report = (data["mnist"] / "report/report.md").read_text()
    assert "of the teacher's parameters" in report and "of the teacher's accuracy" in report
    assert (data["mnist"] / "report/leaderboard.csv").is_file()
    assert "examples/mnist/data/students/mlp/metrics.json" in run(["dvc", "metrics", "show"], project)

    assert repro(project) == []
    check_code_edits_make_the_stages_that_run_them_stale(project, first)

    add_student(project, "mnist", "added", {**TINY["students"]["mlp"], "seed": 1})
    assert repro(project) == ["mnist:distill@added", "mnist:eval@added", "mnist:report"]
    add_student(project, "text", "gpt_added", {**TINY_TEXT["students"]["gpt_tiny"], "seed": 1})
    assert repro(project) == ["text:distill@gpt_added", "text:eval@gpt_added", "text:report"]
    add_student(project, "generate", "added", {**TINY_GEN["students"]["answers"], "transfer": ["labeled"]})
    assert repro(project) == ["generate:distill@added", "generate:eval@added", "generate:report"]
    assert "gpt_added" in (data["text"] / "report/leaderboard.csv").read_text()


@pytest.mark.slow
def test_the_default_generative_pipeline_beats_the_labeled_pairs_alone(tmp_path):
    """`dvc repro examples/generate/dvc.yaml` with the example's own params.yaml (about 25 minutes
    on 2 busy cores): the students on the teacher's answers beat the one on the labeled pairs
    alone, over 3 seeds, and the report ranks them by exact match."""
    project = dvc_repo(copy_pipelines(tmp_path))
    out = run(["dvc", "repro", "examples/generate/dvc.yaml"], project)
    assert of("generate", ran_stages(out))[:4] == STAGES["generate"][:4]
    data = project / "examples/generate/data"
    scores = {name: json.loads((data / f"students/{name}/metrics.json").read_text())
              for name in ("labeled_only", "teacher_answers", "teacher_answers_soft")}
    assert all(m["seeds"] == 3 for m in scores.values())
    for name in ("teacher_answers", "teacher_answers_soft"):
        assert scores[name]["exact_match_mean"] > scores["labeled_only"]["exact_match_mean"], name
    assert scores["labeled_only"]["teacher_exact_match"] > scores["teacher_answers"]["exact_match_mean"]
    assert (data / "report/leaderboard.csv").read_text().startswith("student,params,size_bytes,")
