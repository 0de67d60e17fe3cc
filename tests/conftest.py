"""What the tests share: a scratch working directory, a params.yaml writer, the stage runner
(`invoke`, `invoke_cache`, `ok`: plain functions, for module-scoped fixtures too, and the
`run_command` fixture), a tiny text world (`lm_world`), the environment for a subprocess whose
result is compared with this process's (`child_env`), and a guard that fails any test leaving
process-wide state changed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

# polars and scikit-learn write environment variables when imported (polars its allocator's
# settings; scikit-learn, imported by the datasets, OpenMP's): imported here, before the first
# test, so that the guard below does not blame the first test that imports them.
import polars  # noqa: F401
import pytest
import sklearn  # noqa: F401
import torch
import typer
import yaml
from typer.testing import CliRunner

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


def invoke(command: Callable[..., Any], *args: Any, expect: int | None = None) -> Any:
    """Run one stage command registered alone on a fresh Typer app, as kd/cli/cli.py registers
    it, through typer's CliRunner; with `expect`, assert its exit code (showing its output)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    result = CliRunner().invoke(app, [str(a) for a in args])
    if expect is not None:
        assert result.exit_code == expect, (result.output, result.stderr, result.exception)
    return result


def invoke_cache(*args: Any) -> Any:
    """`kd cache ...`: the cache app itself, with its subcommands."""
    from kd.cli import cache

    return CliRunner().invoke(cache.app, [str(a) for a in args])


def ok(result: Any) -> Any:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


@pytest.fixture
def run_command() -> Callable[..., Any]:
    """run_command(stage.main, "--opt", value, ...) -> click Result (`invoke`, as a fixture)."""
    return invoke


def assert_streams_like_in_memory(in_memory: Any, streamed: Any, views: str = "cached", batch_size: int = 8) -> None:
    """A streamed set serves every sample once per epoch, each batch with the targets and the
    model inputs the in-memory set (a `loader.SampleSet`) has for the same rows."""
    import torch

    per_sample, served = in_memory.views * in_memory.per_view, []
    assert len(streamed) == len(in_memory)
    for batch in streamed.batches(0, batch_size, 0, views):
        for name, value in batch.items():
            if name != "x":
                assert torch.equal(value, in_memory.targets[name][batch["row"]]), name
        if in_memory.counts is None:
            first = batch["row"].reshape(-1, in_memory.per_view)[:, 0]  # one row per (sample, view)
            samples, view = first // per_sample, first % per_sample // in_memory.per_view
        else:  # samples with their own numbers of rows, one view
            of_row = torch.searchsorted(torch.cumsum(in_memory.counts, 0), batch["row"], right=True)
            samples = torch.unique_consecutive(of_row)
            assert torch.equal(in_memory.counts[samples].sum(), torch.tensor(len(of_row)))
            view = torch.zeros_like(samples)
        expected = in_memory.model_input({k: t[samples] for k, t in in_memory.inputs.items()},
                                         in_memory.ids[samples.numpy()], view)
        assert torch.equal(batch["x"], expected)
        served += samples.tolist()
    assert sorted(served) == list(range(len(in_memory)))


DOC_FILES = (Path(__file__).parents[1] / "README.md", *sorted((Path(__file__).parents[1] / "docs").glob("*.md")))


