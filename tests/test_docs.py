"""The documentation is checked like code: README.md and docs/*.md.

Every fenced code block is exactly one of these (test_every_code_block_is_run_or_marked):
- `text`: a diagram, a file tree or a command's output; not code;
- preceded by `<!-- notest: REASON -->` on the line before its fence: not runnable here
  (it trains for minutes, downloads, needs a GPU, a cluster or your own data), with the reason;
- preceded by `<!-- snippet: NAME (executed by tests/test_X.py) -->`: a python block that
  test file runs (it names NAME; `conftest.doc_snippet` finds the block);
- `yaml`: parsed, and every params section in it built by kd.config as `kd` would read it;
- `python`: run in a scratch directory;
- `bash` made only of `kd ...` commands: run through the CLI, in order, in a scratch project
  with a tiny prepared dataset, teacher and cache at the default paths.
docs/cli.md is generated from the CLI (docs/make_cli_reference.py) and must be up to date, and
the key tables of docs/params.md and docs/methods.md must list every key with the code's default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kd import config, methods
from kd.on_policy import OnPolicyConfig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*/README.md")),
        ROOT / "examples" / "README.md"]
SHELLS = ("bash", "sh", "shell", "console")


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str  # the line before the fence, stripped

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ({self.lang or 'no language'})"


def code_blocks(path: Path) -> list[Block]:
    lines, blocks, i = path.read_text().split("\n"), [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(.*)$", lines[i])
        if fence is None:
            i += 1
            continue
        indent, start = fence.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = "\n".join(line[len(indent):] for line in lines[start + 1:end])
        marker = lines[start - 1].strip() if start > 0 else ""
        blocks.append(Block(path, start + 1, fence.group(2).strip(), code + "\n", marker))
        i = end + 1
    return blocks


BLOCKS = [block for path in DOCS for block in code_blocks(path)]


def commands(code: str) -> list[list[str]]:
    """A shell block's commands: continuation lines joined, comments dropped, `a && b` as two."""
    found: list[list[str]] = []
    for line in code.replace("\\\n", " ").split("\n"):
        words: list[str] = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word != "&&":
                words.append(word)
            elif words:
                found.append(words)
                words = []
    return found


def kind(block: Block) -> str:
    """How a block is checked (the module docstring's list), or why it is neither run nor marked."""
    if block.lang == "text":
        return "text"
    notest = re.fullmatch(r"<!-- notest: (.*\S.*) -->", block.marker)
    if notest:
        return "notest"
    if re.fullmatch(r"<!-- snippet: \S+ \(executed by tests/test_\w+\.py\) -->", block.marker):
        return "snippet" if block.lang == "python" else "error: a snippet block must be python"
    if block.lang == "yaml":
        return "yaml"
    if block.lang == "python":
        return "python"
    if block.lang in SHELLS and all(words[0] == "kd" for words in commands(block.code)):
        return "kd"
    return ("error: neither run nor marked; mark it `<!-- notest: REASON -->` on the line before its "
            "fence, or make it a `kd ...` block, a python or yaml block, or `text`")


def of_kind(name: str) -> list[Any]:
    return [pytest.param(block, id=str(block)) for block in BLOCKS if kind(block) == name]


def test_every_code_block_is_run_or_marked():
    assert BLOCKS, "no code blocks found"
    errors = [f"{block}: {kind(block)[len('error: '):]}" for block in BLOCKS if kind(block).startswith("error")]
    assert not errors, "\n".join(errors)


def test_each_snippet_is_run_by_the_test_it_names():
    for block in BLOCKS:
        if kind(block) == "snippet":
            name, test_file = re.fullmatch(r"<!-- snippet: (\S+) \(executed by (tests/test_\w+\.py)\) -->",
                                           block.marker).groups()
            assert (ROOT / test_file).is_file(), f"{block}: {test_file} does not exist"
            assert f'"{name}"' in (ROOT / test_file).read_text(), f"{block}: {test_file} does not run {name!r}"
            assert sum(f"<!-- snippet: {name} " in path.read_text() for path in DOCS) == 1, f"{name} twice"


# params section -> the dataclass `kd` builds it into (students' sections: each entry)
SECTION_CLASSES = {"prepare": config.PrepareConfig, "teacher": config.TeacherConfig, "generate": config.GenerateConfig,
                   "label": config.LabelConfig, "eval": config.EvalConfig, "paths": config.PathsConfig,
                   "on_policy": OnPolicyConfig}


