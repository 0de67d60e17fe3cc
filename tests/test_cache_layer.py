"""The cache layer calls no task: no module under kd/cache/ imports kd.tasks, at module level or
inside a function (the task hands the writer its `Inputs`, the caller hands verify the task of
a manifest). Read with `ast`, so an import that only runs on some path counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kd.cache

pytestmark = pytest.mark.unit

CACHE = Path(kd.cache.__file__).parent


def task_imports(path: Path) -> list[str]:
    """`line: statement` of every import of kd.tasks (or of a module under it) in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) \
                and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("import_module", "__import__") \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names = [node.args[0].value]
        if any(name == "kd.tasks" or name.startswith("kd.tasks.") for name in names):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_cache_module_imports_a_task():
    modules = sorted(CACHE.rglob("*.py"))
    assert {"writer.py", "verify.py", "batch.py"} <= {p.name for p in modules}
    offending = {str(p.relative_to(CACHE.parent.parent)): lines for p in modules if (lines := task_imports(p))}
    assert offending == {}


def test_the_check_sees_every_form_of_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import kd.tasks\nfrom kd import tasks\nfrom kd.tasks.image import Inputs\n"
                      "def f():\n    from kd.tasks import image\n    importlib.import_module('kd.tasks.causal_lm')\n"
                      "from kd import features\nfrom kd.cache import tasks_like\n")
    assert [line.split(":")[0] for line in task_imports(source)] == ["1", "2", "3", "5", "6"]
