"""What more than one test module uses, as plain functions and constants (fixtures live in conftest.py).

- Running commands: `invoke` (one stage command through typer's CliRunner), `invoke_cache`,
  `ok`, `assert_clean_error` (the one-line error contract), `torchrun`, `run_in`.
- Copies of the repository's pipelines for `dvc repro`: `copy_pipelines`, `dvc_repo`.
- Tiny worlds' ingredients: the `lm_world` text world's `LM_BLOCK` and `label_args`; the Hugging
  Face world's tokenizer and models (`hf_tokenizer`, `save_hf_model`, `TINY`, ...); students
  (`tiny_student` for images, `text_student` for text); instruction pairs.
- Comparisons: `assert_streams_like_in_memory`, `digest`, `files_bytes`, `max_difference`,
  `log_difference`, and `both_ways` (one process vs a 2-process torchrun).

Imported as `from tests.helpers import ...` (pytest puts the repository root on sys.path:
`pythonpath = ["."]` in pyproject.toml).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).parents[1]  # the repository

# --- running commands ----------------------------------------------------------------------------


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
    """The result of a command that must have succeeded (its output and exception shown if not)."""
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def assert_clean_error(result: Any, *needles: str) -> str:
    """A domain error at the CLI boundary: exit code 1 through SystemExit (not an uncaught
    exception), no traceback anywhere, exactly one line on stderr, starting `error: ` and
    holding every needle. -> that line."""
    assert result.exit_code == 1, (result.output, result.stderr)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def torchrun(nproc: int, *args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N --standalone --no-python kd ARGS` from this Python (a free
    port of its own), one thread per process."""
    kd = Path(sys.executable).with_name("kd")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               "--no-python", str(kd) if kd.is_file() else "kd", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def run_in(cmd: list[str], cwd: Path) -> str:
    """Run a command (dvc, git, kd) in `cwd`; its stdout and stderr, or a failed assertion with both."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


DOC_FILES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "examples").glob("*/README.md")))


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
    shutil.copytree(cache, tmp_path / "data" / "teacher_outputs")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(doc_snippet(name), scope)
    return scope


# --- copies of the repository's pipelines, for `dvc repro` ---------------------------------------

def copy_pipelines(dest: Path) -> Path:
    """The repository's examples (each one's dvc.yaml and params files) and the package they
    depend on (../../kd) copied into `dest`, for a `dvc repro` there; tests then write their own
    tiny params.yaml."""
    if shutil.which("dvc") is None or shutil.which("kd") is None:
        pytest.fail("dvc and kd must be on PATH (pip install -e .)")
    shutil.copy(ROOT / ".dvcignore", dest)
    for example in (ROOT / "examples").glob("*/dvc.yaml"):
        (dest / "examples" / example.parent.name).mkdir(parents=True)
        for file in example.parent.glob("*.yaml"):
            shutil.copy(file, dest / "examples" / example.parent.name)
    shutil.copytree(ROOT / "kd", dest / "kd", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def dvc_repo(path: Path) -> Path:
    """Make `path` a git repository with DVC initialised, analytics off: where `dvc repro` runs."""
    run_in(["git", "init", "-q"], path)
    run_in(["dvc", "init", "-q"], path)
    run_in(["dvc", "config", "core.analytics", "false"], path)
    return path


# --- the `lm_world` text world (conftest.py): pydoc, a 512-token BPE, a one-layer GPT-2 teacher ---

LM_BLOCK = 32  # the tokens in a block of `lm_world`


def label_args(root: Path, out: Path, *extra: Any, part_size: int | None = 16) -> list:
    """`kd label` options for the teacher and prepared data of the world at `root` (its
    teacher/, prepared/ and params.yaml), `part_size` samples per part (None: the option left out)."""
    parts = ["--part-size", part_size] if part_size is not None else []
    return ["--no-progress", "--teacher", root / "teacher", "--prepared", root / "prepared", "--out", out,
            "--params", root / "params.yaml", *parts, *extra]


def text_student(**loss: Any) -> dict[str, Any]:
    """A one-layer GPT-2 student entry (`text_students`), one epoch; Hinton soft targets at T=4
    plus the true next tokens unless `loss` is given."""
    return {"arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "epochs": 1,
            "batch_size": 16, "lr": 0.003, "loss": loss or {"soft": {"weight": 0.5, "temperature": 4},
                                                            "hard": {"weight": 0.5, "labels": True}}}


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
    """CPython's pydoc topics, in name order: text that is on every machine."""
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


def hf_label_args(root: Path, teacher: Path, prepared: Path, out: Path, *extra) -> list:
    """`kd label` options for a Hugging Face teacher directory: top-8, 16 samples per part."""
    return ["--no-progress", "--teacher", teacher, "--prepared", prepared, "--out", out,
            "--params", root / "params.yaml", "--top-k", 8, "--part-size", 16, *extra]


