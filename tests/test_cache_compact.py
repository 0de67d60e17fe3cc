"""The compact encoding of the cache (`label.encoding: compact`): ids as gaps, logits in one byte.

Real files: the tiny text world of conftest (pydoc, a 512-token BPE, a one-layer GPT-2 teacher),
labeled through `kd label` twice, once with float32 top-k (the truth) and once compact. The
decoded rows are compared with the truth entry by entry, a student trains from the compact
cache through `kd distill`, and `kd cache verify` / `info` are run on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from kd import losses, tasks
from kd.cache import Cache
from kd.cache import encoding as encodings
from kd.cache.targets import soft_targets
from kd.cache.verify import verify
from kd.cli import distill, label
from kd.config import LabelConfig
from kd.errors import ConfigError
from tests.helpers import invoke, invoke_cache, label_args, ok, run_readme_snippet

K = 32
TEMPERATURES = (1.0, 4.0)


@pytest.fixture(scope="module")
def caches(lm_world, tmp_path_factory) -> dict[str, Path]:
    """The same teacher and data labeled as float32 top-k, float16 top-k and compact."""
    root = tmp_path_factory.mktemp("compact")
    out = {"float32": root / "float32", "float16": root / "float16", "compact": root / "compact"}
    ok(invoke(label.main, *label_args(lm_world, out["float32"], "--top-k", K, "--logit-dtype", "float32")))
    ok(invoke(label.main, *label_args(lm_world, out["float16"], "--top-k", K)))
    ok(invoke(label.main, *label_args(lm_world, out["compact"], "--top-k", K, "--encoding", "compact")))
    return out


def bound(truth: np.ndarray) -> np.ndarray:
    """The documented error bound of each entry: half the spacing of the levels around it, or one
    step for an entry within half a step of the row's maximum (kept off code 0)."""
    half = 0.51 * (encodings.STEP + encodings.GROWTH * np.abs(truth))
    return np.where(truth > -encodings.STEP / 2, encodings.STEP * 1.01, half)


