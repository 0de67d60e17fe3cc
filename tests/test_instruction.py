"""Instruction and chat data: only response tokens are predicted, cached, distilled and scored.

A tiny Llama saved with save_pretrained (its own tokenizer, no pad token, sharded weights)
labels prompt/response pairs from a .jsonl prepared with `prepare.tokenizer` pointing at it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd import config, lm, loader
from kd.cache import Cache
from kd.cli import distill, label, prepare
from kd.cli import eval as evaluate
from kd.prepared import tokens
from kd.tasks import causal_lm
from tests.helpers import (
    TEMPLATES,
    assert_streams_like_in_memory,
    chat_tokenizer_dir,
    hf_label_args,
    hf_tokenizer,
    invoke,
    invoke_cache,
    ok,
    pairs,
    save_hf_model,
    write_jsonl,
)

pytestmark = pytest.mark.integration

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
BLOCK = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """root/llama (sharded, no pad, a chat template), root/pairs.jsonl, root/prepared (the pairs
    cut with the Llama's tokenizer), root/cache (the Llama's top-8 over the response tokens)."""
    root = tmp_path_factory.mktemp("instruct")
    (root / "params.yaml").write_text("{}\n")
    tokenizer = hf_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    save_hf_model(root / "llama", "llama", tokenizer)
    write_jsonl(root / "pairs.jsonl", pairs(120))
    ok(invoke(prepare.main, "--dataset", root / "pairs.jsonl", "--prompt-column", "prompt", "--response-column",
              "response", "--tokenizer", root / "llama", "--block-size", BLOCK, "--labeled", 40, "--unlabeled", 24,
              "--test", 12, "--params", root / "params.yaml", "--out", root / "prepared"))
    ok(invoke(label.main, *hf_label_args(root, root / "llama", root / "prepared", root / "cache",
                                         "--part-size", 10)))
    return root


def test_prepare_marks_the_response_and_eos_only(world):
    tokenizer = AutoTokenizer.from_pretrained(world / "llama")
    ids, blocks = tokens.read_blocks(world / "prepared" / "test.parquet")
    predicted = tokens.predicted(world / "prepared" / "test.parquet")
    assert predicted.shape == (12, BLOCK - 1)
    assert tokens.split_info(world / "prepared" / "test.parquet")["response_only"]
    for block, keep in zip(blocks, predicted):
        targets = block[1:][keep]
        assert targets[-1] == tokenizer.eos_token_id
        response = tokenizer.decode(targets[:-1])
        assert response.startswith("The sum is ") and response.endswith(".")
        first = int(np.flatnonzero(keep)[0]) + 1  # the first response token
        assert block[0] == tokenizer.bos_token_id and tokenizer.decode(block[1:first]).startswith("Add ")
        end = first + len(targets)
        assert (block[end:] == tokenizer.eos_token_id).all()  # no pad token: padded with eos, never predicted
        assert keep[first - 1:end - 1].all() and not keep[:first - 1].any() and not keep[end - 1:].any()


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_an_assistant_turn_is_its_content_and_end_of_turn_token_and_nothing_after(tmp_path, template):
    tokenizer_dir, end = chat_tokenizer_dir(tmp_path / "tok", template)
    chats = [{"messages": [{"role": "user", "content": f"Double {n}?"}, {"role": "assistant", "content": str(2 * n)},
                           {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]}
             for n in range(30)]
    chats += [{"messages": [{"role": "user", "content": "Anyone?"}]}, {"messages": None}]  # no assistant turn
    write_jsonl(tmp_path / "chat.jsonl", chats)
    (tmp_path / "params.yaml").write_text("{}\n")  # text sizes left out: every block
    result = ok(invoke(prepare.main, "--dataset", tmp_path / "chat.jsonl", "--messages-column", "messages",
                       "--tokenizer", tokenizer_dir, "--block-size", 64, "--params", tmp_path / "params.yaml",
                       "--out", tmp_path / "out"))
    assert "dropped   2 no assistant turn (before dealing)" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    end_id = tokenizer.convert_tokens_to_ids(end)
    for split in ("labeled", "unlabeled", "test"):
        assert tokens.split_info(tmp_path / "out" / f"{split}.parquet")["examples_dropped"] == {"no_assistant_turn": 2}
        _, blocks = tokens.read_blocks(tmp_path / "out" / f"{split}.parquet")
        predicted = tokens.predicted(tmp_path / "out" / f"{split}.parquet")
        for block, keep in zip(blocks, predicted):
            targets = block[1:]
            turns = tokenizer.decode(targets[keep]).split(end)
            assert turns[1:] == ["Welcome.", ""] and int(turns[0]) % 2 == 0, turns
            after_end = np.flatnonzero(targets == end_id) + 1  # the positions right after an end of turn
            assert not keep[after_end[after_end < len(keep)]].any()  # never taught what follows end-of-turn


def test_examples_left_without_a_response_token_are_counted_per_split(world, tmp_path):
    rows = pairs(30) + [{"prompt": "x " * 40, "response": "too late"}] * 3 + [{"prompt": "Hi", "response": " "}]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    (tmp_path / "params.yaml").write_text("prepare: {labeled: null, unlabeled: null, test: null}\n")  # all
    result = ok(invoke(prepare.main, "--dataset", tmp_path / "pairs.jsonl", "--prompt-column", "prompt",
                       "--response-column", "response", "--tokenizer", world / "llama", "--block-size", BLOCK,
                       "--params", tmp_path / "params.yaml", "--out", tmp_path / "out"))
    counts = {split: tokens.split_info(tmp_path / "out" / f"{split}.parquet")["examples_dropped"]
              for split in ("labeled", "unlabeled", "test")}
    assert all(c["empty_response"] == 1 for c in counts.values())
    assert sum(c.get("no_response_token", 0) for c in counts.values()) == 3
    assert "dropped   1 empty response (before dealing)" in result.stdout


def test_a_chat_predicts_its_assistant_turns(world, tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"Double {n}?"}, {"role": "assistant", "content": str(2 * n)},
                           {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]}
             for n in range(40)]
    write_jsonl(tmp_path / "chat.jsonl", chats)
    ok(invoke(prepare.main, "--dataset", tmp_path / "chat.jsonl", "--messages-column", "messages", "--tokenizer",
              world / "llama", "--block-size", 64, "--labeled", 20, "--unlabeled", 4, "--test", 4,
              "--params", world / "params.yaml", "--out", tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    _, blocks = tokens.read_blocks(tmp_path / "out" / "labeled.parquet")
    predicted = tokens.predicted(tmp_path / "out" / "labeled.parquet")
    for block, keep in zip(blocks, predicted):
        said = tokenizer.decode(block[1:][keep])
        number = said.split(tokenizer.eos_token)[0]
        assert said == f"{number}{tokenizer.eos_token}Welcome.{tokenizer.eos_token}" and int(number) % 2 == 0
        assert "Double" not in said and "Thanks" not in said and "<|assistant|>" not in said


def test_chats_need_a_chat_template_and_columns_are_named(world, tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}] * 4)
    result = invoke(prepare.main, "--dataset", tmp_path / "chat.jsonl", "--messages-column", "messages",
                    "--params", world / "params.yaml", "--out", tmp_path / "out", expect=1)
    assert "chat template" in result.output and not (tmp_path / "out").exists()
    result = invoke(prepare.main, "--dataset", world / "pairs.jsonl", "--prompt-column", "question",
                    "--response-column", "response", "--params", world / "params.yaml", "--out", tmp_path / "out",
                    expect=1)
    assert "'question'" in result.output and "'prompt', 'response'" in result.output
    pq.write_table(pa.table({"prompt": ["a"], "answer": ["b"]}), tmp_path / "pairs.parquet")
    result = invoke(prepare.main, "--dataset", tmp_path / "pairs.parquet", "--prompt-column", "prompt",
                    "--response-column", "response", "--params", world / "params.yaml", "--out", tmp_path / "out",
                    expect=1)
    assert "no column 'response'" in result.output and "'prompt', 'answer'" in result.output
    result = invoke(prepare.main, "--dataset", world / "pairs.jsonl", "--prompt-column", "prompt",
                    "--params", world / "params.yaml", "--out", tmp_path / "out", expect=1)
    assert "prepare.response_column" in result.output


def test_the_cache_holds_the_teachers_rows_of_response_tokens_only(world):
    cache = Cache.open(world / "cache")
    assert cache.views is None and cache.manifest["text"]["response_only"]
    ok(invoke_cache("verify", world / "cache"))
    teacher = AutoModelForCausalLM.from_pretrained(world / "llama").eval()
    for split in ("labeled", "unlabeled", "test"):
        source = world / "prepared" / f"{split}.parquet"
        ids, blocks = tokens.read_blocks(source)
        predicted = tokens.predicted(source)
        soft = cache.soft_targets(split, [1.0])
        assert cache.split(split)["rows"] == len(soft.ids) == predicted.sum()
        assert np.array_equal(soft.ids, np.repeat(ids, predicted.sum(1)))
        position = pq.read_table(world / "cache" / "soft_targets" / f"split={split}", columns=["position"])
        assert np.array_equal(position["position"].to_numpy(), np.nonzero(predicted)[1])
    with torch.no_grad():
        logits = teacher(input_ids=torch.from_numpy(blocks)).logits[:, :-1][torch.from_numpy(predicted)]
    assert np.array_equal(soft.topk_idx[:, 0], logits.argmax(1).numpy())
    top = logits.topk(8).values
    np.testing.assert_allclose(soft.topk_logit, (top - top[:, :1]).numpy(), atol=2e-3)
    assert "response tokens only" in ok(invoke_cache("info", world / "cache")).output


def test_rows_per_sample_follow_the_counts_in_memory_and_streamed(world):
    cache = Cache.open(world / "cache")
    params = world / "students.yaml"
    params.write_text(json.dumps({"students": {"s": {"arch": "llama", "arch_kwargs": {
        "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64}, "transfer": ["labeled", "unlabeled"], "loss": {"soft": {"weight": 1.0}}}}}))
    cfg = config.student(params, "s")
    in_memory = causal_lm.rows(cache, world / "prepared", cfg, memory_mb=1e6)
    streamed = causal_lm.rows(cache, world / "prepared", cfg, memory_mb=0.001)
    assert isinstance(in_memory, loader.SampleSet) and isinstance(streamed, loader.StreamingSet)
    assert_streams_like_in_memory(in_memory, streamed, views="none", batch_size=5)
    # every batch's rows are its samples' response rows, in cache order
    model = causal_lm.TokenRows(lm.load(world / "llama"))
    for batch in in_memory.batches(0, 7, seed=0):
        assert len(model(batch["x"])) == len(batch["row"]) == int(batch["x"][:, 1].sum())


def test_students_distil_and_score_on_response_tokens(world, tmp_path):
    """A student built from a config and one started from a pretrained directory train from the
    cache; eval scores the student, its twin and the teacher on the test responses alone."""
    (tmp_path / "params.yaml").write_text(json.dumps({"students": {
        "small": {"arch": "llama", "arch_kwargs": {"num_hidden_layers": 1, "hidden_size": 32,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64},
                  "epochs": 2, "batch_size": 8, "transfer": ["unlabeled"],
                  "loss": {"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5, "labels": True}}},
        "pretrained": {"arch": "llama", "init": str(world / "llama"), "epochs": 1, "batch_size": 8,
                       "transfer": ["unlabeled"], "loss": {"soft": {"weight": 1.0, "temperature": 1}}}}}))
    common = ["--params", tmp_path / "params.yaml", "--cache", world / "cache", "--prepared", world / "prepared",
              "--students-dir", tmp_path / "students"]
    predicted = tokens.predicted(world / "prepared" / "test.parquet")
    _, blocks = tokens.read_blocks(world / "prepared" / "test.parquet")
    truth = torch.from_numpy(blocks[:, 1:][predicted]).long()

    def perplexity(directory: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(blocks)).logits[:, :-1][torch.from_numpy(predicted)]
        return float(torch.nn.functional.cross_entropy(logits, truth).exp())

    for name in ("small", "pretrained"):
        ok(invoke(distill.main, name, *common, "--baselines", tmp_path / "baselines",
                  "--checkpoints", tmp_path / "ck", "--no-progress"))
        ok(invoke(evaluate.main, name, *common))
        metrics = json.loads((tmp_path / "students" / name / "metrics.json").read_text())
        assert metrics["test_tokens"] == predicted.sum()
        assert metrics["perplexity"] == pytest.approx(perplexity(tmp_path / "students" / name), rel=1e-4)
        assert metrics["baseline_perplexity"] == pytest.approx(perplexity(tmp_path / "students" / name / "baseline"),
                                                               rel=1e-4)
        # the user's own teacher has no kd metrics.json: kd label measured it on the test responses
        assert metrics["teacher_perplexity"] == pytest.approx(perplexity(world / "llama"), rel=1e-4)
        student = AutoModelForCausalLM.from_pretrained(tmp_path / "students" / name)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "students" / name)
        assert tokenizer.decode(student.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=3,
                                                 do_sample=False)[0]) is not None


def test_a_masked_lm_refuses_instruction_data(world, tmp_path):
    from transformers import AutoConfig, AutoModelForMaskedLM
    tokenizer = AutoTokenizer.from_pretrained(world / "llama")
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    AutoModelForMaskedLM.from_config(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    result = invoke(label.main, *hf_label_args(world, tmp_path / "bert", world / "prepared", tmp_path / "cache"),
                    expect=1)
    assert "causal" in result.output and not (tmp_path / "cache" / "manifest.json").exists()
