"""`kd init DIR --template T`: a ready DVC project of that template's stages only.

Through CliRunner: each template's files, params.yaml holding every key kd reads (and parsing
into the configs), the refusals, the options landing in params.yaml and dvc.yaml. With DVC
(`e2e`): the image template's `dvc repro`, then one experiment that changes one student, which
runs only that student and the report and is compared by `dvc exp show`; the text template's
`dvc repro` end to end.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from kd import config, methods, project
from kd.cli import init, version
from tests.helpers import assert_clean_error, invoke, ok
from tests.helpers import run_in as run

STAGES = {  # template -> its stages (a foreach stage once)
    "image": ["kd_version", "prepare", "teacher", "label", "distill", "eval", "report"],
    "text": ["kd_version", "prepare", "teacher", "label", "distill", "eval", "report"],
    "instruction": ["kd_version", "prepare", "teacher", "label", "distill", "eval", "report"],
    "masked": ["kd_version", "prepare", "teacher", "label", "distill", "eval", "report"],
    "generate": ["kd_version", "prepare", "teacher", "generate", "label", "distill", "eval", "report"],
}
SECTION_CLASSES = {"paths": config.PathsConfig, "prepare": config.PrepareConfig, "teacher": config.TeacherConfig,
                   "generate": config.GenerateConfig, "label": config.LabelConfig, "eval": config.EvalConfig}
STUDENT_KEYS = {f.name for f in dataclasses.fields(config.StudentConfig)} - {"name", "section"}
FILES = ("dvc.yaml", "params.yaml", "datasets/README.md", "models/README.md", ".gitignore", ".dvcignore")


def deps_of(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("do", stage).get("deps", [])]


@pytest.mark.integration
@pytest.mark.parametrize("template", project.TEMPLATES)
def test_init_writes_the_template(tmp_path, template):
    result = ok(invoke(init.main, tmp_path / "proj", "--template", template, "--no-git"))
    proj = tmp_path / "proj"
    assert f"{template} project in {proj}" in result.stdout
    for name in FILES:
        assert (proj / name).is_file(), name
    stages = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES[template]
    assert stages["kd_version"]["always_changed"] is True
    for name, stage in stages.items():
        body = stage.get("do", stage)
        assert body["cmd"].split()[0] == "kd", name
        if name != "kd_version":  # every stage reruns when the installed kd changes, and never for a repo path
            assert "data/kd_version.txt" in deps_of(stage) and "kd" not in deps_of(stage), name
    params = yaml.safe_load((proj / "params.yaml").read_text())
    project.check_params(params)  # every section builds into its config
    for section, cls in SECTION_CLASSES.items():
        if section in params:
            assert {f.name for f in dataclasses.fields(cls)} <= set(params[section]), section
    assert set(params) == {"paths", "prepare", "teacher", "label", "students", "eval"} | (
        {"generate"} if template == "generate" else set())
    needed: set[str] = set()
    for name, entry in params["students"].items():
        assert STUDENT_KEYS <= set(entry), name
        student = config.from_mapping(config.StudentConfig, {**entry, "name": name}, name)
        for term_name, term in methods.chosen(student.loss).items():
            assert {f.name for f in dataclasses.fields(term)} <= set(entry["loss"][term_name]), (name, term_name)
        needed |= set(student.loss.teacher_layers(name))
    assert set(params["label"]["features"]) == needed  # the cache holds what the students need, no more
    gitignore = (proj / ".gitignore").read_text().splitlines()
    assert "/data/baselines/" in gitignore and not any(line.strip("/") == "data" for line in gitignore)


@pytest.mark.integration
def test_init_makes_a_git_and_dvc_repository(tmp_path):
    ok(invoke(init.main, tmp_path / "proj"))
    proj = tmp_path / "proj"
    assert (proj / ".git").is_dir() and (proj / ".dvc").is_dir()
    assert "analytics = false" in (proj / ".dvc" / "config").read_text()
    # a second project inside that repository: no second git or DVC repository
    result = ok(invoke(init.main, proj / "sub", "--template", "text"))
    assert "no git init, no dvc init" in result.stdout
    assert not (proj / "sub" / ".git").exists() and not (proj / "sub" / ".dvc").exists()


@pytest.mark.integration
def test_init_refuses_a_directory_with_a_dvc_yaml(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    result = invoke(init.main, tmp_path, "--no-git")
    assert_clean_error(result, str(tmp_path / "dvc.yaml"), "already there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.yaml"]


@pytest.mark.integration
@pytest.mark.parametrize("args, needles", [
    (["--template", "vision"], ["--template", "'vision'", "image"]),
    (["--dataset", "nowhere"], ["--dataset", "nowhere", "mnist5k"]),
    (["--teacher", "nowhere"], ["--teacher", "config.json"]),
    (["--set", "teacher.epoch=3"], ["teacher.epoch", "no such key"]),
    (["--set", "teacher.epochs=0"], ["teacher.epochs", "must be >= 1"]),
    (["--set", "epochs"], ["--set", "KEY=VALUE"]),
    (["--template", "text", "--student-arch", "cnn"], ["--student-arch", "image template"]),
])
def test_init_refuses_bad_options_in_one_line(tmp_path, args, needles):
    result = invoke(init.main, tmp_path / "proj", "--no-git", *args)
    assert_clean_error(result, *needles)
    assert not (tmp_path / "proj").exists()


@pytest.mark.integration
def test_options_land_in_params_yaml(tmp_path):
    proj = tmp_path / "proj"
    (proj / "datasets" / "flowers" / "a").mkdir(parents=True)
    teacher = tmp_path / "my_teacher"  # outside the project: absolute, and a dependency of its stage
    teacher.mkdir()
    (teacher / "config.json").write_text('{"arch": "cnn"}')
    ok(invoke(init.main, proj, "--no-git", "--dataset", proj / "datasets" / "flowers", "--teacher", teacher,
              "--student-arch", "models.net:small", "--set", "teacher.epochs=3", "--set", "students.*.repeats=2",
              "--set", "students.mlp_soft.loss.soft.temperature=2", "--set", "label.features={}"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    assert params["prepare"]["dataset"] == "datasets/flowers"  # inside the project: relative to it
    assert params["paths"]["teacher"] == str(teacher.resolve())
    assert params["teacher"]["epochs"] == 3
    for student in params["students"].values():
        assert student["arch"] == "models.net:small" and student["arch_kwargs"] == {} and student["repeats"] == 2
    assert params["students"]["mlp_soft"]["loss"]["soft"] == {"weight": 0.9, "temperature": 2, "tail": "bucket",
                                                              "targets": "topk", "divergence": "forward_kl",
                                                              "beta": None, "alpha": None}
    text = (proj / "params.yaml").read_text()
    assert re.search(r"^  epochs: 3 +# ", text, re.M) is None  # teacher.epochs had no comment: none added
    assert re.search(r"^  dataset: datasets/flowers +# mnist5k \| digits", text, re.M)  # the comment kept
    stages = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    assert "teacher" not in stages  # label runs the given teacher
    assert stages["label"]["cmd"].endswith("--teacher ${paths.teacher}")
    assert "${paths.teacher}" in deps_of(stages["label"])
    assert deps_of(stages["prepare"]) == ["data/kd_version.txt", "datasets"]  # the dataset is under datasets/


@pytest.mark.integration
def test_a_language_teacher_brings_its_tokenizer(tmp_path):
    """--teacher of a language template: the data is cut with its tokenizer (prepare.tokenizer),
    and the model directories kd writes list its tokenizer files as outputs."""
    teacher = tmp_path / "llama"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"model_type": "llama"}')
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (teacher / name).write_text("{}")
    ok(invoke(init.main, tmp_path / "proj", "--no-git", "--template", "instruction", "--teacher", teacher,
              "--dataset", teacher / "tokenizer.json", "--student-init", teacher))
    params = yaml.safe_load((tmp_path / "proj" / "params.yaml").read_text())
    assert params["prepare"]["tokenizer"] == params["paths"]["teacher"] == str(teacher.resolve())
    assert params["prepare"]["prompt_column"] == "prompt" and params["prepare"]["block_size"] == 256
    assert all(s["init"] == str(teacher.resolve()) and s["arch"] == "llama" for s in params["students"].values())
    stages = yaml.safe_load((tmp_path / "proj" / "dvc.yaml").read_text())["stages"]
    outs = stages["distill"]["do"]["outs"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert f"data/students/${{key}}/{name}" in outs
    assert str(teacher.resolve() / "tokenizer.json") in deps_of(stages["prepare"])
    assert str(teacher.resolve()) in deps_of(stages["distill"])


@pytest.mark.unit
def test_set_value_keeps_comments_and_reaches_into_flow_mappings():
    text = "a:\n  b: 1        # one\n  c: {d: 2, e: [1, 2]}\nf: x\n"
    assert project.set_value(text, "a.b", 10) == "a:\n  b: 10       # one\n  c: {d: 2, e: [1, 2]}\nf: x\n"
    assert project.set_value(text, "a.c.d", "some # thing") == (
        "a:\n  b: 1        # one\n  c: {d: 'some # thing', e: [1, 2]}\nf: x\n")
    assert yaml.safe_load(project.set_value(text, "f", None)) == {"a": {"b": 1, "c": {"d": 2, "e": [1, 2]}}, "f": None}
    with pytest.raises(config.ConfigError, match="a.z: no such key"):
        project.set_value(text, "a.z", 1)


@pytest.mark.integration
def test_version_writes_the_file_only_when_it_changes(tmp_path):
    out = tmp_path / "data" / "kd_version.txt"
    ok(invoke(version.main, "--out", out))
    assert re.fullmatch(r"kd \S+\n", out.read_text())
    out.touch()
    stamp = out.stat().st_mtime_ns
    ok(invoke(version.main, "--out", out))
    assert out.stat().st_mtime_ns == stamp


# --- with DVC ------------------------------------------------------------------------------------

GIT = ["git", "-c", "user.name=kd", "-c", "user.email=kd@example.com"]
TINY_IMAGE = ["prepare.dataset=digits", "prepare.labeled=200", "prepare.unlabeled=300", "prepare.test=200",
              "teacher.epochs=3", "students.*.epochs=2", "eval.latency_runs=3", "eval.throughput_runs=2"]


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def assert_quiet(output: str) -> None:
    """No warning or error from DVC (an empty output, a missing one) in a run's output."""
    noisy = [line for line in output.splitlines() if re.search(r"WARNING|ERROR|is empty", line)]
    assert not noisy, noisy