def by_id(idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.take_along_axis(values, np.argsort(idx, axis=1, kind="stable"), 1)


@pytest.mark.integration
def test_compact_rows_decode_to_the_float32_truth_within_the_recorded_bound(caches):
    truth_cache, compact_cache = Cache.open(caches["float32"]), Cache.open(caches["compact"])
    manifest = compact_cache.manifest
    assert manifest["schema_version"] == 2 and manifest["encoding"]["name"] == "compact"
    assert verify(caches["compact"], tasks.for_manifest) == []
    worst = 0.0
    for split in ("labeled", "unlabeled", "test"):
        truth = truth_cache.soft_targets(split, list(TEMPERATURES))
        got = compact_cache.soft_targets(split, list(TEMPERATURES))
        np.testing.assert_array_equal(got.ids, truth.ids)
        np.testing.assert_array_equal(got.view, truth.view)
        for t in TEMPERATURES:
            np.testing.assert_array_equal(got.lse[t], truth.lse[t])
        assert got.topk_idx.dtype == np.int32 and got.topk_logit.dtype == np.float32
        # the same ids, the same top-1, the first logit exactly 0, descending
        np.testing.assert_array_equal(np.sort(got.topk_idx, 1), np.sort(truth.topk_idx, 1))
        np.testing.assert_array_equal(got.topk_idx[:, 0], truth.topk_idx[:, 0])
        assert (got.topk_logit[:, 0] == 0).all() and (np.diff(got.topk_logit, axis=1) <= 0).all()
        # every entry within its bound, and within the largest error the manifest records
        error = np.abs(by_id(got.topk_idx, got.topk_logit) - by_id(truth.topk_idx, truth.topk_logit))
        assert (error <= bound(by_id(truth.topk_idx, truth.topk_logit))).all()
        worst = max(worst, float(error.max()))
        # the order is topk's wherever the truth tells two entries apart by more than the error
        rank = np.argsort(np.argsort(got.topk_idx, axis=1, kind="stable"), axis=1)  # each entry's place by id
        truth_in_got_order = np.take_along_axis(by_id(truth.topk_idx, truth.topk_logit), rank, 1)
        assert (np.diff(truth_in_got_order, axis=1) <= 2 * manifest["encoding"]["max_abs_error"] + 1e-6).all()
    assert manifest["encoding"]["max_abs_error"] == pytest.approx(worst)


@pytest.mark.integration
def test_the_writers_fidelity_statistics_are_of_the_decoded_values(caches):
    """KL(full || decoded) and kept mass come from what a student reads: close to float32
    top-k's, and the compact cache's own (not a copy of the truth's)."""
    truth = Cache.open(caches["float32"]).manifest["fidelity"]
    compact = Cache.open(caches["compact"]).manifest["fidelity"]
    for split in ("labeled", "test"):
        assert compact[split]["teacher_accuracy"] == truth[split]["teacher_accuracy"]
        for t in ("t1", "t4"):
            assert compact[split][t]["kl_full_to_cached"] == pytest.approx(truth[split][t]["kl_full_to_cached"],
                                                                          abs=2e-3)
            assert compact[split][t]["kept_mass"] == pytest.approx(truth[split][t]["kept_mass"], abs=2e-3)
        assert compact[split]["t1"]["kl_full_to_cached"] != truth[split]["t1"]["kl_full_to_cached"]


@pytest.mark.integration
def test_parts_hold_the_compact_columns_in_their_documented_types_and_encodings(caches):
    path = caches["compact"] / "soft_targets/split=test/part-00000.parquet"
    schema = pq.read_schema(path)
    assert schema.names == ["id", "view", "position", "topk_gap", "topk_code", "logit_max", "lse_t1", "lse_t4"]
    assert str(schema.field("topk_gap").type) == f"fixed_size_list<element: uint16>[{K}]"  # 512 ids need 9 bits
    assert str(schema.field("topk_code").type) == f"fixed_size_list<element: uint8>[{K}]"
    columns = pq.ParquetFile(path).metadata.row_group(0)
    used = {columns.column(i).path_in_schema: columns.column(i).encodings for i in range(columns.num_columns)}
    assert "BYTE_STREAM_SPLIT" in used["topk_gap.list.element"]
    assert "BYTE_STREAM_SPLIT" in used["topk_code.list.element"]
    table = pq.read_table(path)
    gaps = np.stack(table["topk_gap"].to_numpy(zero_copy_only=False))
    assert (gaps[:, 1:] >= 1).all()  # ascending ids
    codes = np.stack(table["topk_code"].to_numpy(zero_copy_only=False))
    assert ((codes == 0).sum(1) == 1).all()  # code 0: the top entry alone


@pytest.mark.integration
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_the_soft_loss_from_a_compact_cache_is_within_tolerance_of_the_float32_caches(caches, tail):
    """Stated tolerance: 1% of the loss (measured: about 0.1%). Each kept log-probability is
    off by at most half a level spacing / T, so the loss moves by a small fraction of itself."""
    truth = Cache.open(caches["float32"]).soft_targets("test", [4.0])
    compact = Cache.open(caches["compact"]).soft_targets("test", [4.0])
    for seed, scale in ((0, 1.0), (1, 3.0), (2, 0.3)):
        student = torch.randn(len(truth.ids), 512, generator=torch.Generator().manual_seed(seed)) * scale
        value = {}
        for name, soft in (("truth", truth), ("compact", compact)):
            value[name] = float(losses.topk_soft_target_loss(
                student, torch.tensor(soft.topk_idx).long(), torch.tensor(soft.topk_logit, dtype=torch.float32),
                torch.tensor(soft.lse[4.0]), 4.0, tail=tail))
        assert value["compact"] == pytest.approx(value["truth"], rel=1e-2)


@pytest.mark.integration
def test_a_causal_student_trains_from_a_compact_cache_through_the_cli(caches, lm_world, tmp_path):
    params = tmp_path / "params.yaml"
    student = {"arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "epochs": 1,
               "batch_size": 16, "lr": 0.003, "loss": {"soft": {"weight": 0.5, "temperature": 4},
                                                       "hard": {"weight": 0.5, "labels": True}}}
    params.write_text(yaml.safe_dump({"text_students": {"s": student}}))
    logs = {}
    for name in ("float32", "compact"):
        ok(invoke(distill.main, "s", "--no-progress", "--cache", caches[name], "--prepared", lm_world / "prepared",
                  "--students-dir", tmp_path / name, "--params", params))
        logs[name] = (tmp_path / name / "s" / "train_log.csv").read_text().splitlines()
    header = logs["compact"][0].split(",")
    got, want = (dict(zip(header, logs[n][1].split(","))) for n in ("compact", "float32"))
    # one epoch on the same batches; the weights part ways a little, so the epoch's soft term is
    # compared at 5% (the loss itself, on fixed logits, is held to 1% above)
    assert float(got["soft"]) == pytest.approx(float(want["soft"]), rel=5e-2)
    assert np.isfinite(float(got["total"]))


@pytest.mark.integration
def test_verify_catches_a_corrupt_compact_part(caches, tmp_path):
    import shutil

    out = Path(shutil.copytree(caches["compact"], tmp_path / "cache"))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["test"]["parts"][0]
    path = out / entry["path"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    problems = verify(out, tasks.for_manifest)
    assert len(problems) == 1 and entry["path"] in problems[0] and "sha256" in problems[0]
    # a part rewritten with a repeated id and a second code 0, its checksum updated to match
    shutil.copy(caches["compact"] / entry["path"], path)
    table = pq.read_table(path)
    gaps = np.stack(table["topk_gap"].to_numpy(zero_copy_only=False))
    codes = np.stack(table["topk_code"].to_numpy(zero_copy_only=False))
    gaps[3, 5], codes[4, np.argmax(codes[4] > 0)] = 0, 0
    import pyarrow as pa

    table = table.set_column(3, "topk_gap", pa.FixedSizeListArray.from_arrays(pa.array(gaps.reshape(-1),
                                                                                       pa.uint16()), K))
    table = table.set_column(4, "topk_code", pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1),
                                                                                        pa.uint8()), K))
    pq.write_table(table, path)
    from kd.cache.store import Store

    entry["bytes"], entry["sha256"] = path.stat().st_size, Store(out).sha256(entry["path"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(out, tasks.for_manifest)
    assert len(problems) == 2, problems
    assert any("topk_gap" in p and entry["path"] in p for p in problems)
    assert any("topk_code" in p and entry["path"] in p for p in problems)
    result = invoke_cache("verify", out)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 2


@pytest.mark.integration
def test_cache_info_reports_bytes_per_row_for_both_encodings(caches):
    sizes = {}
    for name in ("float16", "compact"):
        summary = json.loads(ok(invoke_cache("info", caches[name], "--json")).stdout)
        manifest = json.loads((caches[name] / "manifest.json").read_text())
        for split, info in summary["splits"].items():
            parts = manifest["splits"][split]["parts"]
            assert info["bytes_per_row"] == pytest.approx(sum(p["bytes"] for p in parts) / info["rows"])
        sizes[name] = summary["splits"]["labeled"]["bytes_per_row"]
        assert summary["encoding"]["name"] == ("topk" if name == "float16" else "compact")
        text = ok(invoke_cache("info", caches[name])).stdout
        assert f"{summary['splits']['test']['bytes_per_row']:.1f} B/row" in text and "KL" in text
    assert sizes["compact"] < 0.8 * sizes["float16"]
    text = ok(invoke_cache("info", caches["compact"])).stdout
    error = json.loads((caches["compact"] / "manifest.json").read_text())["encoding"]["max_abs_error"]
    assert "compact (ids as gaps" in text and f"largest error {error:.3g}" in text


@pytest.mark.integration
def test_readme_decodes_a_compact_row_with_numpy_alone(caches, tmp_path, monkeypatch):
    scope = run_readme_snippet("decode-compact", caches["compact"], tmp_path, monkeypatch)
    soft = Cache.open(tmp_path / "data" / "teacher_outputs").soft_targets("test", [])
    np.testing.assert_array_equal(scope["ids"], soft.topk_idx[0])
    np.testing.assert_array_equal(scope["logit"], soft.topk_logit[0])


@pytest.mark.unit
def test_encode_decode_on_lm_like_logits_keeps_ids_top1_and_the_bound():
    """Straight through the functions the writer and reader call, on 32k-class logits with a
    few rows whose logits reach below the last level (-408: clamped there)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 32000, generator=g) * 3
    logits[:4, 1000:1100] = -1000.0  # far below every level
    cols = soft_targets(logits, 128, [1.0], "float32")
    cols["topk_logit"][:4, -8:] = -1000.0
    encoding = encodings.header("compact")
    stored = encodings.encode(cols, encoding)
    assert stored["topk_gap"].max() < 32000 and stored["topk_code"].dtype == np.uint8
    idx, logit = encodings.decode(stored, encoding)
    np.testing.assert_array_equal(np.sort(idx, 1), np.sort(cols["topk_idx"], 1))
    np.testing.assert_array_equal(idx[:, 0], cols["topk_idx"][:, 0])
    truth = by_id(cols["topk_idx"], cols["topk_logit"])
    error = np.abs(by_id(idx, logit) - truth)
    inside = truth >= encodings.levels(encoding)[-1]
    assert (error[inside] <= bound(truth)[inside]).all()
    assert (by_id(idx, logit)[~inside] == encodings.levels(encoding)[-1]).all()


@pytest.mark.unit
def test_an_unknown_encoding_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="label.encoding: 'zip' must be one of"):
        LabelConfig(encoding="zip")


@pytest.mark.integration
def test_shards_write_the_compact_cache_a_single_process_writes(caches, lm_world, tmp_path):
    from kd.cache.store import Store

    sharded = tmp_path / "sharded"
    for shard in (0, 1):
        ok(invoke(label.main, *label_args(lm_world, sharded, "--top-k", K, "--encoding", "compact", "--shard", shard,
                                          "--num-shards", 2)))
    digest = lambda root: {rel: Store(root).sha256(rel) for rel in Store(root).files("")  # noqa: E731
                           if not rel.split("/")[-1].startswith(".lock")}
    assert digest(sharded) == digest(caches["compact"])


@pytest.mark.integration
def test_a_cache_written_before_label_encoding_reads_as_topk(caches, tmp_path):
    import shutil

    out = Path(shutil.copytree(caches["float16"], tmp_path / "cache"))
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["encoding"], manifest["label"]["encoding"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert verify(out, tasks.for_manifest) == []
    want = Cache.open(caches["float16"]).soft_targets("test", [1.0])
    got = Cache.open(out).soft_targets("test", [1.0])
    np.testing.assert_array_equal(got.topk_idx, want.topk_idx)
    np.testing.assert_array_equal(got.topk_logit, want.topk_logit)
    assert json.loads(ok(invoke_cache("info", out, "--json")).stdout)["encoding"] == {"name": "topk"}
