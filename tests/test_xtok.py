"""Students with another tokenizer than the teacher's: the alignment of two tokenizations of
the same text (hand-made strings), the mapping table and the two losses (`mapped`, `uld`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd import align, losses
from kd.errors import InputError
from kd.prepared.tokens import special_ids
from kd.sources.text import train_tokenizer

TEXT = "héllo wörld, 漢字 and 😀 emoji\n\n   spaced   out\tend"
CORPUS = [TEXT, "hello world, and more words", "the spaced out text", "漢字漢字 😀😀", "wörld wörld héllo"] * 3


def side(vocab_size: int) -> dict:
    backend = train_tokenizer(CORPUS, vocab_size)
    special = special_ids(backend, "test")
    roles = align.roles(special)
    return {"backend": backend, "bytes": align.token_bytes(backend), "roles": roles,
            "special": {i: r for r, i in roles.items()},
            "encode": lambda s, b=backend: b.encode(s, add_special_tokens=False).ids}


@pytest.fixture(scope="module")
def pair() -> tuple[dict, dict]:
    return side(259), side(330)  # bytes only; bytes plus merges


def block_of(teacher: dict, *docs: str) -> np.ndarray:
    eos = teacher["roles"]["eos"]
    return np.array([t for d in docs for t in [eos, *teacher["encode"](d)]], np.int64)


def to_student(teacher: dict, student: dict, block: np.ndarray) -> align.StudentBlock:
    return align.student_block(block, teacher["bytes"], teacher["special"], student["encode"], student["bytes"],
                               student["roles"])


def text_of(side_: dict, tokens: np.ndarray) -> bytes:
    return b"".join(side_["bytes"][t] or b"|" for t in tokens)


@pytest.mark.unit
def test_token_bytes_spell_every_piece_of_text_back(pair):
    for s in pair:
        ids = s["encode"](TEXT)
        assert b"".join(s["bytes"][i] for i in ids) == TEXT.encode()
        assert all(s["bytes"][i] is None for i in s["roles"].values())


@pytest.mark.unit
def test_identical_tokenizers_align_one_to_one(pair):
    _, merged = pair
    block = block_of(merged, TEXT, "hello world")
    found = to_student(merged, merged, block)
    np.testing.assert_array_equal(found.tokens, block)
    position, one = align.aligned_positions(found)
    np.testing.assert_array_equal(position, np.arange(len(block) - 1))
    assert one.all()
    np.testing.assert_array_equal(found.characters, found.teacher_characters)


@pytest.mark.unit
def test_a_token_spanning_several_of_the_others_and_the_reverse(pair):
    byte, merged = pair
    # the teacher has bytes only, the student merges: every student token starts where a teacher byte does
    found = to_student(byte, merged, block_of(byte, TEXT))
    assert len(found.tokens) < len(found.teacher_start)
    assert text_of(merged, found.tokens[1:]) == TEXT.encode()
    position, one = align.aligned_positions(found)
    assert (position >= 0).all()
    multi = np.array([len(merged["bytes"][t]) > 1 for t in found.tokens[1:]])
    assert multi.any() and (one == ~multi).all()  # one-to-one exactly where the student token is one byte
    # the reverse: a student byte inside a teacher token has no teacher row predicting from there
    found = to_student(merged, byte, block_of(merged, TEXT))
    position, one = align.aligned_positions(found)
    starts = set(found.teacher_start[1:].tolist())
    np.testing.assert_array_equal(position >= 0, [s in starts for s in found.start[1:]])
    np.testing.assert_array_equal(found.start[1:][position >= 0], found.teacher_start[1:][position[position >= 0]])
    assert one.sum() == sum(len(merged["bytes"][t] or b"x") == 1 for t in block_of(merged, TEXT)[1:])


@pytest.mark.unit
def test_multi_byte_characters_cut_by_the_block_are_trimmed(pair):
    byte, merged = pair
    whole = block_of(byte, "漢字 😀")
    cut = whole[2:-2]  # starts inside 漢 (3 bytes), ends inside 😀 (4 bytes)
    found = to_student(byte, merged, cut)
    assert text_of(merged, found.tokens) == "字 ".encode()
    assert found.start[0] == 2 and found.end[-1] == 2 + len("字 ".encode())
    assert found.characters.sum() == 2 and found.teacher_characters.sum() == 2
    position, _ = align.aligned_positions(found)
    np.testing.assert_array_equal(found.start[1:], found.teacher_start[1:][position])


@pytest.mark.unit
def test_eos_between_documents_maps_by_role_and_whitespace_runs_keep_their_bytes(pair):
    byte, merged = pair
    block = block_of(merged, "a   b", "\t\t c")
    found = to_student(merged, byte, block)
    eos = byte["roles"]["eos"]
    assert list(found.tokens).count(eos) == 2
    assert text_of(byte, found.tokens) == b"|a   b|\t\t c"
    position, one = align.aligned_positions(found)
    second = list(found.tokens).index(eos, 1)
    assert position[second - 1] >= 0 and one[second - 1]  # the eos is predicted at the same place by both
    assert block[position[second - 1] + 1] == merged["roles"]["eos"]


@pytest.mark.unit
def test_a_tokenizer_that_does_not_spell_the_text_back_is_refused(pair):
    byte, merged = pair
    with pytest.raises(InputError, match="byte for byte"):
        align.student_block(block_of(byte, "abc"), byte["bytes"], byte["special"],
                            lambda s: merged["encode"](s.upper()), merged["bytes"], merged["roles"])


@pytest.mark.unit
def test_the_mapping_table_matches_bytes_and_roles(pair):
    byte, merged = pair
    table = align.mapping_table(merged["bytes"], merged["roles"], byte["bytes"], byte["roles"])
    for t, s in enumerate(table):
        if t in merged["special"]:
            assert s == (-1 if merged["special"][t] == "pad" else byte["roles"][merged["special"][t]])
        elif len(merged["bytes"][t]) == 1:
            assert byte["bytes"][s] == merged["bytes"][t]
        else:
            assert s == -1
    same = align.mapping_table(merged["bytes"], merged["roles"], merged["bytes"], merged["roles"])
    expected = np.arange(len(same))
    expected[merged["roles"]["pad"]] = -1
    np.testing.assert_array_equal(same, expected)


# --- the losses ---------------------------------------------------------------------------------


def cached(teacher_logits: torch.Tensor, k: int, T: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top = teacher_logits.topk(k, dim=1)
    shifted = teacher_logits - top.values[:, :1]
    return top.indices, top.values - top.values[:, :1], (shifted / T).logsumexp(1)


@pytest.mark.unit
@pytest.mark.parametrize("k,tail", [(12, "bucket"), (5, "bucket"), (5, "renorm")])
def test_mapped_with_identical_tokenizers_is_soft_exactly(k, tail):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 12, requires_grad=True), 3 * torch.randn(6, 12)
    idx, logit, lse = cached(teacher, k, 2.0)
    a = losses.mapped_soft_target_loss(student, idx, logit, lse, 2.0, tail)
    (ga,) = torch.autograd.grad(a, student)
    b = losses.topk_soft_target_loss(student, idx, logit, lse, 2.0, tail)
    (gb,) = torch.autograd.grad(b, student)
    assert torch.equal(a, b) and torch.equal(ga, gb)


@pytest.mark.unit
def test_mapped_merges_and_buckets_like_the_coarse_grained_kl():
    # teacher ids 3 and 4 are one student token (4); id 5 has none: its mass goes to the tail
    torch.manual_seed(1)
    C, T = 9, 2.0
    student, teacher = torch.randn(4, C, requires_grad=True), 2 * torch.randn(4, C)
    table = torch.arange(C)
    table[3], table[5] = 4, -1
    idx, logit, lse = cached(teacher, C, T)
    found = losses.mapped_soft_target_loss(student, table[idx], logit, lse, T)
    (grad,) = torch.autograd.grad(found, student)
    p, kept = torch.softmax(teacher / T, 1), [j for j in range(C) if j in table.tolist()]
    merged = torch.stack([p[:, table == j].sum(1) for j in kept], 1)
    student2 = student.detach().clone().requires_grad_()
    q = torch.softmax(student2 / T, 1)[:, kept]
    P = torch.cat([merged, 1 - merged.sum(1, keepdim=True)], 1)
    Q = torch.cat([q, 1 - q.sum(1, keepdim=True)], 1)
    expected = (P * (P.log() - Q.log())).sum(1).mean() * T**2
    expected.backward()
    assert found.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad, student2.grad, atol=1e-6)


@pytest.mark.unit
def test_mapped_with_nothing_mapped_is_the_kl_of_two_tails_and_finite():
    student, teacher = torch.randn(3, 6), torch.randn(3, 6)
    idx, logit, lse = cached(teacher, 3, 1.0)
    kl = losses.mapped_soft_target_loss_per_row(student, torch.full_like(idx, -1), logit, lse, 1.0)
    assert torch.allclose(kl, torch.zeros(3), atol=1e-6)


def uld_reference(student_logits, teacher_logits, T):
    # Boizard et al.: sorted probabilities, zero-padded to the longer vocabulary, L1
    p = torch.softmax(teacher_logits / T, 1).sort(1, descending=True).values
    q = torch.softmax(student_logits / T, 1).sort(1, descending=True).values
    width = max(p.shape[1], q.shape[1])
    p, q = torch.nn.functional.pad(p, (0, width - p.shape[1])), torch.nn.functional.pad(q, (0, width - q.shape[1]))
    return (p - q).abs().sum(1).mean()


@pytest.mark.unit
@pytest.mark.parametrize("student_classes", [10, 6, 14])
def test_uld_with_the_whole_teacher_distribution_is_ulds_distance(student_classes):
    torch.manual_seed(2)
    student, teacher = torch.randn(5, student_classes), 2 * torch.randn(5, 10)
    idx, logit, lse = cached(teacher, 10, 1.5)
    found = losses.uld_loss(student, logit, lse, 1.5)
    if student_classes <= 10:
        assert found.item() == pytest.approx(uld_reference(student, teacher, 1.5).item(), rel=1e-5)
    else:  # the student's entries past the teacher's k: compared by mass, a lower bound
        assert found.item() <= uld_reference(student, teacher, 1.5).item() + 1e-6


@pytest.mark.unit
def test_uld_properties():
    torch.manual_seed(3)
    teacher = 2 * torch.randn(4, 20)
    idx, logit, lse = cached(teacher, 5, 1.0)
    permuted = teacher[:, torch.randperm(20)]  # a student with the same probabilities on other ids
    assert losses.uld_loss(permuted, logit, lse, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 7, requires_grad=True)
    value = losses.uld_loss(other, logit, lse, 1.0)
    assert 0 < value.item() <= 2 + 1e-6
    value.backward()
    assert torch.isfinite(other.grad).all() and other.grad.abs().sum() > 0


# --- through the CLI: a tiny Llama teacher with one tokenizer, students with another ------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random tiny Llama teacher with a 384-entry Hugging Face BPE, pydoc cut with it and
    labeled (top-8), and kd's own 300-entry BPE for the students (other size, other merges)."""
    from kd.cli import label, prepare
    from tests.helpers import hf_label_args, hf_tokenizer, invoke, ok, save_hf_model

    root = tmp_path_factory.mktemp("xtok")
    (root / "params.yaml").write_text("{}\n")
    save_hf_model(root / "teacher", "llama", hf_tokenizer())
    sizes = ("--block-size", 32, "--labeled", 8, "--unlabeled", 12, "--test", 6)
    ok(invoke(prepare.main, "--dataset", "pydoc", "--tokenizer", root / "teacher", *sizes,
              "--params", root / "params.yaml", "--out", root / "prepared"))
    ok(invoke(prepare.main, "--dataset", "pydoc", "--vocab-size", 300, *sizes, "--params", root / "params.yaml",
              "--out", root / "student_tokenizer"))
    ok(invoke(label.main, *hf_label_args(root, root / "teacher", root / "prepared", root / "cache")))
    return root


