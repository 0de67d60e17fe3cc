"""`kd init`: a ready DVC project from a template (the package data under kd/templates/).

A template is a `dvc.yaml` (that template's stages only) and a `params.yaml` (every key kd
reads, with its default and what it means), run end to end by `dvc repro` on a built-in
dataset. Every project also gets `datasets/` and `models/` (each with a README), `.gitignore`
and `.dvcignore` (kd/templates/common/), and, where the directory is not inside a git
repository yet, `git init` + `dvc init`.

The user's pieces (`Pieces`: a dataset, a teacher, a tokenizer, the students' architecture or
start, any KEY=VALUE) are written into params.yaml by editing the template's text, so its
comments stay (`set_value`). A teacher of one's own is `paths.teacher`, which dvc.yaml reads
itself (`kd label --teacher ${paths.teacher}`, and a dependency on it); the `teacher` stage is
then left out (`drop_stage`). A path outside the directories a stage already depends on
(datasets/, models/) becomes a dependency of that stage (`add_dep`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kd.errors import ConfigError, InputError, KDError, MissingInputError

TEMPLATES = ("image", "text", "instruction", "masked", "generate")
TOKENIZER_FILE = "tokenizer.json"  # the one tokenizer file of kd's own BPE, as the templates list it
# Template -> what `--dataset` changes besides prepare.dataset: the defaults fitted to the
# built-in dataset that another dataset would not fit (the addition sums are 12 tokens long).
OWN_DATA: dict[str, dict[str, Any]] = {
    "instruction": {"prepare.prompt_column": "prompt", "prepare.response_column": "response",
                    "prepare.vocab_size": 4096, "prepare.block_size": 256},
    "generate": {"prepare.prompt_column": "prompt", "prepare.response_column": "response",
                 "prepare.vocab_size": 4096, "prepare.block_size": 256, "generate.max_new_tokens": 128},
}
# The files every project gets: template-relative source -> name in the project.
COMMON = {"gitignore": ".gitignore", "dvcignore": ".dvcignore", "datasets/README.md": "datasets/README.md",
          "models/README.md": "models/README.md"}


@dataclass
class Pieces:
    """What the user brings (`kd init` options); None: the template's default."""

    dataset: str | None = None  # a built-in name or a path (file or folder)
    teacher: str | None = None  # a model directory `kd label` runs instead of a trained teacher
    tokenizer: str | None = None  # a tokenizer (or model) directory to cut the text with
    student_arch: str | None = None  # image: every student's architecture
    student_init: str | None = None  # language models: a pretrained directory every student starts from
    settings: list[str] = field(default_factory=list)  # KEY=VALUE, the value in YAML; `students.*.KEY` for all


def init_project(directory: Path, template: str = "image", pieces: Pieces | None = None,
                 *, version_control: bool = True) -> list[str]:
    """Write the project into `directory` (created if missing); return what was done, one line each.

    Refused, before anything is written, if the directory holds a dvc.yaml or a params.yaml,
    or if an option or the resulting params.yaml is one kd would refuse.
    """
    if template not in TEMPLATES:
        raise ConfigError(f"--template: {template!r} must be one of {', '.join(TEMPLATES)}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a directory")
    for name in ("dvc.yaml", "params.yaml"):
        if (directory / name).exists():
            raise ConfigError(f"{directory / name}: already there (kd init writes a new project; choose another "
                              "directory)")
    params, pipeline, done = fill_in(_read(template, "params.yaml"), _read(template, "dvc.yaml"), template,
                                     pieces or Pieces(), directory)
    check_params(yaml.safe_load(params))
    directory.mkdir(parents=True, exist_ok=True)
    if version_control:
        done += _version_control(directory)
    (directory / "params.yaml").write_text(params)
    (directory / "dvc.yaml").write_text(pipeline)
    for source, name in COMMON.items():
        _write_common(directory / name, _read("common", source))
    return [f"{template} project in {directory}: dvc.yaml, params.yaml, datasets/, models/, .gitignore, "
            ".dvcignore", *done]


