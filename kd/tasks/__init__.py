"""Tasks: what kind of model a cache serves, resolved once, then asked.

A task is a module of plain functions answering the same questions for `kd label`,
`kd distill`, `kd eval`, `kd assistants`, `kd teacher` and `kd cache`: the contract is `Task`
below (its `Inputs` is what `kd.cache.batch.Inputs` asks: the cache layer is handed it and
imports no task), which each module satisfies structurally (nothing to inherit). The stages call
`for_cache(cache)` (or `for_prepared`, `for_teacher`) once and never branch on the kind of data
themselves.

Adding a task is one module plus one line in `TASKS`. The text tasks import `transformers`,
which takes seconds, so modules are imported when first asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # for annotations only (kd.cache imports this package)
    from torch import nn

    from kd.cache import Cache, Teacher
    from kd.cache.batch import Inputs
    from kd.config import EvalConfig, StudentConfig, TeacherConfig

# Task name -> its module. The one place a kind of cache meets code.
TASKS: dict[str, str] = {"image": "kd.tasks.image", "causal_lm": "kd.tasks.causal_lm",
                         "masked_lm": "kd.tasks.masked_lm"}
# A language model's objective (its class: ...ForCausalLM or ...ForMaskedLM) -> its task.
OBJECTIVES = {"causal": "causal_lm", "masked": "masked_lm"}


def get(name: str) -> Task:
    """The task module of that name (`TASKS`), imported on first use."""
    return importlib.import_module(TASKS[name])


def name_of(manifest: dict[str, Any]) -> str:
    """The task of a cache, from its manifest: a token cache records its objective."""
    text = manifest.get("text")
    return "image" if text is None else OBJECTIVES[text["objective"]]


def for_manifest(manifest: dict[str, Any]) -> Task:
    """The task of a cache's manifest (or of `kd.cache.verify.info`'s summary, which keeps its
    `text`): what `kd.cache.verify` is handed to check and describe the cache's rows."""
    return get(name_of(manifest))


def for_cache(cache: Any) -> Task:
    """The task of a cache (`name_of` its manifest)."""
    return for_manifest(cache.manifest)


def for_prepared(prepared: Path, objective: str | None = None) -> Task:
    """The task of prepared data: images, or text for a causal or masked language model (the
    teacher's `objective`; `causal_lm` without one, whose `train_teacher` trains either)."""
    from kd.prepared import tokens

    if tokens.modality(Path(prepared) / "labeled.parquet") != "text":
        return get("image")
    return get(OBJECTIVES.get(objective or "causal", "causal_lm"))


def inputs_for(prepared: Path, teacher: Any) -> type[Inputs]:
    """The `Inputs` class that `kd.cache.label` is handed to label `prepared` with `teacher` (a
    `kd.cache.Teacher`): of the data's task, for a language model the teacher's objective."""
    return for_prepared(prepared, teacher.config.get("objective")).Inputs


def for_teacher(directory: Path) -> Task:
    """The task that loads the teacher in `directory`: a Hugging Face language model (its
    config.json names a `model_type`; either objective loads through `causal_lm`), or ours or a
    Hugging Face image classifier (`image`)."""
    from kd.files import read_json
    from kd.tasks.image_models import is_hf_classifier

    config = Path(directory) / "config.json"
    if is_hf_classifier(directory):
        return get("image")
    return get("causal_lm" if config.is_file() and "model_type" in read_json(config) else "image")


@runtime_checkable
class Task(Protocol):
    """What the stages and the library ask of a task module (`image`, `causal_lm`, `masked_lm`).

    A module satisfies it by having these names; `tests/test_tasks.py` checks each one."""

    NAME: str  # the task's name in `TASKS`
    TWIN_LOSS: str  # what the baseline twin learns from, for messages
    ROW_COLUMNS: tuple[str, ...]  # cache columns between `view` and the soft targets
    Inputs: type[Inputs]  # `kd label`: the prepared samples

    # --- kd distill ---
    def check(self, cfg: StudentConfig, cache: Cache, prepared: Path) -> None:
        """Refuse up front, in one line, a student this task cannot train."""

    def rows(self, cache: Cache, prepared: Path, cfg: StudentConfig, memory_mb: float) -> Any:
        """The student's transfer rows with their cached targets (`loader`: in memory or streamed)."""

    def twin_rows(self, cache: Cache, prepared: Path, cfg: StudentConfig, transfer: Any) -> Any:
        """The rows the baseline twin learns from without the teacher (`transfer`: the student's)."""

    def twin_decided_by(self, cfg: StudentConfig, cache: Cache, prepared: Path) -> dict[str, Any]:
        """What decides a baseline twin besides its budget and seed (its key, to share it)."""

    def build(self, cfg: StudentConfig, cache: Cache, prepared: Path) -> nn.Module:
        """A fresh student (seed torch first), seen as the training loop sees it."""

    def student_shapes(self, model: nn.Module, cfg: StudentConfig, layers: list[str], cache: Cache
                       ) -> dict[str, list[int]]:
        """The per-row shape of each student layer a loss method taps."""

    def save(self, directory: Path, model: nn.Module, cfg: StudentConfig, cache: Cache, record: dict[str, Any],
             prepared: Path) -> None:
        """Write a trained student (and `record`, where it came from) into `directory`."""

    # --- kd assistants ---
    def load(self, directory: Path, spec: StudentConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """A saved student and its config, to label as a teacher assistant."""

    # --- kd eval ---
    def evaluate(self, student_dir: Path, cache: Cache, prepared: Path, cfg: EvalConfig, spec: StudentConfig
                 ) -> tuple[dict[str, Any], dict[str, tuple[list[str], list[dict[str, Any]]]]]:
        """(metrics.json's record, plot tables by file name) of a student, its twin and its seeds."""

    def summary(self, name: str, m: dict[str, Any]) -> str:
        """One line on a student's metrics (`m`: its metrics.json record)."""

    # --- kd cache verify / info ---
    def check_rows(self, path: str, table: Any, manifest: dict[str, Any], views: int) -> list[str]:
        """The problems of one cache part's row columns (order, range), one line each."""

    def rows_description(self, summary: dict[str, Any]) -> str:
        """What one cache row is, for `kd cache info`."""

    # --- kd teacher / kd label ---
    def train_teacher(self, cfg: TeacherConfig, prepared: Path, out: Path, *, progress: bool = True) -> str:
        """Train a teacher on the prepared data and write it into `out`; its score, in words."""

    def load_teacher(self, directory: Path, arch: str | None = None, arch_kwargs: dict | None = None, *,
                     dtype: str = "auto", device: str = "auto") -> Teacher:
        """A teacher directory loaded to label, with what identifies it."""