TINY_LLAMA = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 64}


def distil(world, tmp_path, name: str, **student):
    import yaml

    from kd.cli import distill
    from tests.helpers import invoke

    entry = {"arch": "llama", "arch_kwargs": TINY_LLAMA, "epochs": 2, "batch_size": 4, "lr": 0.003,
             "transfer": ["unlabeled"], **student}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {name: entry}}))
    result = invoke(distill.main, name, "--no-progress", "--cache", world / "cache", "--prepared", world / "prepared",
                    "--students-dir", tmp_path / "students", "--baselines", tmp_path / "baselines",
                    "--checkpoints", tmp_path / "ck", "--params", params)
    return result, params


@pytest.mark.integration
def test_a_student_with_another_tokenizer_distils_and_evaluates_from_the_unchanged_cache(world, tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.cli import eval as evaluate
    from tests.helpers import invoke, ok

    manifest = (world / "cache" / "manifest.json").read_bytes()
    loss = {"mapped": {"weight": 0.5, "temperature": 4}, "uld": {"weight": 0.5, "temperature": 1},
            "hard": {"weight": 0.5}}
    result, params = distil(world, tmp_path, "x", tokenizer=str(world / "student_tokenizer"), loss=loss, repeats=2)
    ok(result)
    directory = tmp_path / "students" / "x"
    header, *rows = (directory / "train_log.csv").read_text().splitlines()
    assert header.split(",")[:4] == ["epoch", "hard", "mapped", "uld"] and len(rows) == 2
    assert all(float(v) > 0 for v in rows[-1].split(",")[1:4])
    # the student's directory loads with the Auto classes alone, its own tokenizer beside it
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.vocab_size == 300 == len(tokenizer)
    ok(invoke(evaluate.main, "x", "--cache", world / "cache", "--prepared", world / "prepared",
              "--students-dir", tmp_path / "students", "--params", params))
    m = json.loads((directory / "metrics.json").read_text())
    assert m["seeds"] == 2 and m["student_tokenizer"]["vocab_size"] == 300
    for key in ("bits_per_char", "baseline_bits_per_char", "teacher_bits_per_char", "bits_per_char_mean"):
        assert 0 < m[key] < 20, key
    assert 0 < m["aligned_one_to_one"] <= m["aligned_positions"] <= 1
    assert 0 <= m["mapped_mass"] <= m["mapped_kept_mass"] <= 1
    # bits per character from perplexity: the same loss over the characters the tokens cover
    assert m["bits_per_char"] == pytest.approx(np.log(m["perplexity"]) * m["test_tokens"]
                                               / (np.log(2) * m["test_characters"]))
    assert (world / "cache" / "manifest.json").read_bytes() == manifest  # the cache unchanged
    # the text report puts the student beside its twins and the teacher in bits per character
    from kd.cli import report

    ok(invoke(report.main, "--cache", world / "cache", "--students-dir", tmp_path / "students",
              "--out", tmp_path / "report", "--params", params))
    table = (tmp_path / "report" / "report.md").read_text().split("## Bits per character")[1]
    assert f"{m['teacher_bits_per_char']:.3f}" in table
    assert "| x | own (300) | hard + mapped + uld |" in table
    assert f"{m['bits_per_char_mean']:.3f} ± {m['bits_per_char_std']:.3f}" in table
    # ranked by bits per character: the students of every tokenizer on one scale, over seeds
    assert m["bits_per_char_reduction"] == pytest.approx(1 - m["bits_per_char"] / m["baseline_bits_per_char"])
    ok(invoke(report.main, "--cache", world / "cache", "--students-dir", tmp_path / "students", "--score",
              "bits_per_char", "--out", tmp_path / "by_bits", "--params", params))
    board = (tmp_path / "by_bits" / "leaderboard.csv").read_text().splitlines()
    header, first = board[0].split(","), dict(zip(board[0].split(","), board[1].split(",")))
    assert header[4:6] == ["bits_per_char", "baseline_bits_per_char"]
    assert float(first["bits_per_char_mean"]) == pytest.approx(m["bits_per_char_mean"], abs=1e-6)
    assert (tmp_path / "by_bits" / "bits_per_char_vs_params.png").is_file()


@pytest.mark.integration
def test_the_twin_of_a_student_with_its_own_tokenizer_is_keyed_by_it(world, tmp_path):
    from tests.helpers import ok

    loss = {"uld": {"weight": 0.5}, "hard": {"weight": 0.5}}
    ok(distil(world, tmp_path, "a", loss=loss, epochs=1)[0])
    ok(distil(world, tmp_path, "b", tokenizer=str(world / "student_tokenizer"), loss=loss, epochs=1)[0])
    assert len(list((tmp_path / "baselines").iterdir())) == 2


@pytest.mark.integration
def test_mapped_with_the_teachers_own_tokenizer_trains_as_soft_exactly(world, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import ok

    weights = {}
    for name, extra in (("soft", {}), ("mapped", {"tokenizer": str(world / "teacher")})):
        ok(distil(world, tmp_path, name, epochs=1, loss={name: {"weight": 0.5, "temperature": 4},
                                                         "hard": {"weight": 0.5}}, **extra)[0])
        weights[name] = load_file(tmp_path / "students" / name / "model.safetensors")
    assert weights["soft"].keys() == weights["mapped"].keys()
    assert all(torch.equal(weights["soft"][k], weights["mapped"][k]) for k in weights["soft"])


@pytest.mark.integration
def test_soft_with_another_tokenizer_is_refused_in_one_line(world, tmp_path):
    result, _ = distil(world, tmp_path, "x", tokenizer=str(world / "student_tokenizer"),
                       loss={"soft": {"weight": 0.5}, "hard": {"weight": 0.5}})
    assert result.exit_code != 0
    line = result.output.strip()
    assert "\n" not in line and "loss.soft" in line and "student_tokenizer" in line and "teacher" in line
    assert "loss.mapped" in line and "loss.uld" in line


@pytest.mark.integration
def test_a_student_with_its_own_tokenizer_streams_the_rows_it_holds_in_memory(world):
    from kd import config
    from kd.cache import Cache
    from kd.tasks import causal_lm
    from tests.helpers import assert_streams_like_in_memory

    cfg = config.from_mapping(config.StudentConfig, {
        "name": "x", "section": "text_students", "arch": "llama", "arch_kwargs": TINY_LLAMA,
        "transfer": ["labeled", "unlabeled"], "tokenizer": str(world / "student_tokenizer"),
        "loss": {"mapped": {"weight": 0.5}, "uld": {"weight": 0.5}, "hard": {"weight": 0.5}}}, "text_students.x")
    cache = Cache.open(world / "cache")
    in_memory = causal_lm.rows(cache, world / "prepared", cfg, 2048)
    streamed = causal_lm.rows(cache, world / "prepared", cfg, 0.001)
    assert type(streamed).__name__ == "StreamingSet"
    assert torch.equal(in_memory.targets["row"], torch.arange(len(in_memory.targets["row"])))
    assert in_memory.targets["aligned"].any() and not in_memory.targets["aligned"].all()
    assert_streams_like_in_memory(in_memory, streamed, views="none", batch_size=4)


@pytest.mark.integration
def test_a_student_with_its_own_hugging_face_tokenizer_reads_it_back(world, tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import hf_tokenizer, ok, pydoc_documents

    own = hf_tokenizer(350, pydoc_documents(40, 40))
    own.save_pretrained(tmp_path / "own")
    ok(distil(world, tmp_path, "h", tokenizer=str(tmp_path / "own"), epochs=1,
              loss={"mapped": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5}})[0])
    found = AutoTokenizer.from_pretrained(tmp_path / "students" / "h")
    assert found.backend_tokenizer.to_str() == own.backend_tokenizer.to_str()
    assert found.eos_token == "</s>"


@pytest.mark.e2e
def test_two_process_torchrun_trains_a_student_with_its_own_tokenizer_as_one_process(world, tmp_path):
    import yaml

    from tests.helpers import TOLERANCE, both_ways, log_difference, max_difference

    entry = {"arch": "llama", "arch_kwargs": TINY_LLAMA, "epochs": 2, "batch_size": 4, "lr": 0.003,
             "transfer": ["unlabeled"], "tokenizer": str(world / "student_tokenizer"),
             "loss": {"mapped": {"weight": 0.5, "temperature": 4}, "uld": {"weight": 0.5}, "hard": {"weight": 0.5}}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"x": entry}}))
    single, data_parallel, _ = both_ways({"cache": world / "cache", "prepared": world / "prepared", "params": params},
                                         tmp_path, "x")
    for rel in ("model.safetensors", "baseline/model.safetensors"):
        assert max_difference(single / rel, data_parallel / rel) < TOLERANCE, rel
    assert log_difference(single / "train_log.csv", data_parallel / "train_log.csv") < TOLERANCE