def fill_in(params: str, pipeline: str, template: str, pieces: Pieces, directory: Path) -> tuple[str, str, list[str]]:
    """The template's params.yaml and dvc.yaml texts with the user's pieces in; what changed."""
    done: list[str] = []
    deps = _stage_deps(pipeline)

    def put(key: str, value: Any) -> None:
        nonlocal params
        params = set_value(params, key, value)
        done.append(f"params.yaml: {key} = {_flow(value)}")

    def depend(stage: str, path: str) -> None:
        nonlocal pipeline
        if stage in deps and not any(_under(path, dep) for dep in deps[stage]):
            pipeline = add_dep(pipeline, stage, path)
            done.append(f"dvc.yaml: {stage} depends on {path}")

    students = list(yaml.safe_load(params).get("students") or {})
    if pieces.dataset is not None:
        value = _dataset(pieces.dataset, template, directory)
        put("prepare.dataset", value)
        if value not in builtin_datasets(template):
            depend("prepare", value)
            for key, default in OWN_DATA.get(template, {}).items():
                put(key, default)
    tokenizer = pieces.tokenizer
    if pieces.teacher is not None:
        teacher = _user_path(pieces.teacher, directory, "--teacher", directory_with="config.json")
        put("paths.teacher", teacher)
        pipeline = drop_stage(pipeline, "teacher")
        done.append("dvc.yaml: no teacher stage (label runs paths.teacher)")
        if template != "image" and tokenizer is None:
            tokenizer = pieces.teacher  # the data must be cut with the teacher's tokenizer
    if tokenizer is not None:
        if template == "image":
            raise ConfigError("--tokenizer: the image template reads no text")
        value = _user_path(tokenizer, directory, "--tokenizer", directory_with=None)
        put("prepare.tokenizer", value)
        depend("prepare", value)
        pipeline = replace_outs(pipeline, TOKENIZER_FILE, _tokenizer_names(Path(tokenizer).expanduser()))
    if pieces.student_arch is not None:
        if template != "image":
            raise ConfigError("--student-arch: for the image template; a language-model student's arch and arch_kwargs "
                              "are set in params.yaml, or it starts from a pretrained directory (--student-init)")
        for name in students:
            put(f"students.{name}.arch", pieces.student_arch)
            put(f"students.{name}.arch_kwargs", {})
    if pieces.student_init is not None:
        if template == "image":
            raise ConfigError("--student-init: for the language-model templates (a Hugging Face directory)")
        start = _user_path(pieces.student_init, directory, "--student-init", directory_with="config.json")
        model_type = _model_type(Path(pieces.student_init) / "config.json")
        for name in students:
            put(f"students.{name}.init", start)
            put(f"students.{name}.arch", model_type)
            put(f"students.{name}.arch_kwargs", {})
        for stage in ("distill", "eval"):
            depend(stage, start)
    for setting in pieces.settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: {setting!r} must be KEY=VALUE, e.g. students.*.epochs=5")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set: {setting!r}: the value is not valid YAML") from None
        for name in (students if key.split(".")[:2] == ["students", "*"] else [None]):
            put(key if name is None else key.replace("*", name, 1), value)
    return params, pipeline, done


def builtin_datasets(template: str) -> tuple[str, ...]:
    """The built-in datasets a template's pipeline can run on."""
    from kd.sources.builtin import SOURCES

    kinds = {"image": ("images", "image_folder"), "instruction": ("examples",), "generate": ("examples",)}
    return tuple(name for name, source in SOURCES.items() if source.kind in kinds.get(template, ("documents",)))


def check_params(params: dict[str, Any]) -> None:
    """Build every section of a params mapping (every student entry too) as its command will:
    the first unknown key or bad value fails, naming it."""
    from kd import config
    from kd.on_policy import OnPolicyConfig

    classes = {"paths": config.PathsConfig, "prepare": config.PrepareConfig, "teacher": config.TeacherConfig,
               "generate": config.GenerateConfig, "label": config.LabelConfig, "eval": config.EvalConfig,
               "on_policy": OnPolicyConfig}
    for name, data in params.items():
        if name not in config.SECTIONS:
            raise ConfigError(f"params.yaml: unknown key {name!r} (sections are {', '.join(config.SECTIONS)})")
        if name in classes:
            config.from_mapping(classes[name], data or {}, name)
            continue
        for entry, spec in (data or {}).items():
            config.from_mapping(config.StudentConfig, {**(spec or {}), "name": entry, "section": name},
                                f"{name}.{entry}")


