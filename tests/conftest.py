"""The tests' fixtures (plain helpers live in tests/helpers.py): a scratch working directory, a
params.yaml writer, the stage runner as a fixture (`run_command`), the shared tiny worlds
(`lm_world`: text with kd's own BPE and a GPT-2 teacher; `hf_world`: Hugging Face teachers), the
environment for a subprocess whose result is compared with this process's (`child_env`), and a
guard that fails any test leaving process-wide state changed.

tests.helpers is imported inside the fixtures that use it: test_process_state.py runs a copy of
this file in a bare directory where only the guard is needed and `tests` is not importable."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# polars and scikit-learn write environment variables when imported (polars its allocator's
# settings; scikit-learn, imported by the datasets, OpenMP's): imported here, before the first
# test, so that the guard below does not blame the first test that imports them.
import polars  # noqa: F401
import pytest
import sklearn  # noqa: F401
import torch
import yaml

from kd import kernels

# Set by the tools themselves, once per process, whenever first used: pytest (per test phase)
# and torch (its fused AdamW on CPU initialises Inductor's cache directory).
_SET_BY_TOOLS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


def _process_state() -> dict[str, Any]:
    """What one test could change for every test after it in this process."""
    return {"torch threads": torch.get_num_threads(), "torch default dtype": torch.get_default_dtype(),
            "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
            "environment": {k: v for k, v in os.environ.items() if k not in _SET_BY_TOOLS},
            "working directory": os.getcwd()}


def _restore(state: dict[str, Any]) -> None:
    torch.set_num_threads(state["torch threads"])
    torch.set_default_dtype(state["torch default dtype"])
    torch.use_deterministic_algorithms(state["torch deterministic algorithms"])
    for key in set(os.environ) - set(state["environment"]) - _SET_BY_TOOLS:
        del os.environ[key]
    os.environ.update(state["environment"])
    os.chdir(state["working directory"])


TIERS = ("unit", "integration", "e2e")  # pyproject.toml's markers: what `pytest -m TIER` selects


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a collection in which a test carries no tier or more than one (before `-m` selects),
    so that `pytest -m unit` and friends never silently miss a test. Off where the tiers are not
    registered (test_process_state.py's copy of this file, in a bare directory)."""
    registered = {line.split(":")[0].strip() for line in config.getini("markers")}
    if not set(TIERS) <= registered:
        return
    wrong = [f"{item.nodeid}: {', '.join(found) or 'none'}" for item in items
             if len(found := [tier for tier in TIERS if item.get_closest_marker(tier)]) != 1]
    if wrong:
        raise pytest.UsageError("every test needs exactly one of the marks " + ", ".join(TIERS) + ":\n"
                                + "\n".join(wrong))


@pytest.fixture(autouse=True)
def process_state_unchanged() -> Any:
    """Fail the test (and put things back) if it left torch's threads, default dtype or
    deterministic flag, the environment or the working directory changed. A test that compares
    runs needs the same state on both sides (1 and 2 threads give different float bits), so a
    leak here shows up far away, in whichever test runs next."""
    before = _process_state()
    yield
    after = _process_state()
    changed = [key for key in before if before[key] != after[key]]
    if changed:
        _restore(before)
        env = [k for k in before["environment"].keys() | after["environment"].keys()
               if before["environment"].get(k) != after["environment"].get(k)]
        details = "; ".join(f"{key}: {before[key]!r} -> {after[key]!r}" if key != "environment"
                            else f"environment variables {sorted(env)}" for key in changed)
        pytest.fail(f"the test left process-wide state changed (restore it, e.g. speed.torch_threads): {details}",
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def topk_kernel_built() -> None:
    """Build (or load) the compiled top-k loss once, before any test: a first build takes about
    40 s and says so on stderr, which no command's output checked by a test should carry."""
    if kernels.enabled() and kernels.compiler() is not None:
        kernels.topk_kl()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the current directory, so the stages' default paths (data/...) land in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """write_params(prepare={...}, teacher={...}) -> the path of a fresh params.yaml in tmp_path."""

    def write(path: Path | None = None, **sections: Any) -> Path:
        path = path or tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        return path

    return write


@pytest.fixture
def run_command() -> Callable[..., Any]:
    """run_command(stage.main, "--opt", value, ...) -> click Result (`invoke`, as a fixture)."""
    from tests.helpers import invoke

    return invoke


@pytest.fixture(scope="session")
def lm_world(tmp_path_factory) -> Path:
    """A tiny text world: pydoc in LM_BLOCK-token blocks with a 512-token BPE, and a one-layer
    GPT-2 teacher trained one epoch on it: root/prepared, root/teacher, root/params.yaml (empty).
    Built once per session for every module that asks; tests read it (or write beside it)."""
    from kd.cli import prepare, teacher
    from tests.helpers import LM_BLOCK, invoke, ok

    root = tmp_path_factory.mktemp("tokens")
    params = root / "params.yaml"
    params.write_text("{}\n")
    ok(invoke(prepare.main, "--dataset", "pydoc", "--vocab-size", 512, "--block-size", LM_BLOCK, "--labeled", 120,
              "--unlabeled", 40, "--test", 20, "--params", params, "--out", root / "prepared"))
    ok(invoke(teacher.main, "--arch", "gpt2", "--arch-kwargs", '{"n_layer": 1, "n_head": 2, "n_embd": 32}',
              "--epochs", 1, "--batch-size", 16, "--no-progress", "--prepared", root / "prepared",
              "--out", root / "teacher", "--params", params))
    return root


@pytest.fixture
def child_env() -> dict[str, str]:
    """The environment for a subprocess whose result is compared with one computed in this process:
    the same torch thread count on both sides (1 and 2 threads give different float bits)."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.fixture(scope="session")
def hf_world(tmp_path_factory) -> Path:
    """root/{llama,qwen2,gpt_neox}: sharded teachers; root/prepared-<type>: pydoc cut with each
    teacher's tokenizer; root/params.yaml: empty. Built once per session; tests read it (or
    write beside it, under names of their own)."""
    from kd.cli import prepare
    from tests.helpers import SIZES, TINY, hf_tokenizer, invoke, ok, save_hf_model

    root = tmp_path_factory.mktemp("hf")
    (root / "params.yaml").write_text("{}\n")
    tokenizer = hf_tokenizer()
    for model_type in TINY:
        save_hf_model(root / model_type, model_type, tokenizer)
        ok(invoke(prepare.main, "--dataset", "pydoc", "--tokenizer", root / model_type, *SIZES,
                  "--params", root / "params.yaml", "--out", root / f"prepared-{model_type}"))
    return root
