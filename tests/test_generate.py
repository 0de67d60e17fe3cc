"""`kd generate`: a teacher answers the prompts of a prepared instruction split.

A tiny random Llama (saved with save_pretrained, sharded, no pad token) answers prompt/response
pairs cut with its tokenizer; `kd label` then caches its soft targets over the responses.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kd import generate
from kd.cache import Cache
from kd.cli import generate as generate_stage
from kd.cli import label, prepare
from kd.config import GenerateConfig
from kd.errors import ConfigError
from kd.prepared import tokens
from tests.helpers import (
    TINY,
    assert_clean_error,
    digest,
    hf_label_args,
    hf_tokenizer,
    invoke,
    invoke_cache,
    ok,
    pairs,
    pydoc_documents,
    save_hf_model,
    write_jsonl,
)

BLOCK = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """root/llama (random, sharded, no pad), root/prepared (pairs cut with its tokenizer), and
    root/gen: the Llama's greedy answers to the unlabeled prompts, 5 prompts per part."""
    root = tmp_path_factory.mktemp("generate")
    (root / "params.yaml").write_text("{}\n")
    save_hf_model(root / "llama", "llama", hf_tokenizer())
    write_jsonl(root / "pairs.jsonl", pairs(120))
    ok(invoke(prepare.main, "--dataset", root / "pairs.jsonl", "--prompt-column", "prompt", "--response-column",
              "response", "--tokenizer", root / "llama", "--block-size", BLOCK, "--labeled", 40, "--unlabeled", 24,
              "--test", 12, "--params", root / "params.yaml", "--out", root / "prepared"))
    ok(invoke(generate_stage.main, *gen_args(root, root / "gen")))
    return root


def gen_args(root: Path, out: Path, *extra) -> list:
    return ["--no-progress", "--teacher", root / "llama", "--prepared", root / "prepared", "--out", out,
            "--params", root / "params.yaml", "--max-new-tokens", 10, "--batch-size", 4, "--part-size", 5, *extra]


def naive_answer(model, prompt: list[int], limit: int, eos: int) -> list[int]:
    """One prompt alone, the whole prefix run again for every token."""
    tokens = list(prompt)
    with torch.no_grad():
        while len(tokens) - len(prompt) < limit:
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
            if tokens[-1] == eos:
                break
    return tokens[len(prompt):]


@pytest.mark.unit
@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "gpt2"])
def test_batched_kv_cache_greedy_equals_one_prompt_at_a_time_and_transformers_generate(model_type):
    tokenizer = hf_tokenizer()
    fields = ({"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64} if model_type == "gpt2"
              else {**TINY[model_type], "max_position_embeddings": 64})
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, len(tokenizer), n).tolist() for n in (3, 9, 5, 12, 1)]
    # eos 7 is a frequent token of this random model: some rows stop early, others run to the limit
    found = generate.generate_batch(model, prompts, max_new_tokens=12, block_size=64, pad=1, eos=7)
    assert [r.tokens for r in found] == [naive_answer(model, p, 12, 7) for p in prompts]
    ids, mask = generate.left_padded(prompts, pad=1)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=7,
                               pad_token_id=1)[:, ids.shape[1]:]
    for response, row in zip(found, reference.tolist()):
        assert row[:len(response.tokens)] == response.tokens
        assert response.finished == (response.tokens[-1] == 7)
    # the log-probabilities are the teacher's at temperature 1
    with torch.no_grad():
        first = torch.log_softmax(model(input_ids=torch.tensor([prompts[0]])).logits[0, -1], -1)[found[0].tokens[0]]
    alone = generate.generate_batch(model, prompts[:1], max_new_tokens=1, block_size=64, pad=1, eos=7)[0]
    assert alone.logprob_sum == pytest.approx(float(first), abs=1e-5)


@pytest.mark.unit
def test_a_response_stops_at_the_end_of_the_block():
    assert generate.limits([[1] * 20, [1] * 5, [1] * 24], max_new_tokens=10, block_size=24) == [4, 10, 0]


