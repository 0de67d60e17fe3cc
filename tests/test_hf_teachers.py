"""Your own language models as teachers: `kd prepare --tokenizer DIR` and `kd label --teacher DIR`
for Hugging Face directories that `transformers` saved, built here from configs and never
downloaded.

The world: a byte-level BPE of 384 entries trained with `tokenizers` on CPython's pydoc text,
wrapped as a PreTrainedTokenizerFast with bos/eos and NO pad token; tiny random Llama, Qwen2
and GPT-NeoX models (2 layers, 32 wide, about 45k parameters) saved with
`save_pretrained(max_shard_size=...)` small enough to give several safetensors shards and the
index. Each teacher labels pydoc prepared with its own directory as `prepare.tokenizer`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from kd import lm, tasks
from kd.cache import Cache
from kd.cache.verify import verify
from kd.cli import distill, label, prepare
from kd.errors import ConfigError, InputError, MissingInputError
from kd.prepared import tokens
from tests.helpers import (
    BLOCK,
    SIZES,
    TINY,
    VOCAB,
    assert_clean_error,
    hf_tokenizer,
    invoke,
    ok,
    pydoc_documents,
    save_hf_model,
)
from tests.helpers import hf_label_args as label_args

pytestmark = pytest.mark.integration

# --- prepare.tokenizer --------------------------------------------------------------------------


def test_prepare_tokenizes_with_the_directory_as_it_is(hf_world):
    source, prepared = hf_world / "llama", hf_world / "prepared-llama"
    hf = AutoTokenizer.from_pretrained(source, local_files_only=True)
    assert hf.pad_token is None and len(hf) == VOCAB  # nothing was added to it
    info = tokens.split_info(prepared / "labeled.parquet")
    assert info["vocab_size"] == VOCAB and info["tokenizer_source"] == str(source)
    assert info["tokenizer_sha256"] == tokens.read_tokenizer(source).fingerprint
    # the fingerprint of a tokenizer saved by transformers is its tokenizer.json's sha256
    import hashlib

    assert info["tokenizer_sha256"] == hashlib.sha256((source / "tokenizer.json").read_bytes()).hexdigest()
    assert (prepared / "tokenizer_config.json").is_file()
    _, blocks = tokens.read_blocks(prepared / "test.parquet")
    assert blocks[0, 0] == hf.eos_token_id  # every document starts after the eos id
    documents = pydoc_documents(0, 10_000)
    first = hf.decode(blocks[0, 1:].tolist())
    assert any(first in d for d in documents)  # ids decode back to the source text
    assert blocks.max() < VOCAB
    assert tokens.load_tokenizer(prepared)[1] == tokens.SpecialIds(pad=None, eos=hf.eos_token_id, mask=None,
                                                               bos=hf.bos_token_id)


def test_prepare_refuses_a_directory_without_a_tokenizer(hf_world, tmp_path):
    result = invoke(prepare.main, "--dataset", "pydoc", "--tokenizer", tmp_path, *SIZES,
                    "--params", hf_world / "params.yaml", "--out", tmp_path / "never")
    assert_clean_error(result, str(tmp_path), "tokenizer.json")
    assert not (tmp_path / "never").exists()


def test_a_jsonl_source_with_the_teachers_tokenizer(hf_world, tmp_path):
    docs = pydoc_documents(0, 30)
    lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(lines[:10] + ["", json.dumps({"id": -1, "body": None})] + lines[10:]) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  labeled: null\n  unlabeled: null\n  test: null\n")
    args = ["--dataset", source, "--text-column", "body", "--tokenizer", hf_world / "llama", "--block-size", BLOCK,
            "--params", params]
    ok(invoke(prepare.main, *args, "--out", tmp_path / "out"))
    infos = [tokens.split_info(tmp_path / "out" / f"{s}.parquet") for s in ("labeled", "unlabeled", "test")]
    assert sum(info["documents"] for info in infos) == 30 and {info["vocab_size"] for info in infos} == {VOCAB}
    ok(invoke(label.main, *label_args(hf_world, hf_world / "llama", tmp_path / "out", tmp_path / "cache")))

    bad = tmp_path / "bad.jsonl"
    for content, needles in ((lines[0] + "\n" + json.dumps({"id": 1, "text": "x"}) + "\n",
                              ["bad.jsonl", "line 2", "no field 'body'", "'id', 'text'"]),
                             ("{not json\n", ["line 1 is not JSON"]),
                             (json.dumps({"body": 3}) + "\n", ["line 1", "'body'", "is a int, expected a string"])):
        bad.write_text(content)
        result = invoke(prepare.main, *[bad if a == source else a for a in args], "--out", tmp_path / "never")
        assert_clean_error(result, *needles)
    assert not (tmp_path / "never").exists()


# --- kd label --teacher DIR ---------------------------------------------------------------------


@pytest.mark.parametrize("model_type", list(TINY))
def test_a_sharded_teacher_labels_data_cut_with_its_tokenizer(hf_world, tmp_path, model_type):
    teacher, prepared = hf_world / model_type, hf_world / f"prepared-{model_type}"
    assert len(list(teacher.glob("model-*-of-*.safetensors"))) > 2 and (teacher / lm.WEIGHTS_INDEX).is_file()
    out = tmp_path / "cache"
    ok(invoke(label.main, *label_args(hf_world, teacher, prepared, out)))
    assert verify(out, tasks.for_manifest) == []
    cache = Cache.open(out)
    config = cache.manifest["teacher"]["config"]
    assert cache.manifest["teacher"]["fingerprint"] == lm.fingerprint(teacher)
    assert config["arch"] == model_type and config["objective"] == "causal" and config["dtype"] == "float32"
    # (transformers' Qwen2Tokenizer adds its own pad token to what tokenizer.json holds: 385 ids)
    assert config["tokenizer"] == {"sha256": cache.manifest["text"]["tokenizer_sha256"],
                                   "vocab_size": tokens.split_info(prepared / "test.parquet")["vocab_size"]}
    assert cache.manifest["num_classes"] == VOCAB

    model = AutoModelForCausalLM.from_pretrained(teacher, local_files_only=True)
    _, blocks = tokens.read_blocks(prepared / "test.parquet")
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(blocks[:4])).logits[:, :-1].reshape(-1, VOCAB)
    rows = pq.read_table(out / "soft_targets" / "split=test" / "part-00000.parquet")
    top = np.stack(rows["topk_idx"].to_numpy(zero_copy_only=False))[:len(logits)]
    kept = np.stack(rows["topk_logit"].to_numpy(zero_copy_only=False))[:len(logits)].astype(np.float32)
    expected = logits.topk(8).values - logits.max(1, keepdim=True).values
    assert (top[:, 0] == logits.argmax(1).numpy()).mean() > 0.99  # ties in float16 aside
    np.testing.assert_allclose(kept, expected.numpy(), atol=2e-3)


def test_the_fingerprint_covers_every_shard_the_config_and_the_tokenizer(hf_world, tmp_path):
    copy = Path(shutil.copytree(hf_world / "llama", tmp_path / "llama"))
    before = lm.fingerprint(copy)
    names = [lm.WEIGHTS_INDEX, sorted(copy.glob("model-*.safetensors"))[-1].name, "config.json",
             "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        original = (copy / name).read_bytes()
        (copy / name).write_bytes(original + b" ")
        assert lm.fingerprint(copy) != before, name
        (copy / name).write_bytes(original)
    assert lm.fingerprint(copy) == before


def test_a_missing_shard_is_one_line_naming_it(hf_world, tmp_path):
    copy = Path(shutil.copytree(hf_world / "llama", tmp_path / "llama"))
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    result = invoke(label.main, *label_args(hf_world, copy, hf_world / "prepared-llama", tmp_path / "never"))
    assert_clean_error(result, shard.name, "missing")
    assert not (tmp_path / "never").exists()


def test_label_dtype_and_device(hf_world, tmp_path):
    half = save_hf_model(tmp_path / "bf16", "llama", hf_tokenizer(), dtype=torch.bfloat16, shard=None)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    prepared = hf_world / "prepared-llama"  # the same tokenizer file: the same fingerprint
    ok(invoke(label.main, *label_args(hf_world, half, prepared, tmp_path / "auto")))
    assert Cache.open(tmp_path / "auto").manifest["teacher"]["config"]["dtype"] == "bfloat16"  # auto: the config's
    ok(invoke(label.main, *label_args(hf_world, half, prepared, tmp_path / "f32", "--dtype", "float32")))
    cache = Cache.open(tmp_path / "f32")
    assert cache.manifest["teacher"]["config"]["dtype"] == "float32"
    assert cache.manifest["label"]["dtype"] == "float32" and cache.manifest["label"]["device"] == "auto"
    assert_clean_error(invoke(label.main, *label_args(hf_world, half, prepared, tmp_path / "x", "--dtype", "int8")),
                       "label.dtype", "'int8'")
    assert_clean_error(invoke(label.main, *label_args(hf_world, half, prepared, tmp_path / "x", "--device", "tpu")),
                       "label.device", "'tpu'")
    if not torch.cuda.is_available():
        assert_clean_error(invoke(label.main, *label_args(hf_world, half, prepared, tmp_path / "x",
                                                          "--device", "cuda")), "label.device", "no GPU")
    assert lm.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not (tmp_path / "x").exists()


def test_no_code_from_the_directory_runs(hf_world, tmp_path):
    copy = Path(shutil.copytree(hf_world / "llama", tmp_path / "remote"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="remote: cannot load the model"):
        lm.load(copy)
    with pytest.raises(MissingInputError, match="config.json"):
        lm.load(tmp_path)
    with pytest.raises(ConfigError, match="label.device"):
        lm.resolve_device("gpu")


# --- another tokenizer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_data(hf_world) -> dict[str, Path]:
    """pydoc cut with tokenizers that are not the llama teacher's: one of the same size (trained
    on other documents) and one of another size (kd's own BPE of 300 entries)."""
    same = hf_world / "other-384"
    tokenizer = hf_tokenizer(VOCAB, pydoc_documents(40, 40))
    tokenizer.save_pretrained(same)
    assert len(tokenizer) == VOCAB
    out = {}
    for name, args in (("same size", ("--tokenizer", same)), ("other size", ("--vocab-size", 300))):
        out[name] = hf_world / f"prepared-{name.replace(' ', '-')}"
        ok(invoke(prepare.main, "--dataset", "pydoc", *args, *SIZES, "--params", hf_world / "params.yaml",
                  "--out", out[name]))
    return out


@pytest.mark.parametrize("which", ["same size", "other size"])
def test_label_refuses_data_cut_with_another_tokenizer(hf_world, other_data, tmp_path, which):
    prepared = other_data[which]
    result = invoke(label.main, *label_args(hf_world, hf_world / "llama", prepared, tmp_path / "never"))
    mine = tokens.split_info(prepared / "labeled.parquet")
    theirs = tokens.read_tokenizer(hf_world / "llama").fingerprint
    source = "other-384" if which == "same size" else "the BPE `kd prepare` trained"
    assert_clean_error(result, "another tokenizer", source, mine["tokenizer_sha256"][:12], theirs[:12],
                       f"vocabulary {mine['vocab_size']}", f"vocabulary {VOCAB}", str(hf_world / "llama"))
    assert not (tmp_path / "never").exists()


def test_label_refuses_ids_past_the_teachers_vocabulary(hf_world, tmp_path):
    # the llama's own tokenizer, but an embedding of 300 rows: ids 300..383 would index past it
    small = save_hf_model(tmp_path / "small", "llama", hf_tokenizer(), vocab_size=300, shard=None)
    result = invoke(label.main, *label_args(hf_world, small, hf_world / "prepared-llama", tmp_path / "never"))
    assert_clean_error(result, "labeled.parquet", "outside the teacher's vocabulary of 300 ids")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("which", ["same size", "other size"])
def test_distill_refuses_data_cut_with_another_tokenizer(hf_world, other_data, tmp_path, which):
    cache = tmp_path / "cache"
    ok(invoke(label.main, *label_args(hf_world, hf_world / "llama", hf_world / "prepared-llama", cache)))
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"text_students": {"s": {
        "arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16}, "epochs": 1, "batch_size": 8,
        "transfer": ["unlabeled"], "loss": {"soft": {"weight": 1.0, "temperature": 1}}}}}))
    prepared = other_data[which]
    result = invoke(distill.main, "s", "--cache", cache, "--prepared", prepared, "--students-dir", tmp_path / "st",
                    "--baselines", tmp_path / "bl", "--checkpoints", tmp_path / "ck", "--params", params,
                    "--no-progress")
    mine = tokens.split_info(prepared / "unlabeled.parquet")
    assert_clean_error(result, "unlabeled.parquet", "another tokenizer", mine["tokenizer_sha256"][:12],
                       Cache.open(cache).manifest["text"]["tokenizer_sha256"][:12],
                       f"vocabulary {mine['vocab_size']}", f"vocabulary {VOCAB}", str(cache))
    assert not any((tmp_path / d).exists() for d in ("st", "bl", "ck"))