def kd_init(tmp_path: Path, *args: str) -> Path:
    if shutil.which("dvc") is None or shutil.which("kd") is None:
        pytest.fail("dvc and kd must be on PATH (pip install -e .)")
    run(["kd", "init", "proj", *args], tmp_path)
    return tmp_path / "proj"


@pytest.mark.e2e
def test_image_project_repro_then_an_experiment_on_one_student(tmp_path):
    proj = kd_init(tmp_path, "--template", "image", *[a for s in TINY_IMAGE for a in ("--set", s)])
    first = run(["dvc", "repro"], proj)
    assert_quiet(first)
    students = ["mlp_soft", "mlp_pseudo", "cnn_soft"]
    assert ran_stages(first) == ["kd_version", "prepare", "teacher", "label", *[f"distill@{s}" for s in students],
                                 *[f"eval@{s}" for s in students], "report"]
    # metrics and plot data are committed; models, caches and kd's own stores are not
    run(["git", "add", "-A"], proj)
    run([*GIT, "commit", "-qm", "first run"], proj)
    tracked = set(run(["git", "ls-files"], proj).split())
    for name in ("data/kd_version.txt", "data/teacher/metrics.json", "data/students/mlp_soft/metrics.json",
                 "data/students/mlp_soft/train_log.csv", "data/students/mlp_soft/plots/per_class.csv",
                 "data/report/report.md", "dvc.lock"):
        assert name in tracked, name
    data = [p for p in tracked if p.startswith("data/")]
    assert all(p.endswith((".json", ".csv", ".md", ".png", ".txt", ".gitignore")) for p in data), data
    assert not any(p.startswith(("data/baselines", "data/prepared/", "data/teacher_outputs/")) for p in data), data

    exp = run(["dvc", "exp", "run", "-S", "students.mlp_soft.epochs=1"], proj)
    assert_quiet(exp)
    assert ran_stages(exp) == ["kd_version", "distill@mlp_soft", "eval@mlp_soft", "report"]
    table = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], proj))))
    accuracy = next(k for k in table[0] if k.endswith("mlp_soft/metrics.json:accuracy"))
    rows = {row["typ"]: row for row in table if row["rev"] != "workspace"}
    assert set(rows) == {"baseline", "branch_base"}, table
    assert all(0 < float(row[accuracy]) <= 1 for row in rows.values())
    epochs = "students.mlp_soft.epochs"
    assert rows["baseline"][epochs] == "2" and rows["branch_base"][epochs] == "1"
    assert not [k for k in table[0] if k.startswith(("text_students", "img_students", "params_"))]


