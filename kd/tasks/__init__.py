"""Tasks: what kind of model a cache serves, resolved once, then asked.

A task is a module of plain functions answering the same questions for `kd label`,
`kd distill`, `kd eval` and `kd assistants`: how its prepared samples become teacher inputs and
cache rows (`Inputs`, as `kd.cache.batch` asks: the cache layer is handed it and imports no
task), how `kd cache verify` checks those rows (`ROW_COLUMNS`, `check_rows`), which rows and
batches a student trains on (`rows`, `twin_rows`), what decides its baseline twin
(`twin_decided_by`), how a student is built, probed, saved and loaded, how it is scored
(`evaluate`: accuracy, perplexity or masked-token accuracy) and how its score reads
(`summary`). The stages call `for_cache(cache)` once and never branch on the kind of data
themselves.

Adding a task is one module plus one line in `TASKS`. The text tasks import `transformers`,
which takes seconds, so modules are imported when first asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

# Task name -> its module. The one place a kind of cache meets code.
TASKS: dict[str, str] = {"image": "kd.tasks.image", "causal_lm": "kd.tasks.causal_lm",
                         "masked_lm": "kd.tasks.masked_lm"}
# A language model's objective (its class: ...ForCausalLM or ...ForMaskedLM) -> its task.
OBJECTIVES = {"causal": "causal_lm", "masked": "masked_lm"}


def get(name: str) -> ModuleType:
    return importlib.import_module(TASKS[name])


def name_of(manifest: dict[str, Any]) -> str:
    """The task of a cache, from its manifest: a token cache records its objective."""
    text = manifest.get("text")
    return "image" if text is None else OBJECTIVES[text["objective"]]


def for_manifest(manifest: dict[str, Any]) -> ModuleType:
    """The task of a cache's manifest (or of `kd.cache.verify.info`'s summary, which keeps its
    `text`): what `kd.cache.verify` is handed to check and describe the cache's rows."""
    return get(name_of(manifest))


def for_cache(cache: Any) -> ModuleType:
    return for_manifest(cache.manifest)


def for_prepared(prepared: Path, objective: str | None = None) -> ModuleType:
    """The task of prepared data: images, or text for a causal or masked language model (the
    teacher's `objective`; `causal_lm` without one, whose `train_teacher` trains either)."""
    from kd.prepared import tokens as text

    if text.modality(Path(prepared) / "labeled.parquet") != "text":
        return get("image")
    return get(OBJECTIVES.get(objective or "causal", "causal_lm"))


def inputs_for(prepared: Path, teacher: Any) -> type:
    """The `Inputs` class that `kd.cache.label` is handed to label `prepared` with `teacher` (a
    `kd.cache.Teacher`): of the data's task, for a language model the teacher's objective."""
    return for_prepared(prepared, teacher.config.get("objective")).Inputs


def for_teacher(directory: Path) -> ModuleType:
    """The task that loads the teacher in `directory`: a Hugging Face language model (its
    config.json names a `model_type`; either objective loads through `causal_lm`), or ours or a
    Hugging Face image classifier (`image`)."""
    from kd.files import read_json
    from kd.tasks.image_models import is_hf_classifier

    config = Path(directory) / "config.json"
    if is_hf_classifier(directory):
        return get("image")
    return get("causal_lm" if config.is_file() and "model_type" in read_json(config) else "image")