def pairs(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/response pairs: `Add a and b: ` -> `The sum is a+b.`"""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"Add {a} and {b}: ", "response": f"The sum is {a + b}."})
    return rows


# Chat templates as their models ship them (their special tokens included), for chat data tests.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
          " + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# ChatML with the marks `return_assistant_tokens_mask` reads: content and <|im_end|>, not the newline
CHATML_MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
                 "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
                 "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEMPLATES = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
             "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
             "chatml_marked": (CHATML_MARKED, ["<|im_start|>", "<|im_end|>"], "<|im_end|>")}


def chat_tokenizer_dir(path: Path, template: str) -> tuple[Path, str]:
    """A tokenizer directory with `template` and its special tokens (as the model's authors ship
    them, not added by kd), and the template's end-of-turn token."""
    source, specials, end = TEMPLATES[template]
    tokenizer = hf_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = source
    tokenizer.save_pretrained(path)
    return path, end


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- image students ------------------------------------------------------------------------------


def tiny_student(**changes: Any) -> dict[str, Any]:
    """A 64-16-10 MLP student on Hinton soft targets at T=4 plus true labels, one epoch."""
    student = {
        "arch": "mlp", "arch_kwargs": {"hidden": [16]}, "epochs": 1, "batch_size": 64, "lr": 0.002, "seed": 0,
        "loss": {"soft": {"weight": 0.9, "temperature": 4, "tail": "bucket"},
                 "hard": {"weight": 0.1, "labels": True}},
    }
    student.update(changes)
    return student


def students_params(path: Path, **students: dict[str, Any]) -> Path:
    """A params.yaml at `path` holding these `students` entries alone."""
    path.write_text(yaml.safe_dump({"students": students}, sort_keys=False))
    return path


# --- comparisons ---------------------------------------------------------------------------------


def files_bytes(directory: Path) -> dict[str, bytes]:
    """file name -> bytes of the files right in `directory`."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file; training logs without their wall-clock `seconds` column."""
    return {str(p.relative_to(root)): hashlib.sha256(_content(p)).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _content(path: Path) -> bytes:
    if path.name != "train_log.csv":
        return path.read_bytes()
    rows = list(csv.reader(path.read_text().splitlines()))
    keep = [i for i, name in enumerate(rows[0]) if name != "seconds"]
    return "\n".join(",".join(row[i] for i in keep) for row in rows).encode()


# `python -c KILL_DISTILL AFTER ARGS...`: `kd distill ARGS` that SIGKILLs itself after its AFTER-th checkpoint.
KILL_DISTILL = textwrap.dedent("""
    import os, signal, sys
    import kd.training as training
    from kd.cli import app

    after, args = int(sys.argv[1]), sys.argv[2:]
    original, calls = training._save, [0]
    def save_then_maybe_die(*a, **k):
        original(*a, **k)
        calls[0] += 1
        if calls[0] >= after:
            os.kill(os.getpid(), signal.SIGKILL)
    training._save = save_then_maybe_die
    app(["distill", *args])
""")


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


# --- one process vs data-parallel under torchrun -------------------------------------------------

TOLERANCE = 1e-5  # max |weight difference|, and of every logged term, vs a single process


def distill_args(built: dict[str, Path], out: Path) -> list[Any]:
    """`kd distill` options for the cache, prepared data and params of `built`, writing under `out`."""
    return ["--no-progress", "--cache", built["cache"], "--prepared", built["prepared"], "--students-dir",
            out / "students", "--baselines", out / "baselines", "--checkpoints", out / "checkpoints",
            "--params", built["params"]]


def max_difference(a: Path, b: Path) -> float:
    """Max |difference| over every tensor of two safetensors files with the same keys."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def log_difference(a: Path, b: Path) -> float:
    """Max |difference| of two training logs, term by term (wall-clock `seconds` aside)."""
    with open(a, newline="") as fa, open(b, newline="") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert len(ra) == len(rb) and ra[0].keys() == rb[0].keys()
    return max(abs(float(x[k]) - float(y[k])) for x, y in zip(ra, rb, strict=True) for k in x if k != "seconds")


def both_ways(built: dict[str, Path], tmp_path: Path, name: str, *options: Any) -> tuple[Path, Path, str]:
    """`kd distill NAME` in this process and under a 2-process torchrun: (single, parallel, stdout)."""
    from kd.cli import distill

    single, parallel_out = tmp_path / "single", tmp_path / "parallel"
    ok(invoke(distill.main, name, *options, *distill_args(built, single)))
    result = torchrun(2, "distill", name, *options, *distill_args(built, parallel_out))
    assert result.returncode == 0, result.stderr[-3000:]
    return single / "students" / name, parallel_out / "students" / name, result.stdout
