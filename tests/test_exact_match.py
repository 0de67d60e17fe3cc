"""Exact match per assistant turn: each turn of a chat is its own prompt and truth.

A turn's truth is its content and its end-of-turn token, never the template's newline after it;
generation stops at that token (or eos). `kd label` measures the teacher's exact match on the
test turns (`teacher_scores` in the manifest) and `kd eval` reports it beside the students'.
Checked against transformers' own `generate` with the end-of-turn token as an eos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.cache import Cache
from kd.cli import distill, label, prepare, teacher
from kd.cli import eval as evaluate
from kd.prepared import tokens
from tests.helpers import chat_tokenizer_dir, hf_label_args, invoke, ok, write_jsonl

BLOCK = 64
TINY_LLAMA = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 64}


def chats(count: int) -> list[dict]:
    """Two-turn chats with deterministic answers a tiny teacher can learn: "Double n?" for a few
    n, then "Thanks" -> "Welcome."."""
    return [{"messages": [{"role": "user", "content": f"Double {n}?"}, {"role": "assistant", "content": str(2 * n)},
                          {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]}
            for n in (i % 5 + 1 for i in range(count))]


@pytest.mark.unit
def test_the_turns_of_a_hand_built_chat_block(tmp_path):
    """Two ChatML turns in one block: each turn's prompt is the block before it, its truth its
    content and <|im_end|> (not the template's newline after it), its stop token <|im_end|>. The
    same chat cut two tokens into its second turn (the block's end): that turn has no stop token
    of its own (the block's end stops it)."""
    tokenizer_dir, end = chat_tokenizer_dir(tmp_path / "tok", "chatml")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encode = (lambda text: tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    pieces = [("<|im_start|>user\nDouble 3?<|im_end|>\n<|im_start|>assistant\n", False), ("6<|im_end|>", True),
              ("\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n", False),
              ("Welcome.<|im_end|>", True), ("\n", False)]
    ids = [encode(text) for text, _ in pieces]
    flat = sum(ids, [])
    mask = sum(([said] * len(piece) for piece, (_, said) in zip(ids, pieces)), [])
    eos, end_id, newline = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end), encode("\n")
    assert len(newline) == 1 and ids[2][0] == newline[0]  # the template's newline after a turn: a token of its own
    block = np.array([flat + [eos] * 3], np.int32)  # padded with eos, never predicted
    meta = {"modality": "text"}
    tokens.write_blocks(tmp_path / "test.parquet", np.array([7]), block, meta, np.array([mask + [False] * 3]))

    first, second = tokens.turns(tmp_path / "test.parquet")
    assert (first.block, first.index, second.block, second.index) == (0, 0, 0, 1)
    assert first.prompt == ids[0] and first.truth == encode("6") + [end_id] == ids[1] and first.stop == end_id
    assert second.prompt == ids[0] + ids[1] + ids[2] and second.truth == encode("Welcome.") + [end_id] == ids[3]
    assert second.stop == end_id
    assert [tokenizer.decode(t.truth) for t in (first, second)] == ["6<|im_end|>", "Welcome.<|im_end|>"]
    assert newline[0] not in first.truth + second.truth

    cut = len(ids[0]) + len(ids[1]) + len(ids[2]) + 2
    tokens.write_blocks(tmp_path / "cut.parquet", np.array([7]), block[:, :cut], meta, np.array([mask[:cut]]))
    first_cut, second_cut = tokens.turns(tmp_path / "cut.parquet")
    assert first_cut == first and second_cut.prompt == second.prompt
    assert second_cut.truth == ids[3][:2] and second_cut.stop is None


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def chat_world(request, tmp_path_factory) -> tuple[Path, str]:
    """root/prepared (60 two-turn chats cut with a tokenizer of the template), root/teacher (a
    tiny Llama that `kd teacher` trained on them), root/cache (`kd label`), root/students/s (a
    tiny student, distilled and evaluated); and the template's end-of-turn token."""
    root = tmp_path_factory.mktemp(f"exact-{request.param}")
    (root / "params.yaml").write_text(json.dumps({"students": {"s": {
        "arch": "llama", "arch_kwargs": TINY_LLAMA, "epochs": 1, "batch_size": 8, "transfer": ["labeled"],
        "loss": {"soft": {"weight": 1.0, "temperature": 1}}}}}))
    tokenizer_dir, end = chat_tokenizer_dir(root / "tok", request.param)
    write_jsonl(root / "chat.jsonl", chats(120))
    ok(invoke(prepare.main, "--dataset", root / "chat.jsonl", "--messages-column", "messages", "--tokenizer",
              tokenizer_dir, "--block-size", BLOCK, "--labeled", 60, "--unlabeled", 4, "--test", 12,
              "--params", root / "params.yaml", "--out", root / "prepared"))
    ok(invoke(teacher.main, "--arch", "llama", "--arch-kwargs", json.dumps(TINY_LLAMA), "--epochs", 10,
              "--batch-size", 8, "--lr", 1e-2, "--no-progress", "--prepared", root / "prepared",
              "--out", root / "teacher", "--params", root / "params.yaml"))
    ok(invoke(label.main, *hf_label_args(root, root / "teacher", root / "prepared", root / "cache")))
    common = ["--params", root / "params.yaml", "--cache", root / "cache", "--prepared", root / "prepared",
              "--students-dir", root / "students"]
    ok(invoke(distill.main, "s", *common, "--baselines", root / "baselines", "--checkpoints", root / "ck",
              "--no-progress"))
    ok(invoke(evaluate.main, "s", *common))
    return root, end


def transformers_exact_match(directory: Path, source: Path, end: str) -> tuple[float, float]:
    """(all turns, first turns): each test turn's prompt answered by transformers' greedy
    `generate`, stopping at the end-of-turn token or eos, against the turn's tokens up to and
    including its end-of-turn token."""
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    end_id, eos = tokenizer.convert_tokens_to_ids(end), tokenizer.eos_token_id
    _, blocks = tokens.read_blocks(source)
    mask = tokens.predicted(source)
    hits, first_hits = [], []
    for block, keep in zip(blocks.tolist(), mask.tolist()):
        starts = [t for t in range(len(keep)) if keep[t] and (t == 0 or not keep[t - 1])]
        for index, start in enumerate(starts):
            targets = block[start + 1:]
            truth = targets[:targets.index(end_id) + 1]  # every turn of these chats ends inside the block
            prompt = torch.tensor([block[:start + 1]])
            with torch.no_grad():
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=len(block) - prompt.shape[1], eos_token_id=[end_id, eos],
                                     pad_token_id=eos)
            hits.append(out[0, prompt.shape[1]:].tolist() == truth)
            if index == 0:
                first_hits.append(hits[-1])
    return float(np.mean(hits)), float(np.mean(first_hits))


@pytest.mark.integration
def test_the_teacher_s_first_turn_exact_match_is_transformers_own(chat_world):
    root, end = chat_world
    metrics = json.loads((root / "students" / "s" / "metrics.json").read_text())
    scores = Cache.open(root / "cache").manifest["teacher_scores"]
    every, first = transformers_exact_match(root / "teacher", root / "prepared" / "test.parquet", end)
    print(f"{end}: teacher exact match kd {scores} vs transformers all {every:.4f}, first {first:.4f}")
    assert metrics["teacher_exact_match_first_turn"] == scores["exact_match_first_turn"] == pytest.approx(first)
    assert metrics["teacher_exact_match"] == scores["exact_match"] == pytest.approx(every)
    student_every, student_first = transformers_exact_match(root / "students" / "s",
                                                            root / "prepared" / "test.parquet", end)
    assert metrics["exact_match"] == pytest.approx(student_every)
    assert metrics["exact_match_first_turn"] == pytest.approx(student_first)
    assert {"exact_match_first_turn_mean", "baseline_exact_match_first_turn_std",
            "exact_match_first_turn_gain_points_mean", "baseline_exact_match_first_turn"} <= set(metrics)