def doc_snippet(name: str) -> str:
    """The python block marked `<!-- snippet: NAME (executed by tests/...) -->` in README.md or
    docs/*.md (exactly one); tests/test_docs.py checks that the named test file runs it."""
    found = [text for text in (path.read_text() for path in DOC_FILES) if f"<!-- snippet: {name} " in text]
    assert len(found) == 1, f"snippet {name!r} is in {len(found)} documentation files, not 1"
    return found[0].split(f"<!-- snippet: {name} ", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def run_readme_snippet(name: str, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the documentation's python block marked `<!-- snippet: NAME -->` (README.md or
    docs/*.md) where `cache` is at data/teacher_outputs, as a reader would from the repository
    root; -> its variables."""
    import shutil

    shutil.copytree(cache, tmp_path / "data" / "teacher_outputs")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(doc_snippet(name), scope)
    return scope


def run_in(cmd: list[str], cwd: Path) -> str:
    """Run a command (dvc, git, kd) in `cwd`; its stdout and stderr, or a failed assertion with both."""
    import subprocess

    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


# What a copy of the repository's pipelines needs: the map, its params files and the code it runs.
PIPELINE_FILES = ("dvc.yaml", ".dvcignore", "params_text.yaml", "params_mlm.yaml", "params_images.yaml",
                  "params_gen.yaml")
PIPELINE_FOLDERS = ("kd", "datasets", "models")


def copy_pipelines(dest: Path) -> Path:
    """The repository's pipelines (dvc.yaml, params files, the code and the user folders) copied
    into `dest`, for a `dvc repro` there; tests then write their own tiny params.yaml."""
    import shutil

    if shutil.which("dvc") is None or shutil.which("kd") is None:
        pytest.fail("dvc and kd must be on PATH (pip install -e .)")
    root = Path(__file__).parents[1]
    for name in PIPELINE_FILES:
        shutil.copy(root / name, dest)
    for folder in PIPELINE_FOLDERS:
        shutil.copytree(root / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def dvc_repo(path: Path) -> Path:
    """Make `path` a git repository with DVC initialised, analytics off: where `dvc repro` runs."""
    run_in(["git", "init", "-q"], path)
    run_in(["dvc", "init", "-q"], path)
    run_in(["dvc", "config", "core.analytics", "false"], path)
    return path


LM_BLOCK = 32  # the tokens in a block of `lm_world`


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory) -> Path:
    """A tiny text world: pydoc in LM_LM_BLOCK-token blocks with a 512-token BPE, and a one-layer
    GPT-2 teacher trained one epoch on it (module-scoped: one per test module that asks)."""
    from kd.cli import prepare, teacher

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


# --- your own language models: a Hugging Face tokenizer and tiny models saved as transformers saves them

VOCAB, BLOCK = 384, 32  # the HF world's tokenizer entries and block size
SIZES = ("--block-size", BLOCK, "--labeled", 24, "--unlabeled", 8, "--test", 8)
# model_type -> config fields: 2 layers, 32 wide
TINY = {
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1},
    "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1},
    "gpt_neox": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
}


def pydoc_documents(first: int = 0, count: int = 40) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)][first:first + count]


def hf_tokenizer(vocab_size: int = VOCAB, docs: list[str] | None = None) -> Any:
    """A byte-level BPE trained with `tokenizers`, as transformers wraps it: bos <s>, eos </s>, no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(docs or pydoc_documents(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def save_hf_model(directory: Path, model_type: str, tokenizer: Any, *, seed: int = 0,
                  dtype: Any = None, shard: str | None = "20KB", **fields) -> Path:
    """A random tiny `model_type` causal LM with `tokenizer` beside it, as save_pretrained writes them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(model_type, **{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                                 "eos_token_id": tokenizer.eos_token_id,
                                                 "max_position_embeddings": 64, **TINY[model_type], **fields})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype or torch.float32)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(directory)
    return Path(directory)


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory) -> Path:
    """root/{llama,qwen2,gpt_neox}: sharded teachers; root/prepared-<type>: pydoc cut with each
    teacher's tokenizer; root/params.yaml: empty."""
    from kd.cli import prepare

    root = tmp_path_factory.mktemp("hf")
    (root / "params.yaml").write_text("{}\n")
    tokenizer = hf_tokenizer()
    for model_type in TINY:
        save_hf_model(root / model_type, model_type, tokenizer)
        ok(invoke(prepare.main, "--dataset", "pydoc", "--tokenizer", root / model_type, *SIZES,
                  "--params", root / "params.yaml", "--out", root / f"prepared-{model_type}"))
    return root


def hf_label_args(root: Path, teacher: Path, prepared: Path, out: Path, *extra) -> list:
    return ["--no-progress", "--teacher", teacher, "--prepared", prepared, "--out", out,
            "--params", root / "params.yaml", "--top-k", 8, "--part-size", 16, *extra]
