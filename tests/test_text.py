"""Text data and language-model teachers: `kd prepare` on pydoc / .txt / Parquet text, and
`kd teacher` with tiny GPT-2 and BERT models, through typer's CliRunner.

pydoc is prepared once per module with a 300-entry tokenizer and 32-token blocks (40 labeled,
10 unlabeled, 10 test); the teachers are one-layer, 32-wide models trained for two epochs.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from numpy.testing import assert_array_equal
from safetensors.torch import load_file

from kd import lm, lm_training, masking
from kd.cli import prepare, teacher
from kd.config import PrepareConfig, Shares
from kd.errors import InputError, MissingInputError
from kd.prepared import tokens
from kd.sources import text as text_sources
from tests.helpers import assert_clean_error, files_bytes, invoke, ok

SMALL = ("--vocab-size", 300, "--block-size", 32, "--labeled", 40, "--unlabeled", 10, "--test", 10)
TINY_GPT2 = '{"n_layer": 1, "n_head": 2, "n_embd": 32}'
TINY_BERT = '{"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64}'


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    (root / "params.yaml").write_text("prepare:\n  dataset: pydoc\n")
    ok(invoke(prepare.main, *SMALL, "--params", root / "params.yaml", "--out", root / "prepared"))
    return root


def run_prepare(root: Path, out: Path, *args) -> None:
    ok(invoke(prepare.main, *SMALL, "--params", root / "params.yaml", "--out", out, *args))


def essay(n: int = 30) -> str:
    """n short documents, separated by one, two or whitespace-only blank lines."""
    separators = ["\n\n", "\n\n\n", "\n  \n"]
    docs = [f"Document {i} says that the {i % 7}th value is {i * i}.\nIt goes on, line two." for i in range(n)]
    return "".join(d + separators[i % 3] for i, d in enumerate(docs))


# --- kd prepare -------------------------------------------------------------------------------


@pytest.mark.integration
def test_pydoc_files(root):
    prepared = root / "prepared"
    tokenizer_sha = hashlib.sha256((prepared / "tokenizer.json").read_bytes()).hexdigest()
    seen = []
    for name, rows in (("labeled", 40), ("unlabeled", 10), ("test", 10)):
        path = prepared / f"{name}.parquet"
        schema = pq.read_schema(path)
        assert schema.field("id").type == pa.int64()
        assert schema.field("tokens").type == pa.list_(pa.int32(), 32)
        meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
        assert {k: meta[k] for k in ("modality", "dataset", "block_size", "vocab_size", "tokenizer_sha256")} == {
            "modality": "text", "dataset": "pydoc", "block_size": "32", "vocab_size": "300",
            "tokenizer_sha256": tokenizer_sha}
        ids, blocks = tokens.read_blocks(path)
        assert ids.dtype == blocks.dtype == np.int64 and blocks.shape == (rows, 32)
        assert 0 <= blocks.min() and blocks.max() < 300
        assert blocks[0, 0] == 1  # every stream starts with <|endoftext|>
        ranges = [tokens.read_rows(path, start, min(start + 7, rows)) for start in range(0, rows, 7)]
        assert_array_equal(np.concatenate([b[0] for b in ranges]), ids)
        assert_array_equal(np.concatenate([b[1] for b in ranges]), blocks)
        assert tokens.split_info(path)["rows"] == rows and tokens.modality(path) == "text"
        seen.append(ids)
    assert len(np.unique(np.concatenate(seen))) == 60  # ids unique across splits

    tokenizer, special = tokens.load_tokenizer(prepared)
    assert special == tokens.SpecialIds(pad=0, eos=1, mask=2)
    from pydoc_data.topics import topics

    first = tokenizer.decode(tokens.read_blocks(prepared / "test.parquet")[1][0, 1:].tolist())
    assert any(first in topic for topic in topics.values())  # blocks decode back to the source text


@pytest.mark.unit
def test_documents_never_cross_splits():
    lengths = list(range(1, 80))
    cfg = PrepareConfig(dataset="pydoc", shares=Shares(labeled=0.6, unlabeled=0.3, test=0.1))
    dealt = text_sources.deal(lengths, cfg)
    assert sorted(i for docs in dealt.values() for i in docs) == list(range(79))
    chars = {name: sum(lengths[i] for i in docs) / sum(lengths) for name, docs in dealt.items()}
    assert chars == pytest.approx({"labeled": 0.6, "unlabeled": 0.3, "test": 0.1}, abs=0.05)
    more_labeled = text_sources.deal(lengths, PrepareConfig(shares=Shares(labeled=0.8, unlabeled=0.1, test=0.1)))
    assert more_labeled["test"] == dealt["test"]  # the test split is dealt first


@pytest.mark.integration
def test_same_params_same_bytes(root, tmp_path):
    run_prepare(root, tmp_path / "again")
    assert files_bytes(tmp_path / "again") == files_bytes(root / "prepared")
    run_prepare(root, tmp_path / "seed1", "--seed", 1)
    assert (tmp_path / "seed1" / "test.parquet").read_bytes() != (root / "prepared" / "test.parquet").read_bytes()


@pytest.mark.integration
def test_txt_source(tmp_path, run_command):
    source = tmp_path / "essay.txt"
    source.write_text("\n\n" + essay())
    docs = text_sources.documents(PrepareConfig(dataset=str(source)))
    assert len(docs) == 30 and docs[0] == "Document 0 says that the 0th value is 0.\nIt goes on, line two."
    (tmp_path / "params.yaml").write_text("prepare:\n  labeled: null\n  unlabeled: null\n  test: null\n")
    result = run_command(prepare.main, "--dataset", source, "--block-size", 8, "--vocab-size", 280,
                         "--shares", '{"labeled": 0.5, "unlabeled": 0.25, "test": 0.25}',
                         "--params", tmp_path / "params.yaml", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    infos = {name: tokens.split_info(tmp_path / "out" / f"{name}.parquet") for name in ("labeled", "unlabeled", "test")}
    assert sum(info["documents"] for info in infos.values()) == 30
    assert all(info["rows"] > 0 and info["vocab_size"] == 280 for info in infos.values())


@pytest.mark.integration
def test_parquet_source(tmp_path, run_command):
    body = essay().split("\n\n") + [None, "   "]  # a null and a blank row are dropped
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": pa.array(body, pa.string()), "n": pa.array(range(len(body)))}), source)
    cfg = PrepareConfig(dataset=str(source), text_column="body")
    assert text_sources.is_text(cfg) and len(text_sources.documents(cfg)) == len([b for b in body if b and b.strip()])
    (tmp_path / "params.yaml").write_text("prepare:\n  labeled: 3\n  unlabeled: 2\n  test: 1\n")
    result = run_command(prepare.main, "--dataset", source, "--text-column", "body", "--block-size", 8,
                         "--vocab-size", 270, "--params", tmp_path / "params.yaml", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [tokens.split_info(tmp_path / "out" / f"{s}.parquet")["rows"] for s in ("labeled", "unlabeled", "test")] \
        == [3, 2, 1]


def _txt(content: str):
    def make(d: Path) -> list:
        (d / "in.txt").write_text(content)
        return ["--dataset", "in.txt"]
    return make


def _parquet(**columns):
    def make(d: Path) -> list:
        pq.write_table(pa.table(columns), d / "in.parquet")
        return ["--dataset", "in.parquet"]
    return make


def _null_labeled(d: Path) -> list:
    (d / "params.yaml").write_text("prepare:\n  dataset: digits\n  labeled: null\n")
    return []


ERRORS = {
    "missing txt": (lambda d: ["--dataset", "nope.txt"], ["nope.txt", "not found"]),
    "no text column": (_parquet(body=["a b c"]), ["in.parquet", "no column 'id'", "prepare.text_column", "found body"]),
    "text column not strings": (_parquet(text=[1, 2]), ["in.parquet", "'text'", "int64", "strings"]),
    "empty text": (_txt("\n   \n\n"), ["in.txt", "no text"]),
    "vocab too small": (lambda d: ["--dataset", "pydoc", "--vocab-size", 100], ["prepare.vocab_size", "100", "259"]),
    "block too short": (lambda d: ["--dataset", "pydoc", "--block-size", 1], ["prepare.block_size", "1"]),
    "more blocks than exist": (lambda d: [*_txt(essay())(d), "--block-size", 8, "--labeled", 1, "--unlabeled", 1,
                                         "--test", 10_000],
                               ["prepare.test", "10000 blocks of 8 tokens", "hold"]),
    "no labeled document": (lambda d: [*_txt(essay())(d), "--shares", '{"labeled": 0, "unlabeled": 0.5, "test": 0.5}'],
                            ["prepare.shares.labeled", "no document"]),
    "unknown share": (lambda d: ["--dataset", "pydoc", "--shares", '{"train": 1}'], ["--shares.train", "unknown key"]),
    "shares not summing to 1": (lambda d: ["--dataset", "pydoc", "--shares", '{"labeled": 0.8}'],
                                ["prepare.shares", "0.8 + 0.2 + 0.1", "sum to 1"]),
    "input shape on text": (lambda d: ["--dataset", "pydoc", "--input-shape", "1,8"], ["prepare.input_shape", "text"]),
    "null size on image data": (_null_labeled, ["prepare.labeled", "null", "text datasets"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", ERRORS)
def test_prepare_errors(case, workdir, write_params, run_command):
    write_params(prepare={"dataset": "digits"})
    make, needles = ERRORS[case]
    assert_clean_error(run_command(prepare.main, *make(workdir)), *needles)
    assert not (workdir / "data").exists()


# --- language models --------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("arch, kwargs, score", [("gpt2", TINY_GPT2, "perplexity"),
                                                  ("bert", TINY_BERT, "masked_accuracy")])
def test_text_teacher(root, tmp_path, arch, kwargs, score):
    out = tmp_path / "teacher"
    ok(invoke(teacher.main, "--arch", arch, "--arch-kwargs", kwargs, "--epochs", 2, "--batch-size", 8,
              "--lr", 0.01, "--no-progress", "--prepared", root / "prepared", "--out", out,
              "--params", root / "params.yaml"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert {score, "test_loss", "train_loss", "params", "epochs", "objective"} <= set(metrics)
    assert metrics["train_loss"] < math.log(300)  # below a uniform guess over the vocabulary
    assert metrics["objective"] == ("causal" if arch == "gpt2" else "masked")
    assert load_file(str(out / "model.safetensors"))  # safetensors, readable without transformers
    assert (out / "tokenizer.json").read_bytes() == (root / "prepared" / "tokenizer.json").read_bytes()
    assert json.loads((out / "training.json").read_text())["training"]["arch"] == arch

    model = lm.load(out)
    assert lm.objective(model) == metrics["objective"]
    assert sum(p.numel() for p in model.parameters()) == metrics["params"]
    _, test_blocks = tokens.read_blocks(root / "prepared" / "test.parquet")
    _, special = tokens.load_tokenizer(root / "prepared")
    # other batches, same masks
    again = lm_training.evaluate(model, torch.from_numpy(test_blocks), special, batch_size=3, seed=0)
    assert again["loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)
    assert len(lm.fingerprint(out)) == 64


@pytest.mark.integration
def test_fit_lowers_the_loss_deterministically_and_reload_gives_the_same_logits(root, tmp_path):
    _, blocks = tokens.read_blocks(root / "prepared" / "labeled.parquet")
    _, special = tokens.load_tokenizer(root / "prepared")

    def train() -> tuple[torch.nn.Module, list]:
        torch.manual_seed(0)
        model = lm.build("gpt2", json.loads(TINY_GPT2), 300, 32, special)
        log = lm_training.fit(model, torch.from_numpy(blocks), special, epochs=3, batch_size=8, lr=0.01,
                              weight_decay=0.0, seed=0, progress=False)
        return model, log

    model, log = train()
    assert log[-1]["loss"] < log[0]["loss"]
    twin, _ = train()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    lm.save(tmp_path / "m", model, root / "prepared" / "tokenizer.json")
    x = torch.from_numpy(blocks[:4])
    with torch.no_grad():
        assert torch.equal(lm.load(tmp_path / "m")(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.unit
def test_bert_masking_is_seeded_and_spares_special_tokens():
    special = tokens.SpecialIds(pad=0, eos=1, mask=2)
    blocks = torch.randint(3, 300, (64, 128))
    blocks[:, ::16] = special.eos
    inputs, labels = masking.mask_tokens(blocks, special, 300, torch.Generator().manual_seed(5))
    again = masking.mask_tokens(blocks, special, 300, torch.Generator().manual_seed(5))
    assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])
    chosen = labels != -100
    assert not chosen[:, ::16].any() and torch.equal(labels[chosen], blocks[chosen])
    assert chosen.float().mean() == pytest.approx(0.15 * 15 / 16, abs=0.01)
    masked = (inputs == special.mask)[chosen].float().mean()
    kept = (inputs == blocks)[chosen].float().mean()
    assert masked == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1 + 0.1 / 297, abs=0.03)


@pytest.mark.integration
def test_teacher_errors(root, run_command):
    common = ("--no-progress", "--prepared", root / "prepared", "--params", root / "params.yaml",
              "--out", root / "never")
    assert_clean_error(run_command(teacher.main, "--arch", "cnn", *common), "teacher.arch", "'cnn'", "gpt2, bert")
    assert_clean_error(run_command(teacher.main, "--arch", "gpt2", "--arch-kwargs", '{"n_layers": 2}', *common),
                       "teacher.arch_kwargs.n_layers", "GPT2Config")
    assert_clean_error(run_command(teacher.main, "--arch", "gpt2", "--arch-kwargs", '{"vocab_size": 9}', *common),
                       "teacher.arch_kwargs.vocab_size", "tokenizer")
    assert not (root / "never").exists()
    with pytest.raises(MissingInputError, match="config.json"):
        lm.load(root)
    (root / "bad").mkdir()
    (root / "bad" / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    (root / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="bad: cannot load"):
        lm.load(root / "bad")
