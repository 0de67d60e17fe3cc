"""Students of any transformers model_type: `arch` with `arch_kwargs`, `init` null, `teacher` or a
local pretrained directory, distilled from the cache of a Hugging Face teacher and loaded back
with `transformers` alone.

The world is `test_hf_teachers`'s (tiny sharded Llama / Qwen2 / GPT-NeoX teachers with a
tokenizer that has no pad token); the Llama and the Qwen2 teacher each label their own
prepared pydoc with `label.keep_teacher`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd import lm
from kd.cache import Cache
from kd.cli import distill, label
from kd.cli import eval as eval_stage
from kd.config import student
from kd.errors import ConfigError
from kd.prepared import tokens
from kd.tasks import lm_common
from tests.helpers import TINY, VOCAB, assert_clean_error, hf_tokenizer, invoke, ok, pydoc_documents, save_hf_model
from tests.helpers import hf_label_args as label_args

BUDGET = {"epochs": 2, "batch_size": 4, "lr": 0.003, "transfer": ["unlabeled"],
          "loss": {"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5, "labels": True}}}
NARROW = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def caches(hf_world) -> dict[str, Path]:
    """model_type -> the cache its teacher labeled (with a copy of the teacher), for llama and qwen2."""
    out = {}
    for model_type in ("llama", "qwen2"):
        out[model_type] = hf_world / f"cache-{model_type}"
        ok(invoke(label.main, *label_args(hf_world, hf_world / model_type, hf_world / f"prepared-{model_type}",
                                          out[model_type], "--keep-teacher")))
    return out


def run_distill(hf_world, tmp_path, caches, name, entry, teacher="llama", expect=0):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {name: {**BUDGET, **entry}}}))
    args = ["--cache", caches[teacher], "--prepared", hf_world / f"prepared-{teacher}", "--params", params,
            "--students-dir", tmp_path / "students", "--baselines", tmp_path / "baselines",
            "--checkpoints", tmp_path / "checkpoints", "--no-progress"]
    result = invoke(distill.main, name, *args)
    if expect == 0:
        ok(result)
        ok(invoke(eval_stage.main, name, *args[:6], "--students-dir", tmp_path / "students"))
    return result


STUDENTS = {  # name -> (teacher, entry)
    "neox": ("llama", {"arch": "gpt_neox", "arch_kwargs": NARROW}),
    "qwen": ("qwen2", {"arch": "qwen2", "arch_kwargs": {**NARROW, "num_key_value_heads": 1}}),
    "llama_half": ("llama", {"arch": "llama", "init": "teacher",
                             "arch_kwargs": {**TINY["llama"], "num_hidden_layers": 1, "max_position_embeddings": 64}}),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(STUDENTS))
def test_a_student_of_any_model_type_distils_and_loads_with_transformers_alone(hf_world, caches, tmp_path, name):
    teacher, entry = STUDENTS[name]
    run_distill(hf_world, tmp_path, caches, name, entry, teacher)
    out = tmp_path / "students" / name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perplexity"] > 1 and metrics["baseline_perplexity"] > 1 and metrics["params"] > 0
    for directory in (out, out / "baseline"):
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        assert model.config.model_type == entry["arch"]
        cached_tokenizer = Cache.open(caches[teacher]).manifest["text"]["tokenizer_sha256"]
        assert tokens.read_tokenizer(directory).fingerprint == cached_tokenizer
        prompt = tokenizer("The class statement", return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert generated.shape[1] == prompt["input_ids"].shape[1] + 6
        assert tokenizer.decode(generated[0]).startswith("The class statement")


@pytest.mark.integration
def test_a_student_starts_from_a_pretrained_directory(hf_world, caches, tmp_path):
    pretrained = save_hf_model(tmp_path / "pretrained", "llama", hf_tokenizer(), seed=7, **NARROW)
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"pre": {**BUDGET, "arch": "llama", "init": str(pretrained)}}}))
    cfg = student(params, "pre")
    torch.manual_seed(0)
    start = lm_common.build_model(cfg, Cache.open(caches["llama"]), hf_world / "prepared-llama", "causal")
    reference = lm.load(pretrained)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), reference.state_dict().values()))
    run_distill(hf_world, tmp_path, caches, "pre", {"arch": "llama", "init": str(pretrained)})
    out = tmp_path / "students" / "pre"
    trained = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert trained.config.hidden_size == 16 and trained.num_parameters() == reference.num_parameters()
    assert not torch.equal(trained.lm_head.weight, reference.lm_head.weight)  # it trained
    # its twin started from the same directory: same shapes, other weights than the student's
    twin = AutoModelForCausalLM.from_pretrained(out / "baseline", local_files_only=True)
    assert twin.num_parameters() == reference.num_parameters()


@pytest.mark.unit
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt_neox", "gpt2", "bert"])
def test_init_from_teacher_takes_one_layer_in_every_n(model_type):
    special = tokens.SpecialIds(pad=0, eos=1, mask=2)
    kwargs = ({"n_embd": 16, "n_head": 2} if model_type == "gpt2"
              else {**NARROW, **({"num_key_value_heads": 1} if model_type in ("llama", "qwen2") else {})})
    depth = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    objective = "masked" if model_type == "bert" else "causal"
    torch.manual_seed(0)
    teacher = lm.build(model_type, {**kwargs, depth: 4}, 64, 16, special, objective=objective)
    student_model = lm.build(model_type, {**kwargs, depth: 2}, 64, 16, special, objective=objective)
    assert lm.init_from_teacher(student_model, teacher) == [0, 2]
    stack = lm.layer_stack(teacher)
    layers = dict(teacher.named_modules())[stack], dict(student_model.named_modules())[stack]
    for s, t in ((0, 0), (1, 2)):
        for (name, a), (_, b) in zip(layers[1][s].named_parameters(), layers[0][t].named_parameters()):
            assert torch.equal(a, b), name
    embedding = teacher.get_input_embeddings().weight
    assert torch.equal(student_model.get_input_embeddings().weight, embedding)
    wide = lm.build(model_type, {**kwargs, depth: 2, ("n_embd" if model_type == "gpt2" else "hidden_size"): 32},
                    64, 16, special, objective=objective)
    with pytest.raises(ConfigError, match="hidden_size is 32, the teacher's 16"):
        lm.init_from_teacher(wide, teacher)


@pytest.mark.integration
def test_students_refuse_what_does_not_fit_in_one_line(hf_world, caches, tmp_path):
    other = save_hf_model(tmp_path / "other", "llama", hf_tokenizer(VOCAB, pydoc_documents(40, 40)), **NARROW)
    same = save_hf_model(tmp_path / "same", "llama", hf_tokenizer(), **NARROW)
    cases = {
        "nope": ({"arch": "nope"}, ["text_students.nope.arch", "'nope'", "not a transformers model_type"]),
        "field": ({"arch": "llama", "arch_kwargs": {"n_layer": 1}}, ["arch_kwargs.n_layer", "not a LlamaConfig field"]),
        "head": ({"arch": "distilbert"}, ["'distilbert'", "without a causal LM head", "must be gpt2, llama"]),
        "other": ({"arch": "llama", "init": str(other)},
                  ["init", str(other), "another tokenizer", str(caches["llama"])]),
        "kind": ({"arch": "qwen2", "init": str(same)}, ["arch", "'qwen2'", "holds a 'llama'"]),
        "sized": ({"arch": "llama", "init": str(same), "arch_kwargs": {"hidden_size": 8}},
                  ["arch_kwargs", "leave it empty"]),
        "missing": ({"arch": "llama", "init": str(tmp_path / "nowhere")}, ["init", "nowhere", "not found"]),
        # transformers 5 reads this tokenizer in a qwen2 directory as Qwen2Tokenizer: another tokenizer
        "qwen": ({"arch": "qwen2", "arch_kwargs": {**NARROW, "num_key_value_heads": 1}},
                 ["arch", "Qwen2Tokenizer", "another tokenizer", "llama keeps it"]),
    }
    for name, (entry, needles) in cases.items():
        result = run_distill(hf_world, tmp_path, caches, name, entry, expect=1)
        assert_clean_error(result, *needles)
        assert not (tmp_path / "students" / name).exists()
    bare = tmp_path / "bare"  # no copy of the teacher
    ok(invoke(label.main, *label_args(hf_world, hf_world / "llama", hf_world / "prepared-llama", bare)))
    result = run_distill(hf_world, tmp_path, {"llama": bare}, "half", STUDENTS["llama_half"][1], expect=1)
    assert_clean_error(result, "init", "label.keep_teacher: true")


@pytest.mark.integration
def test_a_sharded_teacher_is_kept_whole_for_init_teacher(hf_world, caches):
    cache = Cache.open(caches["llama"])
    kept = sorted(Path(rel).name for rel in cache.manifest["teacher_files"])
    assert lm.WEIGHTS_INDEX in kept and "config.json" in kept and sum(".safetensors" in k for k in kept) > 3
    start = lm_common.teacher_start(cache)
    reference = lm.load(hf_world / "llama")
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), reference.state_dict().values()))
