"""The capacity-gap experiment (examples/capacity/): its report section and plot, computed from
loaded students alone, and its DVC pipeline, run for real on tiny data: it reuses the mnist
example's cache, and adding a student size runs only that size's stages (and the report)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from kd import metrics, report
from kd.report import SCORES
from kd.report.markdown import capacity_markdown
from kd.report.plots import DRAW
from kd.report.results import Report
from tests.helpers import copy_pipelines, dvc_repo
from tests.helpers import run_in as run

ROOT = Path(__file__).parents[1]
EXPERIMENT = ROOT / "examples" / "capacity"
TARGET = "examples/capacity/dvc.yaml"  # DVC names its stages TARGET:NAME
IMAGE = SCORES["image"]
SOFT = {"soft": {"weight": 0.9, "temperature": 4}, "hard": {"weight": 0.1, "labels": True}}


def result(name: str, hidden: int, accuracies: dict[str, float], baselines: dict[str, float],
           assistant: str | None = None) -> report.StudentResult:
    """A StudentResult as `results.load_student` builds it, from per-seed accuracies of it and its twins."""
    seeds = {s: {"accuracy": a, "baseline_accuracy": baselines[s]} for s, a in accuracies.items()}
    m = metrics.seed_summary([{"seed": s, **v} for s, v in seeds.items()])
    m.update(params=10 * hidden, teacher_params=1000, teacher_accuracy=0.95)
    spec = {"name": name, "arch": "mlp", "arch_kwargs": {"hidden": [hidden]}, "epochs": 2, "batch_size": 16,
            "lr": 0.01, "seed": 0, "repeats": len(seeds), "assistant": assistant, "loss": SOFT}
    return report.StudentResult(name, Path(name), m, {"student": spec}, {}, [], seeds)


@pytest.mark.unit
def test_progressive_rows_carry_the_size_ratio_and_both_gains_over_the_twins(tmp_path):
    twins = {"0": 0.5, "1": 0.6, "2": 0.7}
    results = [result("s4", 4, {"0": 0.6, "1": 0.7, "2": 0.7}, twins),
               result("s4_via", 4, {"0": 0.62, "1": 0.71, "2": 0.74}, twins, assistant="ta"),
               result("s20", 20, {"0": 0.8, "1": 0.8, "2": 0.9}, twins),
               result("s20_via", 20, {"0": 0.8, "1": 0.79, "2": 0.88}, twins, assistant="ta"),
               result("lone_via", 50, {"0": 0.9}, {"0": 0.8}, assistant="ta")]  # no direct counterpart
    rows = {row["student"]: row for row in report.progressive_table(results, {"ta": {"params": 300, "accuracy": 0.9}},
                                                                     IMAGE)}
    small = rows["s4_via"]
    assert small["size_ratio"] == pytest.approx(1000 / 40) and rows["s20_via"]["size_ratio"] == pytest.approx(5.0)
    # gains over the twins: the students' own seed summaries (kd eval's paired gain_points)
    assert (small["direct_gain_mean"], small["direct_gain_std"]) == pytest.approx(
        metrics.mean_std([10.0, 10.0, 0.0]))
    assert (small["via_gain_mean"], small["via_gain_std"]) == pytest.approx(metrics.mean_std([12.0, 11.0, 4.0]))
    # via minus direct, paired by seed: the gains' difference, seed by seed
    assert (small["difference_mean"], small["difference_std"]) == pytest.approx(metrics.mean_std([2.0, 1.0, 4.0]))
    assert small["verdict"] == "helps" and rows["s20_via"]["verdict"] == "no measurable gain"
    lone = rows["lone_via"]
    assert lone["direct"] is None and lone["direct_gain_mean"] is None and lone["via_gain_mean"] == pytest.approx(10)
    assert set(small) == set(report.PROGRESSIVE)

    progressive = list(rows.values())
    lines = capacity_markdown(progressive)
    assert "### The capacity gap" in lines and "| student (params) | teacher / student |" in lines[-4]
    assert lines[-2:] == [  # by size ratio, the smallest gap first; the student without a direct twin left out
        "| s20 (200) | 5.0 | ta (300) | +23.33 ± 5.77 | +22.33 ± 6.66 | -1.00 ± 1.00 | no measurable gain |",
        "| s4 (40) | 25.0 | ta (300) | +6.67 ± 5.77 | +9.00 ± 4.36 | +2.33 ± 1.53 | helps |"]
    assert capacity_markdown([lone]) == []
    figure = DRAW["capacity_gap.png"](Report(IMAGE, [], results, progressive=progressive))
    axis = figure.axes[0]
    assert axis.get_xscale() == "log" and [t.get_text() for t in axis.get_legend().get_texts()] == [
        "directly from the teacher", "through an assistant"]
    figure.savefig(tmp_path / "capacity_gap.png")
    empty = DRAW["capacity_gap.png"](Report(IMAGE, [], results))
    assert "no student learns through an assistant" in empty.axes[0].texts[0].get_text()


@pytest.mark.unit
@pytest.mark.parametrize("experiment, sizes", [("capacity", 5), ("capacity_large", 1)])
def test_every_via_student_of_the_experiment_has_its_direct_twin_and_a_larger_assistant(experiment, sizes):
    params = yaml.safe_load((ROOT / "examples" / experiment / "params.yaml").read_text())
    students, assistants = params["students"], params["assistants"]
    assert len([n for n in students if not students[n].get("assistant")]) >= sizes
    for name, spec in students.items():
        if spec.get("assistant"):
            direct = name.split("_via_")[0]
            assert direct != name and {**spec, "assistant": None} == {**students[direct], "assistant": None}
            assert spec["assistant"] in assistants


def ran(output: str) -> set[str]:
    """The stages `dvc repro` ran, from its output."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the repository's examples with the mnist example shrunk to a tiny teacher on
    tiny data, and the experiment shrunk to its smallest size (1 epoch, 1 seed, its assistant)."""
    copy_pipelines(tmp_path)
    defaults = {"prepare": {"dataset": "mnist5k", "labeled": 48, "unlabeled": 32, "test": 32},
                "teacher": {"arch": "cnn", "arch_kwargs": {"widths": [4, 8], "convs_per_stage": 1, "hidden": 16},
                            "epochs": 1, "batch_size": 16, "shift": 0},
                "label": {"top_k": 5, "temperatures": [1, 4], "features": {}}, "students": {}}
    (tmp_path / "examples" / "mnist" / "params.yaml").write_text(yaml.safe_dump(defaults, sort_keys=False))
    params = yaml.safe_load((EXPERIMENT / "params.yaml").read_text())
    for entry in [*params["students"].values(), *params["assistants"].values()]:
        entry.update(epochs=1, batch_size=16)
        if "repeats" in entry:
            entry["repeats"] = 1
    params["eval"].update(latency_runs=2, throughput_batch=8, throughput_runs=2)
    (tmp_path / "sweep.json").write_text(json.dumps(params))  # every size, for the test to add one
    dvc_repo(tmp_path)
    # DVC reads the experiment's own params.yaml (its `<<: *size` merge keys included): a stage per entry
    stages = set(json.loads(run(["dvc", "status", "--json", TARGET], tmp_path)))
    expected = {f"{stage}@{name}" for name in params["students"] for stage in ("distill", "eval")}
    assert {f"{TARGET}:{name}" for name in expected | {"assistants", "report"}} <= stages, stages
    params["students"] = {n: s for n, s in params["students"].items() if n in ("cnn_3k", "cnn_3k_via_ta")}
    params["assistants"] = {"ta_103k": params["assistants"]["ta_103k"]}
    write_experiment(tmp_path, params)
    return tmp_path


def write_experiment(project: Path, params: dict) -> None:
    (project / "examples" / "capacity" / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.e2e
def test_the_experiment_reuses_the_default_cache_and_adding_a_size_runs_only_that_size(project):
    def ours(*names: str) -> set[str]:
        return {f"{TARGET}:{name}" for name in names}

    out = run(["dvc", "repro", TARGET], project)
    # the mnist example's data, teacher and cache first (nothing else of it), then the experiment
    mnist = {f"examples/mnist/dvc.yaml:{name}" for name in ("prepare", "teacher", "label")}
    assert ran(out) == mnist | ours(
        "assistants", "distill@cnn_3k", "distill@cnn_3k_via_ta", "eval@cnn_3k", "eval@cnn_3k_via_ta", "report"), out
    capacity = project / "examples" / "capacity" / "data"
    (row,) = _csv(capacity / "report" / "progressive.csv")
    assert (row["student"], row["direct"], row["assistant"]) == ("cnn_3k_via_ta", "cnn_3k", "ta_103k")
    teacher = json.loads((project / "examples" / "mnist" / "data" / "teacher" / "config.json").read_text())
    assert float(row["size_ratio"]) == pytest.approx(teacher["params"] / 3424)
    assert (capacity / "report" / "capacity_gap.png").is_file()
    assert "### The capacity gap" in (capacity / "report" / "report.md").read_text()
    assert json.loads(run(["dvc", "status", "--json", TARGET], project)) == {}

    sweep = json.loads((project / "sweep.json").read_text())
    params = yaml.safe_load((project / "examples" / "capacity" / "params.yaml").read_text())
    params["students"] |= {n: s for n, s in sweep["students"].items() if n.startswith("cnn_13k")}
    write_experiment(project, params)
    new = ours("distill@cnn_13k", "distill@cnn_13k_via_ta", "eval@cnn_13k", "eval@cnn_13k_via_ta")
    assert set(json.loads(run(["dvc", "status", "--json", TARGET], project))) == new
    assert ran(run(["dvc", "repro", TARGET], project)) == new | ours("report")
    assert len(_csv(capacity / "report" / "progressive.csv")) == 2


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
