"""The examples' dvc.yaml cannot go stale: every `kd` stage depends on the code its command can run.

Each stage of examples/*/dvc.yaml depends on the whole kd/ package (../../kd): the library and
the command modules. The end-to-end test (test_pipeline_e2e.py) checks the effect: after an edit
to the package, every stage is stale. (Projects made by `kd init` depend on the installed kd's
version instead: tests/test_init.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[1]


def kd_stages() -> dict[str, tuple[str, list[str]]]:
    """EXAMPLE:STAGE -> (the `kd` command it runs, its deps relative to the repository root)."""
    found = {}
    for dvc_yaml in sorted((ROOT / "examples").glob("*/dvc.yaml")):
        base = dvc_yaml.parent
        for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
            body = stage.get("do", stage)
            words = body["cmd"].split()
            if words[0] == "kd":
                deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]
                rel = [os.path.relpath(os.path.normpath(base / d), ROOT) for d in deps]
                found[f"{base.name}:{name}"] = (words[1], rel)
    return found


def test_every_kd_stage_of_every_example_depends_on_the_whole_package():
    stages = kd_stages()
    assert len(stages) >= 40 and {name.split(":")[0] for name in stages} >= {
        "mnist", "text", "masked", "images", "generate", "capacity", "capacity_large", "task_general", "sampled",
        "xtok"}, sorted(stages)
    for name, (command, deps) in stages.items():
        assert (ROOT / "kd" / "cli" / f"{command}.py").is_file(), (name, command)
        assert "kd" in deps, (name, deps)