@pytest.mark.e2e
def test_text_project_repro(tmp_path):
    proj = kd_init(tmp_path, "--template", "text", "--set", "prepare.vocab_size=300", "--set", "prepare.block_size=32",
                   "--set", "prepare.labeled=60", "--set", "prepare.unlabeled=30", "--set", "prepare.test=10",
                   "--set", "teacher.epochs=1", "--set", "students.*.epochs=1", "--set", "eval.throughput_runs=1")
    out = run(["dvc", "repro"], proj)
    assert_quiet(out)
    assert ran_stages(out)[-1] == "report"
    metrics = json.loads((proj / "data" / "students" / "gpt_soft" / "metrics.json").read_text())
    assert metrics["perplexity"] > 1
    status = run(["git", "status", "--porcelain"], proj)
    assert "safetensors" not in status  # every model file is a DVC output (git-ignored)


@pytest.mark.e2e
def test_text_project_with_your_own_teacher(tmp_path):
    """`--teacher models/llama` (a Hugging Face directory with its tokenizer): no teacher stage,
    the text cut with its tokenizer, and every file kd writes for a student is a DVC output or a
    small tracked file (nothing left untracked)."""
    from tests.helpers import hf_tokenizer, save_hf_model

    save_hf_model(tmp_path / "proj" / "models" / "llama", "llama", hf_tokenizer())
    proj = kd_init(tmp_path, "--template", "text", "--teacher", "proj/models/llama",
                   "--set", "prepare.block_size=32", "--set", "prepare.labeled=40", "--set", "prepare.unlabeled=20",
                   "--set", "prepare.test=8", "--set", "students.*.epochs=1", "--set", "eval.throughput_runs=1")
    out = run(["dvc", "repro"], proj)
    assert_quiet(out)
    assert "teacher" not in ran_stages(out) and ran_stages(out)[-1] == "report"
    untracked = run(["git", "status", "--porcelain", "--untracked-files=all"], proj).split("\n")
    students = [line[3:] for line in untracked if line.startswith("?? data/students/")]
    assert students and all(p.endswith((".gitignore", "metrics.json", ".csv")) for p in students), students
