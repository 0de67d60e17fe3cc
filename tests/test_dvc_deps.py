"""dvc.yaml cannot go stale: every `kd` stage depends on the code its command can run.

Each stage depends on the whole kd/ package: the library and the command modules. The
end-to-end test (test_pipeline_e2e.py) checks the effect: after an edit to the library, every
stage is stale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[1]


def kd_stages() -> dict[str, tuple[str, list[str]]]:
    """stage name -> (the `kd` command it runs, its deps), over dvc.yaml."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        words = body["cmd"].split()
        if words[0] == "kd":
            found[name] = (words[1], [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])])
    return found


def test_every_kd_stage_depends_on_the_whole_package():
    stages = kd_stages()
    assert len(stages) >= 18, sorted(stages)
    for name, (command, deps) in stages.items():
        assert (ROOT / "kd" / "cli" / f"{command}.py").is_file(), (name, command)
        assert "kd" in deps, (name, deps)