def check_params(data: dict[str, Any], where: str) -> None:
    """Build every section of a params mapping as `kd` does (ConfigError names a bad key)."""
    for section, value in data.items():
        assert section in config.SECTIONS, f"{where}: {section!r} is not a params section"
        if section in config.STUDENT_SECTIONS or section == "assistants":
            for name, entry in (value or {}).items():
                config.from_mapping(config.StudentConfig, {**(entry or {}), "name": name, "section": section},
                                    f"{section}.{name}")
        else:
            config.from_mapping(SECTION_CLASSES[section], value or {}, section)


@pytest.mark.parametrize("block", of_kind("yaml"))
def test_yaml_blocks_are_params_kd_accepts(block):
    data = yaml.safe_load(block.code)
    assert isinstance(data, dict), f"{block}: not a mapping of params sections"
    check_params(data, str(block))


def test_python_blocks_run(tmp_path, monkeypatch):
    for n, block in enumerate(b for b in BLOCKS if kind(b) == "python"):  # each in a fresh directory
        (tmp_path / str(n)).mkdir()
        monkeypatch.chdir(tmp_path / str(n))
        exec(compile(block.code, str(block), "exec"), {})


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A scratch project: params.yaml, and prepared digits, a teacher and its cache at the
    default paths, made by the commands themselves."""
    import os

    from kd.cli import app

    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text(yaml.safe_dump({
        "prepare": {"dataset": "digits", "labeled": 60, "unlabeled": 60, "test": 60},
        "teacher": {"arch": "mlp", "arch_kwargs": {"hidden": [16]}, "epochs": 2},
        "label": {"top_k": 3, "temperatures": [1, 4]}}))
    before = os.getcwd()
    os.chdir(root)
    try:
        for args in (["prepare"], ["teacher", "--no-progress"], ["label", "--no-progress"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, (args, result.output, result.exception)
    finally:
        os.chdir(before)
    return root


@pytest.mark.parametrize("block", of_kind("kd"))
def test_kd_blocks_run(block, project, monkeypatch):
    from kd.cli import app

    monkeypatch.chdir(project)
    for words in commands(block.code):
        result = CliRunner().invoke(app, words[1:])
        assert result.exit_code == 0, f"{block}: `{' '.join(words)}` exited {result.exit_code}:\n{result.output}"


def test_cli_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("make_cli_reference", ROOT / "docs" / "make_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "cli.md").read_text() == module.reference(), \
        "docs/cli.md is out of date: run `python docs/make_cli_reference.py`"


def key_tables(path: Path, level: str) -> dict[str, dict[str, str]]:
    """`{level} \\`NAME\\`` heading -> {key: default} from the `| \\`key\\` | \\`default\\` | ... |` rows below it."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in path.read_text().split("\n"):
        heading = re.fullmatch(rf"{level} `(\w+)`", line)
        if heading:
            current = tables.setdefault(heading.group(1), {})
        elif line.startswith("#"):
            current = None
        elif current is not None:
            row = re.match(r"\| `(\w+)` \| `(.*?)` \|", line)
            if row:
                current[row.group(1)] = row.group(2)
    return tables


def field_defaults(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls) if f.name not in skip}


def assert_table_matches(table: dict[str, str], cls: type, where: str, skip: tuple[str, ...] = ()) -> None:
    defaults = field_defaults(cls, skip)
    assert list(table) == list(defaults), f"{where}: the table lists {list(table)}, the code has {list(defaults)}"
    hints = typing.get_type_hints(cls)
    for key, text in table.items():
        value = yaml.safe_load(text)
        section = config.loss_config() if hints[key] is config.LossConfig else hints[key]  # derived from METHODS
        if dataclasses.is_dataclass(section):  # a nested section: the table shows it as params write it
            value = config.from_mapping(section, value, f"{where}.{key}")
        assert value == defaults[key], f"{where}.{key}: the table says {text}, the code's default is {defaults[key]!r}"


def test_params_reference_lists_every_key_with_its_default():
    tables = key_tables(ROOT / "docs" / "params.md", "##")
    assert list(tables) == ["prepare", "teacher", "generate", "label", "students", "eval", "paths", "on_policy"]
    for section, table in tables.items():
        if section == "students":
            assert_table_matches(table, config.StudentConfig, section, skip=("name", "section"))
        else:
            assert_table_matches(table, SECTION_CLASSES[section], section)


def test_methods_page_lists_every_method_and_key_with_its_default():
    tables = key_tables(ROOT / "docs" / "methods.md", "###")
    assert sorted(tables) == sorted(methods.METHODS)
    hints = typing.get_type_hints(config.loss_config())
    for name, table in tables.items():
        (cls,) = [t for t in typing.get_args(hints[name]) if t is not type(None)]
        assert_table_matches(table, cls, f"loss.{name}")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_links_between_pages_resolve():
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