@pytest.mark.unit
def test_sampling_draws_from_the_top_p_set_with_the_rows_uniform():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    pick = lambda u, p: int(generate.choose(logits, torch.tensor([u], dtype=torch.float64), 1.0, p))  # noqa: E731
    assert [pick(u, 1.0) for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.96, 0.999)] == [0, 0, 1, 1, 2, 3, 3]
    assert [pick(u, 0.75) for u in (0.0, 0.6, 0.99)] == [0, 0, 1]  # {0.5, 0.3} renormalised: 0.625 | 0.375
    assert [pick(u, 0.4) for u in (0.0, 0.99)] == [0, 0]
    assert int(generate.choose(logits, None, 1.0, 1.0)) == 0
    assert generate.row_seed(0, 5, 1) != generate.row_seed(0, 5, 0) != generate.row_seed(1, 5, 0)


@pytest.mark.integration
def test_the_output_is_a_prepared_directory_with_the_teachers_answers(world):
    out, prepared = world / "gen", world / "prepared"
    for name in ("labeled.parquet", "test.parquet", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (prepared / name).read_bytes()
    manifest = json.loads((out / generate.MANIFEST).read_text())
    teacher = AutoModelForCausalLM.from_pretrained(world / "llama").eval()
    source_ids, prompts, _ = generate.prompts_and_responses(prepared / "unlabeled.parquet")
    ids, blocks = tokens.read_blocks(out / "unlabeled.parquet")
    predicted = tokens.predicted(out / "unlabeled.parquet")
    assert np.array_equal(ids, source_ids) and blocks.shape == (24, BLOCK)
    info = tokens.split_info(out / "unlabeled.parquet")
    assert info["response_only"] and info["tokenizer_sha256"] == tokens.split_info(prepared / "labeled.parquet")[
        "tokenizer_sha256"]
    meta = pq.read_schema(out / "unlabeled.parquet").metadata
    fingerprint = manifest["teacher"]["fingerprint"]
    assert meta[b"generated_by"].decode() == fingerprint and len(fingerprint) == 64
    assert json.loads(meta[b"generation"])["max_new_tokens"] == 10 == manifest["settings"]["max_new_tokens"]
    eos = 1  # </s>
    for prompt, block, keep in zip(prompts, blocks, predicted):
        response = naive_answer(teacher, prompt, min(10, BLOCK - len(prompt)), eos)
        assert block[:len(prompt)].tolist() == prompt and not keep[:len(prompt) - 1].any()
        assert block[1:][keep].tolist() == response  # the loss mask covers the teacher's response alone
    assert manifest["responses"]["kept"] == 24 and [p["prompts"] for p in manifest["parts"]] == [5, 5, 5, 5, 4]
    assert 0 <= manifest["teacher_exact_match"] <= 1


@pytest.mark.integration
def test_kd_label_caches_the_soft_targets_of_the_teachers_responses(world, tmp_path):
    ok(invoke(label.main, *hf_label_args(world, world / "llama", world / "gen", tmp_path / "cache")))
    ok(invoke_cache("verify", tmp_path / "cache"))
    cache = Cache.open(tmp_path / "cache")
    predicted = tokens.predicted(world / "gen" / "unlabeled.parquet")
    soft = cache.soft_targets("unlabeled", [1.0])
    assert cache.split("unlabeled")["rows"] == len(soft.ids) == predicted.sum()
    # greedy responses: the teacher's top-1 at each response position is the token it wrote
    _, blocks = tokens.read_blocks(world / "gen" / "unlabeled.parquet")
    assert np.array_equal(soft.topk_idx[:, 0], blocks[:, 1:][predicted])


@pytest.mark.integration
def test_sampled_responses_depend_on_seed_id_and_sample_only(world, tmp_path):
    sampled = ("--do-sample", "--temperature", 1.5, "--top-p", 0.9, "--samples", 2)
    ok(invoke(generate_stage.main, *gen_args(world, tmp_path / "a", *sampled)))
    ok(invoke(generate_stage.main, *gen_args(world, tmp_path / "b", *sampled, "--batch-size", 7, "--part-size", 24)))
    ids_a, blocks_a = tokens.read_blocks(tmp_path / "a" / "unlabeled.parquet")
    ids_b, blocks_b = tokens.read_blocks(tmp_path / "b" / "unlabeled.parquet")
    assert np.array_equal(blocks_a, blocks_b) and np.array_equal(ids_a, ids_b)
    first_new = 1 + max(tokens.read_blocks(world / "prepared" / f"{s}.parquet")[0].max()
                        for s in ("labeled", "unlabeled", "test"))
    assert ids_a.tolist() == list(range(first_new, first_new + 48))  # two blocks per prompt, new ids
    assert not np.array_equal(blocks_a[0::2], blocks_a[1::2])  # the two samples of a prompt differ
    ok(invoke(generate_stage.main, *gen_args(world, tmp_path / "c", *sampled, "--seed", 1)))
    assert not np.array_equal(tokens.read_blocks(tmp_path / "c" / "unlabeled.parquet")[1], blocks_a)


@pytest.mark.integration
def test_min_logprob_keeps_the_confident_responses_from_the_same_parts(world, tmp_path):
    out = tmp_path / "gen"
    ok(invoke(generate_stage.main, *gen_args(world, out)))
    parts = digest(out / "parts")
    logprob = pq.read_table(out / "parts").column("logprob").to_numpy()
    threshold = float(np.median(logprob))
    result = ok(invoke(generate_stage.main, *gen_args(world, out, "--min-logprob", threshold)))
    assert digest(out / "parts") == parts  # assembled again, not generated again
    ids, _ = tokens.read_blocks(out / "unlabeled.parquet")
    source_ids = tokens.read_blocks(world / "prepared" / "unlabeled.parquet")[0]
    assert np.array_equal(ids, source_ids[logprob >= threshold]) and 0 < len(ids) < len(source_ids)
    manifest = json.loads((out / generate.MANIFEST).read_text())
    assert manifest["responses"]["filtered"] == int((logprob < threshold).sum())
    assert "under min_logprob" in result.output
    assert manifest["responses"]["kept_mean_logprob"] >= manifest["responses"]["mean_logprob"]


@pytest.mark.integration
def test_a_second_run_leaves_a_complete_output_as_is(world, tmp_path):
    out = tmp_path / "gen"
    ok(invoke(generate_stage.main, *gen_args(world, out)))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    ok(invoke(generate_stage.main, *gen_args(world, out)))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


KILL_GENERATE = textwrap.dedent("""
    import os, signal, sys
    import kd.generate as generate
    from kd.cli import app

    after, args = int(sys.argv[1]), sys.argv[2:]
    original, calls = generate.generate_batch, [0]
    def answer_then_maybe_die(*a, **k):
        calls[0] += 1
        if calls[0] > after:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **k)
    generate.generate_batch = answer_then_maybe_die
    app(["generate", *args])
""")


@pytest.mark.integration
@pytest.mark.parametrize("after", [  # parts of 5 prompts x 2 samples: 3 batches each
    3,  # right after part 0 is written
    pytest.param(4, marks=pytest.mark.slow),  # mid part 1
])
def test_generate_killed_with_sigkill_resumes_to_a_byte_identical_output(world, tmp_path, after, child_env):
    out = tmp_path / "gen"
    args = [str(a) for a in gen_args(world, out, "--do-sample", "--samples", 2)]
    ok(invoke(generate_stage.main, *gen_args(world, tmp_path / "reference", "--do-sample", "--samples", 2)))
    killed = subprocess.run([sys.executable, "-c", KILL_GENERATE, str(after), *args], capture_output=True, text=True,
                            env=child_env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "labeled.parquet").exists() and not (out / generate.MANIFEST).exists()  # nothing finished
    assert len(list((out / "parts").glob("part-*.parquet"))) == 1
    ok(invoke(generate_stage.main, *args))
    assert digest(out) == digest(tmp_path / "reference")


@pytest.mark.integration
def test_shards_one_after_the_other_write_what_one_process_writes(world, tmp_path):
    sampled = ("--do-sample", "--samples", 2)
    ok(invoke(generate_stage.main, *gen_args(world, tmp_path / "one", *sampled)))
    out = tmp_path / "sharded"
    first = ok(invoke(generate_stage.main, *gen_args(world, out, *sampled, "--shard", 1, "--num-shards", 2)))
    assert "shard 1 of 2 done" in first.output and not (out / generate.MANIFEST).exists()
    assert sorted(p.name for p in (out / "parts").glob("part-*")) == ["part-00001.parquet", "part-00003.parquet"]
    ok(invoke(generate_stage.main, *gen_args(world, out, *sampled, "--shard", 0, "--num-shards", 2)))
    assert digest(out) == digest(tmp_path / "one")
    result = invoke(generate_stage.main, *gen_args(world, out, "--shard", 2, "--num-shards", 2), expect=1)
    assert "--shard 2 must be in [0, 2)" in result.output


@pytest.mark.integration
def test_refusals_are_one_line(world, tmp_path):
    other = tmp_path / "other"
    tokenizer = hf_tokenizer(docs=pydoc_documents(40, 40))
    tokenizer.save_pretrained(other)
    ok(invoke(prepare.main, "--dataset", world / "pairs.jsonl", "--prompt-column", "prompt", "--response-column",
              "response", "--tokenizer", other, "--block-size", BLOCK, "--labeled", 40, "--unlabeled", 24, "--test", 12,
              "--params", world / "params.yaml", "--out", tmp_path / "prepared"))
    result = invoke(generate_stage.main, *gen_args(world, tmp_path / "out")[:4], tmp_path / "prepared",
                    *gen_args(world, tmp_path / "out")[5:], expect=1)
    assert "another tokenizer than the teacher's" in result.output and str(other) in result.output
    assert str(world / "llama") in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    result = invoke(generate_stage.main, *gen_args(world, world / "prepared"), expect=1)
    assert "is the prepared directory itself" in result.output
    ok(invoke(prepare.main, "--dataset", "pydoc", "--tokenizer", world / "llama", "--block-size", BLOCK,
              "--labeled", 8, "--unlabeled", 4, "--test", 4, "--params", world / "params.yaml",
              "--out", tmp_path / "plain"))
    result = invoke(generate_stage.main, *gen_args(world, tmp_path / "out")[:4], tmp_path / "plain",
                    *gen_args(world, tmp_path / "out")[5:], expect=1)
    assert "plain text (no loss_mask)" in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = invoke(generate_stage.main, *gen_args(world, tmp_path / "mine"), expect=1)
    assert "did not write" in result.output and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    result = invoke(generate_stage.main, *gen_args(world, tmp_path / "out", "--samples", 2), expect=1)
    assert "generate.samples: 2 responses per prompt need do_sample: true" in result.output


@pytest.mark.unit
@pytest.mark.parametrize("fields, message", [
    ({"split": "train"}, "generate.split: 'train'"),
    ({"top_p": 0}, r"generate.top_p: 0 must be in \(0, 1\]"),
    ({"temperature": 0.5}, "generate.do_sample: false"),
    ({"min_logprob": 0.5}, "generate.min_logprob: 0.5 must be <= 0"),
    ({"max_new_tokens": 0}, "generate.max_new_tokens: 0 must be >= 1"),
])
def test_generate_config_is_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(**fields)


@pytest.mark.integration
def test_addition_is_built_in_instruction_data_made_from_the_seed(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    args = ["--dataset", "addition", "--samples", 300, "--vocab-size", 259, "--block-size", 12, "--labeled", 20,
            "--unlabeled", 100, "--test", 50, "--shares", '{"labeled": 0.1, "unlabeled": 0.6, "test": 0.3}',
            "--params", params]
    ok(invoke(prepare.main, *args, "--out", tmp_path / "a"))
    ok(invoke(prepare.main, *args, "--out", tmp_path / "b"))
    for split in ("labeled", "unlabeled", "test"):
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (tmp_path / "b" / f"{split}.parquet").read_bytes()
    tokenizer = tokens.prepared_tokenizer(tmp_path / "a")
    seen = set()
    for split, count in (("labeled", 20), ("unlabeled", 100), ("test", 50)):
        _, prompts, responses = generate.prompts_and_responses(tmp_path / "a" / f"{split}.parquet")
        assert len(prompts) == count
        for prompt, response in zip(prompts, responses):
            assert prompt[0] == tokenizer.special.eos and response[-1] == tokenizer.special.eos
            question, answer = tokenizer.backend.decode(prompt[1:]), tokenizer.backend.decode(response[:-1])
            a, b = question.removesuffix("=").split("+")
            assert question.endswith("=") and int(answer) == int(a) + int(b) < 200 and len(response) <= 4
            assert question not in seen  # distinct sums, a sum in one split only
            seen.add(question)
    ok(invoke(prepare.main, *args[:-2], "--seed", 1, "--params", params, "--out", tmp_path / "c"))
    assert (tmp_path / "c" / "test.parquet").read_bytes() != (tmp_path / "a" / "test.parquet").read_bytes()
    result = invoke(prepare.main, *args, "--prompt-column", "q", "--response-column", "a", "--out", tmp_path / "d",
                    expect=1)
    assert "the built-in addition dataset has its own prompts" in result.output


@pytest.mark.integration
def test_students_of_teacher_answers_report_exact_match_over_seeds(world, tmp_path):
    """A student on the teacher's answers: eval scores the greedy answers of the student, its twin
    (every seed) and the teacher (kd generate's figure); the report ranks by exact match."""
    from kd.cli import distill, report
    from kd.cli import eval as evaluate

    ok(invoke(label.main, *hf_label_args(world, world / "llama", world / "gen", tmp_path / "cache")))
    (tmp_path / "params.yaml").write_text(json.dumps({"gen_students": {"s": {
        "arch": "llama", "arch_kwargs": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                         "num_key_value_heads": 1, "intermediate_size": 64},
        "epochs": 1, "batch_size": 8, "repeats": 2, "transfer": ["labeled", "unlabeled"],
        "loss": {"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5, "labels": True}}}}}))
    common = ["--params", tmp_path / "params.yaml", "--cache", tmp_path / "cache", "--prepared", world / "gen",
              "--students-dir", tmp_path / "students"]
    ok(invoke(distill.main, "s", *common, "--baselines", tmp_path / "baselines", "--checkpoints", tmp_path / "ck",
              "--no-progress"))
    ok(invoke(evaluate.main, "s", *common))
    metrics = json.loads((tmp_path / "students" / "s" / "metrics.json").read_text())
    _, prompts, truths = generate.prompts_and_responses(world / "gen" / "test.parquet")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "students" / "s").eval()
    answered = [naive_answer(student, p, BLOCK - len(p), 1) for p in prompts]
    assert metrics["exact_match"] == pytest.approx(np.mean([a == t for a, t in zip(answered, truths)]))
    manifest = json.loads((world / "gen" / generate.MANIFEST).read_text())
    assert metrics["teacher_exact_match"] == manifest["teacher_exact_match"]
    assert metrics["seeds"] == 2 and {"exact_match_mean", "exact_match_std", "baseline_exact_match_mean",
                                      "exact_match_gain_points_mean"} <= set(metrics)
    seeds = (tmp_path / "students" / "s" / "plots" / "seeds.csv").read_text().splitlines()
    assert seeds[0] == "seed,student,baseline,student_exact_match,baseline_exact_match" and len(seeds) == 3
    ok(invoke(report.main, "--params", tmp_path / "params.yaml", "--cache", tmp_path / "cache", "--students-dir",
              tmp_path / "students", "--out", tmp_path / "report", "--score", "exact_match"))
    header = (tmp_path / "report" / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert header[4:8] == ["exact_match", "baseline_exact_match", "teacher_exact_match", "exact_match_gain_points"]
    written = (tmp_path / "report" / "report.md").read_text()
    assert "test exact match" in written and "Teacher-written" not in written
    assert "one row per predicted response token (" in written and "per block of 24 tokens on average" in written
    # a copy of the student ties with it: the summary says so instead of naming one "best"
    shutil.copytree(tmp_path / "students" / "s", tmp_path / "students" / "twin_of_s")
    spec = json.loads((tmp_path / "params.yaml").read_text())
    spec["gen_students"]["twin_of_s"] = spec["gen_students"]["s"]
    (tmp_path / "params.yaml").write_text(json.dumps(spec))
    tied = ok(invoke(report.main, "--params", tmp_path / "params.yaml", "--cache", tmp_path / "cache",
                     "--students-dir", tmp_path / "students", "--out", tmp_path / "report", "--score", "exact_match"))
    assert "(best: a tie of s, twin_of_s)" in tied.output
    result = invoke(report.main, "--params", tmp_path / "params.yaml", "--cache", tmp_path / "cache",
                    "--students-dir", tmp_path / "students", "--out", tmp_path / "report2", "--score", "bleu", expect=1)
    assert ("--score: 'bleu' is not a score of causal_lm students (perplexity, exact_match, bits_per_char)"
            in result.output)


# --- any causal LM writes (`--model`): a student's answers, labeled by the teacher ---------------


@pytest.mark.unit
def test_a_written_splits_per_token_logprobs_round_trip(tmp_path):
    ids = np.array([3, 7], np.int64)
    blocks = np.array([[0, 5, 6, 1], [0, 4, 1, 2]], np.int32)
    mask = np.array([[False, False, True, True], [False, True, True, False]])
    written = np.where(mask, np.array([[0, 0, -0.25, -1.5], [0, -2.0, -0.125, 0]], np.float32), 0)
    meta = {"modality": "text", "block_size": "4", "vocab_size": "9", "tokenizer_sha256": "x", "documents": "2",
            "dataset": "d"}
    tokens.write_blocks(tmp_path / "w.parquet", ids, blocks, meta, mask, written)
    np.testing.assert_array_equal(tokens.writer_logprob(tmp_path / "w.parquet"), written)
    read_ids, read_blocks = tokens.read_blocks(tmp_path / "w.parquet")
    np.testing.assert_array_equal(read_ids, ids)
    np.testing.assert_array_equal(read_blocks, blocks)
    np.testing.assert_array_equal(tokens.predicted(tmp_path / "w.parquet"), mask[:, 1:])
    tokens.write_blocks(tmp_path / "plain.parquet", ids, blocks, meta, mask)
    assert tokens.writer_logprob(tmp_path / "plain.parquet") is None
    with pytest.raises(ValueError, match="loss_mask"):
        tokens.write_blocks(tmp_path / "bad.parquet", ids, blocks, meta, None, written)


def student_world(world: Path, tmp_path: Path) -> tuple[Path, list]:
    """A tiny kd student distilled (1 epoch) from the teacher's cached answers: -> its directory,
    and the distill options shared by the tests."""
    from kd.cli import distill
    budget = {"arch": "llama", "epochs": 1, "batch_size": 8, "transfer": ["unlabeled"],
              "loss": {"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5, "labels": False,
                                                                           "pseudo": True}}}
    (tmp_path / "params.yaml").write_text(json.dumps({"students": {
        "small": {**budget, "arch_kwargs": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                            "num_key_value_heads": 1, "intermediate_size": 64}},
        "next": budget}}))  # `next` starts from --init: the architecture is the init directory's
    ok(invoke(label.main, *hf_label_args(world, world / "llama", world / "gen", tmp_path / "cache")))
    common = ["--params", tmp_path / "params.yaml", "--baselines", tmp_path / "baselines", "--checkpoints",
              tmp_path / "ck", "--no-progress"]
    ok(invoke(distill.main, "small", *common, "--cache", tmp_path / "cache", "--prepared", world / "gen",
              "--students-dir", tmp_path / "r0"))
    return tmp_path / "r0" / "small", common


@pytest.mark.integration
def test_a_student_writes_answers_that_the_teacher_labels_and_the_next_round_continues_from(world, tmp_path):
    from kd import lm
    from kd.cli import distill
    student, common = student_world(world, tmp_path)
    out = tmp_path / "r1" / "generated"
    result = ok(invoke(generate_stage.main, "--no-progress", "--model", student, "--prepared", world / "prepared",
                       "--out", out, "--params", world / "params.yaml", "--max-new-tokens", 10, "--batch-size", 4,
                       "--part-size", 5))
    assert "model     greedy exact match on test" in result.output
    manifest = json.loads((out / generate.MANIFEST).read_text())
    assert manifest["writer"] == {**manifest["writer"], "role": "model", "directory": str(student),
                                  "fingerprint": lm.fingerprint(student)}
    assert "teacher" not in manifest and "teacher_exact_match" not in manifest  # kd eval's teacher is the cache's
    assert 0 <= manifest["writer_exact_match"] <= 1
    meta = pq.read_schema(out / "unlabeled.parquet").metadata
    assert meta[b"generated_by"].decode() == lm.fingerprint(student) and meta[b"generated_by_role"] == b"model"
    # the split's per-token log-probabilities are the student's own, at its response tokens
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    _, blocks = tokens.read_blocks(out / "unlabeled.parquet")
    predicted = tokens.predicted(out / "unlabeled.parquet")
    written = tokens.writer_logprob(out / "unlabeled.parquet")
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.from_numpy(blocks)).logits.float(), -1)[:, :-1]
    expected = logp.gather(2, torch.from_numpy(blocks[:, 1:])[..., None]).squeeze(2).numpy()
    np.testing.assert_allclose(written[:, 1:][predicted], expected[predicted], atol=1e-4)
    assert not written[:, 1:][~predicted].any() and not written[:, 0].any()
    parts = pq.read_table(out / "parts")
    np.testing.assert_allclose([np.mean(lp) for lp in parts.column("logprobs").to_pylist()],
                               parts.column("logprob").to_numpy(), rtol=1e-5)
    # the teacher labels the student's answers; the next round's student starts from this one
    ok(invoke(label.main, *hf_label_args(world, world / "llama", out, tmp_path / "r1" / "cache")))
    cache = Cache.open(tmp_path / "r1" / "cache")
    assert cache.split("unlabeled")["rows"] == predicted.sum()
    ok(invoke(distill.main, "next", *common, "--init", student, "--cache", tmp_path / "r1" / "cache",
              "--prepared", out, "--students-dir", tmp_path / "r1"))
    record = json.loads((tmp_path / "r1" / "next" / "student.json").read_text())
    assert record["student"]["init"] == str(student)
    assert AutoConfig.from_pretrained(tmp_path / "r1" / "next").to_dict()["hidden_size"] == 32  # the init's


@pytest.mark.unit
def test_on_policy_rounds_are_numbered_in_order_and_name_their_previous_student():
    from kd.on_policy import OnPolicyConfig
    from kd.project import check_params
    check_params({"on_policy": {"seeds": [0, 1], "rounds": [{"round": 1, "previous": "round0/answers"},
                                                            {"round": 2, "previous": "round1/own_answers"}]}})
    for bad, message in (({"rounds": [{"round": 2, "previous": "a"}]}, r"rounds\[0\].round: 2 must be 1"),
                         ({"rounds": [{"round": 1, "previous": " "}]}, r"rounds\[0\].previous: empty"),
                         ({"seeds": [0, 0]}, "distinct"), ({"rounds": [{"round": 1, "prev": "a"}]}, "unknown key")):
        with pytest.raises(ConfigError, match=message):
            check_params({"on_policy": bad})
    assert OnPolicyConfig().rounds == []


@pytest.mark.integration
def test_a_writer_of_another_tokenizer_is_refused_naming_both(world, tmp_path):
    other = save_hf_model(tmp_path / "other", "llama", hf_tokenizer(docs=pydoc_documents(40, 40)))
    result = invoke(generate_stage.main, "--no-progress", "--model", other, "--prepared", world / "prepared",
                    "--out", tmp_path / "gen", "--params", world / "params.yaml")
    assert_clean_error(result, "another tokenizer than the writing model's", str(other), "vocabulary")
    assert not (tmp_path / "gen").exists()
