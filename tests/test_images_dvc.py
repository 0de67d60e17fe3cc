"""DVC tracks what the user brings: in a project made by `kd init`, `prepare` depends on
datasets/, the image stages that build models on models/, with a real `dvc` in a fresh git repo."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kd.cli import init
from tests.helpers import dvc_repo, invoke, ok
from tests.helpers import run_in as run

pytestmark = pytest.mark.e2e

NET = '''
from torch import nn


def net(num_classes, in_chans):  # timm-style
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))
'''


def stale(project: Path) -> dict[str, list]:
    """stage -> what `dvc status` says changed, for the stages this test runs."""
    found = json.loads(run(["dvc", "status", "--json"], project) or "{}")
    return {stage: found[stage] for stage in ("prepare", "teacher") if stage in found}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    ok(invoke(init.main, tmp_path, "--template", "image", "--no-git"))
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 3)):
        for c in range(2):
            (tmp_path / "datasets" / "imgs" / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 100 + 100 * c, (6, 6), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(tmp_path / "datasets" / "imgs" / split / f"c{c}" / f"{i}.png")
    (tmp_path / "models" / "tiny.py").write_text(textwrap.dedent(NET))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())  # the template's, with ours
    params |= {"prepare": {"dataset": "datasets/imgs", "labeled": 12, "unlabeled": 8, "test": None},
               "teacher": {"arch": "models.tiny:net", "epochs": 1, "batch_size": 4, "shift": 0},
               "label": {"top_k": 2, "temperatures": [1, 4]}, "students": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dvc_repo(tmp_path)


def test_a_changed_dataset_or_model_module_makes_the_stages_that_read_it_stale(project):
    run(["dvc", "repro", "teacher"], project)  # prepare, then the teacher of models/tiny.py
    config = json.loads((project / "data" / "teacher" / "config.json").read_text())
    assert config["arch"] == "models.tiny:net"
    assert stale(project) == {}

    image = project / "datasets" / "imgs" / "test" / "c0" / "0.png"
    Image.fromarray(np.zeros((6, 6), np.uint8), mode="L").save(image)  # the user edits one image
    changed = stale(project)
    assert list(changed) == ["prepare"] and "datasets" in json.dumps(changed["prepare"])
    out = run(["dvc", "repro", "teacher"], project)
    assert "Running stage 'prepare'" in out and "Running stage 'teacher'" in out  # and everything after it
    assert stale(project) == {}

    module = project / "models" / "tiny.py"
    module.write_text(module.read_text().replace("nn.Conv2d(in_chans, 4, 3)", "nn.Conv2d(in_chans, 4, 5)"))
    changed = stale(project)
    assert list(changed) == ["teacher"] and "models" in json.dumps(changed["teacher"])
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for stage in ("teacher", "label", "distill", "eval"):
        assert "models" in dvc_yaml[stage].get("do", dvc_yaml[stage])["deps"], stage


@pytest.mark.slow
def test_a_user_folder_and_factory_run_to_the_report_with_no_edit_of_dvc_yaml(project):
    """The issue's new user: preset train/test folders and a timm-style factory in models/, named
    only in params.yaml; `dvc repro report` runs every image stage, the test split is exactly the
    test folder, and the report compares size and speed with the teacher."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["label"] = {"arch": "models.tiny:net", "top_k": 2, "temperatures": [1, 4]}
    params["students"] = {"small": {"arch": "cnn", "arch_kwargs": {"widths": [2], "hidden": 4}, "epochs": 1,
                                    "batch_size": 4, "loss": {"soft": {"weight": 0.9, "temperature": 4},
                                                              "hard": {"weight": 0.1}}}}
    params["eval"] = {"latency_runs": 2, "throughput_runs": 1, "throughput_batch": 8}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "report"], project)
    for stage in ("prepare", "teacher", "label", "distill@small", "eval@small", "report"):
        assert f"Running stage '{stage}'" in out, stage

    import pyarrow.parquet as pq

    test = pq.read_table(project / "data" / "prepared" / "test.parquet", columns=["x"]).column("x").to_pylist()
    files = sorted((project / "datasets" / "imgs" / "test").rglob("*.png"))
    folder = [list(np.asarray(Image.open(p)).reshape(-1)) for p in files]
    assert sorted(map(tuple, test)) == sorted(map(tuple, folder))  # the test split is the test folder
    metrics = json.loads((project / "data" / "students" / "small" / "metrics.json").read_text())
    assert metrics["teacher_params"] == 4 * 9 + 4 + 4 * 2 + 2  # models/tiny.py's net, measured at label time
    assert metrics["speedup_vs_teacher"] is not None and metrics["teacher_throughput_source"] == "manifest"
    report = (project / "data" / "report" / "report.md").read_text()
    assert "models.tiny:net" in report and "unknown" not in report