# --- editing the templates' text ---------------------------------------------------------------

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*):(?P<rest>.*)$")


def set_value(text: str, dotted: str, value: Any) -> str:
    """`text` (YAML in block style) with the value at `dotted` replaced by `value`, the line's
    comment kept in its column. A key inside a flow mapping (`soft: {weight: 0.9}`) is set in
    it. The key must be there already: an unknown one is an error naming it."""
    target = dotted.split(".")
    lines = text.split("\n")
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        match = _KEY.match(line)
        if match is None or line.lstrip().startswith("#"):
            continue
        indent, key = len(match["indent"]), match["key"]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        path = [k for _, k in stack]
        if path != target[:len(path)]:
            continue
        old, comment = _split_comment(match["rest"])
        column = len(line) - len(comment)
        end = i + 1
        while _open_brackets(old) > 0 and end < len(lines):  # a flow value continued on the next lines
            more, comment = _split_comment(lines[end])
            old, end, column = f"{old} {more.strip()}", end + 1, 0
        if path == target:
            new = value
        elif old.strip().startswith("{"):  # the rest of the key is inside this flow mapping
            new = yaml.safe_load(old)
            inner = new
            for part in target[len(path):-1]:
                inner = inner.get(part) if isinstance(inner, dict) else None
            if not isinstance(inner, dict) or target[-1] not in inner:
                break
            inner[target[-1]] = value
        else:
            continue
        head = f"{match['indent']}{key}: {_flow(new)}"
        if comment:
            head = head.ljust(column) if len(head) < column else head + "  "
        lines[i:end] = [head + comment]
        return "\n".join(lines)
    raise ConfigError(f"{dotted}: no such key in the template's params.yaml")


def _split_comment(rest: str) -> tuple[str, str]:
    """A line's value and its trailing comment (`# ...`, outside quotes)."""
    quote = None
    for i, char in enumerate(rest):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or rest[i - 1] == " "):
            return rest[:i], rest[i:]
    return rest, ""


def _open_brackets(value: str) -> int:
    """How many `{` and `[` of a flow value are still open (outside quotes)."""
    depth, quote = 0, None
    for char in value:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    return depth


def _flow(value: Any) -> str:
    """`value` as YAML on one line (flow style)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10 ** 6, sort_keys=False).strip()[1:-1]


def _stage_deps(pipeline: str) -> dict[str, list[str]]:
    """Stage name -> its deps, as the template lists them."""
    stages = yaml.safe_load(pipeline)["stages"]
    return {name: [d if isinstance(d, str) else next(iter(d)) for d in stage.get("do", stage).get("deps", [])]
            for name, stage in stages.items()}


def _stage_lines(lines: list[str], stage: str) -> tuple[int, int]:
    """The first and past-the-last line of a stage's block under `stages:`."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {stage}:"))
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith("   ")):
        end += 1
    return start, end


def replace_outs(pipeline: str, name: str, names: list[str]) -> str:
    """`pipeline` (dvc.yaml's text) with every listed path ending in `/name` replaced by one
    line per entry of `names` in the same folder (a model directory's tokenizer files)."""
    lines = []
    for line in pipeline.split("\n"):
        if line.lstrip().startswith("- ") and line.endswith(f"/{name}"):
            lines += [line[:-len(name)] + other for other in names]
        else:
            lines.append(line)
    return "\n".join(lines)


def drop_stage(pipeline: str, stage: str) -> str:
    """`pipeline` (dvc.yaml's text) without the stage's block."""
    lines = pipeline.split("\n")
    start, end = _stage_lines(lines, stage)
    return "\n".join(lines[:start] + lines[end:])


def add_dep(pipeline: str, stage: str, path: str) -> str:
    """`pipeline` (dvc.yaml's text) with `path` added to the stage's deps."""
    lines = pipeline.split("\n")
    start, end = _stage_lines(lines, stage)
    at = next(i for i in range(start, end) if lines[i].strip() == "deps:")
    item = lines[at + 1][:len(lines[at + 1]) - len(lines[at + 1].lstrip())]
    lines.insert(at + 1, f"{item}- {_flow(path)}")
    return "\n".join(lines)