def test_kd_teacher_trains_any_model_type_on_a_hugging_face_tokenizer(hf_world, tmp_path):
    from kd.cli import teacher

    prepared, out = hf_world / "prepared-llama", tmp_path / "teacher"
    ok(invoke(teacher.main, "--arch", "llama", "--arch-kwargs", json.dumps(TINY["llama"]), "--epochs", 1,
              "--batch-size", 8, "--no-progress", "--prepared", prepared, "--out", out,
              "--params", hf_world / "params.yaml"))
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "llama" and model.config.pad_token_id is None
    assert model.config.eos_token_id == AutoTokenizer.from_pretrained(out, local_files_only=True).eos_token_id
    assert json.loads((out / "metrics.json").read_text())["objective"] == "causal"
    ok(invoke(label.main, *label_args(hf_world, out, prepared, tmp_path / "cache")))  # its own tokenizer: accepted


def test_a_masked_teacher_with_a_wordpiece_tokenizer(hf_world, tmp_path):
    """A BERT with its own WordPiece tokenizer (pad, unk, cls, sep, mask; no eos: sep separates
    the documents), sharded: prepared with it, labeled with recorded masks, kept whole."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForMaskedLM

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(pydoc_documents(), trainers.WordPieceTrainer(vocab_size=500, special_tokens=specials,
                                                                             show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert", max_shard_size="30KB")
    tokenizer.save_pretrained(tmp_path / "bert")
    prepared, cache = tmp_path / "prepared", tmp_path / "cache"
    ok(invoke(prepare.main, "--dataset", "pydoc", "--tokenizer", tmp_path / "bert", *SIZES,
              "--params", hf_world / "params.yaml", "--out", prepared))
    sep, mask = tokenizer.sep_token_id, tokenizer.mask_token_id
    assert tokens.load_tokenizer(prepared)[1] == tokens.SpecialIds(pad=0, eos=sep, mask=mask, bos=None)
    assert tokens.read_blocks(prepared / "test.parquet")[1][0, 0] == sep
    ok(invoke(label.main, *label_args(hf_world, tmp_path / "bert", prepared, cache, "--views", 1, "--keep-teacher")))
    assert verify(cache, tasks.for_manifest) == []
    manifest = Cache.open(cache).manifest
    assert manifest["text"]["objective"] == "masked" and manifest["views"]["count"] == 1
    assert sum(rel.endswith(".safetensors") for rel in manifest["teacher_files"]) > 2
    seen = pq.read_table(cache / "soft_targets" / "split=test" / "part-00000.parquet")["input_token"].to_numpy()
    assert (seen == mask).mean() > 0.5  # BERT's 80% [MASK], with the tokenizer's own mask id
