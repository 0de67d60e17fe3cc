"""dvc.yaml cannot go stale: every `kd` stage depends on the code its command can run.

Each stage depends on its own stage module, stages/common.py and the whole pipeline/ library,
and a stage module imports nothing else of the project (checked on its source, lazy imports
included). The end-to-end test (test_pipeline_e2e.py) checks the effect: after an edit,
`dvc status` reports exactly the stages that run the edited file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

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


def project_imports(path: Path) -> set[str]:
    """The project modules (pipeline.*, stages.*) a file imports, lazily or not."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in ("pipeline", "stages")}


def test_every_kd_stage_depends_on_its_module_its_helpers_and_the_whole_library():
    stages = kd_stages()
    assert len(stages) >= 18, sorted(stages)
    for name, (command, deps) in stages.items():
        module = f"stages/{command}.py"
        assert (ROOT / module).is_file(), (name, module)
        assert {module, "stages/common.py", "pipeline"} <= set(deps), (name, deps)


def test_stage_modules_import_only_the_library_and_the_common_helpers():
    for module in sorted((ROOT / "stages").glob("*.py")):
        if module.name in ("cli.py", "__init__.py"):
            continue
        outside = {n for n in project_imports(module) if n.split(".")[0] == "stages" and n != "stages.common"}
        assert not outside, f"{module.name} imports {sorted(outside)}: add them to its dvc.yaml deps or move them"