# --- the user's pieces ---------------------------------------------------------------------------


def _dataset(name: str, template: str, directory: Path) -> str:
    if not Path(name).expanduser().exists() and name in builtin_datasets(template):
        return name
    if not Path(name).expanduser().exists():
        raise MissingInputError(f"--dataset: {name} is neither a file or folder nor a built-in dataset of the "
                                f"{template} template ({', '.join(builtin_datasets(template))})")
    return _user_path(name, directory, "--dataset", directory_with=None)


def _user_path(given: str, directory: Path, option: str, *, directory_with: str | None) -> str:
    """A path given on the command line as params.yaml names it: relative to the project when
    inside it, else absolute. `directory_with`: it must be a directory holding this file."""
    path = Path(given).expanduser()
    if directory_with is not None and not (path / directory_with).is_file():
        raise MissingInputError(f"{option}: {path / directory_with} not found (a model directory, as "
                                "save_pretrained writes it)")
    if not path.exists():
        raise MissingInputError(f"{option}: {path} not found")
    absolute, project = path.resolve(), directory.resolve()
    return absolute.relative_to(project).as_posix() if absolute.is_relative_to(project) else str(absolute)


def _tokenizer_names(directory: Path) -> list[str]:
    """The tokenizer files kd copies from `directory` into every model directory it writes."""
    from kd.prepared.tokens import tokenizer_files

    names = [path.name for path in tokenizer_files(directory)] if directory.is_dir() else []
    if not names:
        raise MissingInputError(f"--tokenizer: {directory} holds no tokenizer files (tokenizer.json, "
                                "tokenizer_config.json, vocab.txt, ...)")
    return names


def _model_type(config: Path) -> str:
    found = (yaml.safe_load(config.read_text()) or {}).get("model_type")  # JSON is YAML
    if not isinstance(found, str):
        raise InputError(f"{config}: no model_type (a Hugging Face model's config.json names one)")
    return found


def _under(path: str, dep: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


# --- files and version control -------------------------------------------------------------------


def _read(template: str, name: str) -> str:
    return resources.files("kd").joinpath("templates", template, name).read_text()


def _write_common(path: Path, text: str) -> None:
    """Write a common file; an existing .gitignore or .dvcignore gets the lines it lacks, any
    other existing file is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(text)
    elif path.name in (".gitignore", ".dvcignore"):
        have = set(path.read_text().splitlines())
        missing = [line for line in text.splitlines() if line and not line.startswith("#") and line not in have]
        if missing:
            with open(path, "a") as handle:
                handle.write("".join(f"{line}\n" for line in ["# kd init", *missing]))


def _version_control(directory: Path) -> list[str]:
    """`git init` and `dvc init` where `directory` is in no git repository; `dvc init --subdir`
    where it is in one without DVC; nothing where DVC is already there."""
    git = shutil.which("git")
    if git is None:
        raise MissingInputError("git: not found on PATH (kd init makes the project a git repository; install git)")
    found = subprocess.run([git, "rev-parse", "--show-toplevel"], cwd=directory, capture_output=True, text=True)
    if found.returncode != 0:
        _run([git, "init", "-q"], directory)
        _dvc(["init", "-q"], directory)
        done = ["git init, dvc init"]
    else:
        root = Path(found.stdout.strip()).resolve()
        here = directory.resolve()
        if any((folder / ".dvc").is_dir() for folder in (here, *here.parents) if folder.is_relative_to(root)):
            return [f"inside the DVC repository {root}: no git init, no dvc init"]
        _dvc(["init", "-q", "--subdir"], directory)
        done = [f"inside the git repository {root}: dvc init --subdir"]
    _dvc(["config", "core.analytics", "false"], directory)
    return done + ["dvc config core.analytics false"]


def _dvc(args: list[str], cwd: Path) -> None:
    _run([sys.executable, "-m", "dvc", *args], cwd)


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()[-1]
        tool = "dvc" if command[0] == sys.executable else Path(command[0]).name
        raise KDError(f"{tool} {' '.join(a for a in command[1:] if a not in ('-m', 'dvc'))} in {cwd}: {last}")
