"""Sampled targets (`label.sampling`): tokens drawn from the teacher's full distribution, with counts.

Real files: the tiny text world of conftest (pydoc, a 512-token BPE, a one-layer GPT-2 teacher),
labeled through `kd label` with the full vocabulary as float32 top-k (the truth) and with
`--top-k 1 --sampling 16`, once in one go and once in other batches and parts. The draws are
checked against the truth (the right distribution, the right entropy), against each other
(the same draws whatever the batching), and through `kd cache verify`, `kd cache info` and
`kd distill` with `soft: {targets: sampled}`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kd import tasks
from kd.cache import Cache, sampling
from kd.cache.store import Store
from kd.cache.verify import verify
from kd.cli import distill, label
from kd.config import LabelConfig
from kd.errors import ConfigError
from tests.helpers import invoke, invoke_cache, label_args, ok, run_readme_snippet

DRAWS = 16
VOCAB = 512
TEMPERATURES = (1.0, 4.0)


@pytest.fixture(scope="module")
def caches(lm_world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sampled")
    out = {"full": root / "full", "sampled": root / "sampled", "rebatched": root / "rebatched"}
    ok(invoke(label.main, *label_args(lm_world, out["full"], "--top-k", VOCAB, "--logit-dtype", "float32")))
    ok(invoke(label.main, *label_args(lm_world, out["sampled"], "--top-k", 1, "--sampling", DRAWS)))
    ok(invoke(label.main, *label_args(lm_world, out["rebatched"], "--top-k", 1, "--sampling", DRAWS,
                                      "--batch-size", 100, part_size=7)))
    return out


@pytest.mark.integration
def test_draws_come_from_the_teachers_full_distribution(caches):
    """Over every test row: the drawn classes' mean -log p equals the teacher's entropy in
    expectation (within 5 standard errors), the stored entropy is the truth's, and every draw
    has probability > 0."""
    full = Cache.open(caches["full"])
    cache = Cache.open(caches["sampled"])
    assert cache.manifest["schema_version"] == sampling.SCHEMA_VERSION
    assert cache.manifest["sampling"] == {"draws": DRAWS, "seed": 0} and cache.draws == DRAWS
    for t in TEMPERATURES:
        truth = full.soft_targets("test", [t])
        got = cache.soft_targets("test", [t], samples=[t])
        np.testing.assert_array_equal(got.ids, truth.ids)
        np.testing.assert_array_equal(got.topk_idx[:, 0], truth.topk_idx[:, 0])  # the top-1 kept
        log_p = np.full((len(truth.ids), VOCAB), -np.inf)
        np.put_along_axis(log_p, truth.topk_idx.astype(np.int64), truth.topk_logit / t - truth.lse[t][:, None], 1)
        entropy = -(np.exp(log_p) * np.where(np.isfinite(log_p), log_p, 0)).sum(1)
        np.testing.assert_allclose(got.entropy[t], entropy, rtol=1e-4, atol=1e-5)
        idx, count = got.samples[t]
        assert idx.shape == count.shape == (len(got.ids), DRAWS)
        assert (count.sum(1) == DRAWS).all()
        surprise = np.take_along_axis(-log_p, idx, 1)
        assert np.isfinite(surprise[count > 0]).all()
        per_row = (np.where(count > 0, surprise, 0) * count).sum(1) / DRAWS - entropy
        assert abs(per_row.mean()) <= 5 * per_row.std() / np.sqrt(len(per_row))
        assert per_row.std() > 0


@pytest.mark.integration
def test_the_draws_are_the_same_whatever_the_batches_and_parts(caches):
    one, other = Cache.open(caches["sampled"]), Cache.open(caches["rebatched"])
    assert len(one.split("labeled")["parts"]) != len(other.split("labeled")["parts"])
    for split in ("labeled", "unlabeled", "test"):
        a = one.soft_targets(split, [1.0], samples=list(TEMPERATURES))
        b = other.soft_targets(split, [1.0], samples=list(TEMPERATURES))
        np.testing.assert_array_equal(a.ids, b.ids)
        for t in TEMPERATURES:
            np.testing.assert_array_equal(a.samples[t][0], b.samples[t][0])
            np.testing.assert_array_equal(a.samples[t][1], b.samples[t][1])
            np.testing.assert_array_equal(a.entropy[t], b.entropy[t])
        # and the two temperatures (and neighbouring rows) draw differently
        assert not np.array_equal(a.samples[1.0][0], a.samples[4.0][0])


@pytest.mark.integration
def test_parts_hold_the_sampled_columns_in_their_documented_types(caches):
    schema = pq.read_schema(caches["sampled"] / "soft_targets/split=test/part-00000.parquet")
    assert schema.names == ["id", "view", "position", "topk_idx", "topk_logit", "logit_max", "lse_t1", "lse_t4",
                            "sample_idx_t1", "sample_count_t1", "entropy_t1",
                            "sample_idx_t4", "sample_count_t4", "entropy_t4"]
    assert str(schema.field("sample_idx_t1").type) == "list<element: uint16>"  # 512 ids need 9 bits
    assert str(schema.field("sample_count_t1").type) == "list<element: uint8>"
    assert str(schema.field("entropy_t4").type) == "float"


@pytest.mark.integration
def test_cache_info_reports_the_draws_fidelity_and_bytes(caches):
    summary = json.loads(ok(invoke_cache("info", caches["sampled"], "--json")).stdout)
    assert summary["sampling"] == {"draws": DRAWS, "seed": 0}
    full = Cache.open(caches["full"]).manifest["fidelity"]
    for split, info in summary["splits"].items():
        assert info["bytes_per_row"] > 0
        for t in ("t1", "t4"):
            stats = summary["fidelity"][split][t]
            # the drawn classes hold part of the mass; the full top-k (k = V) holds all of it
            assert 0 < stats["sampled_mass"] < 1 and full[split][t]["kept_mass"] == pytest.approx(1, abs=1e-5)
            assert stats["kl_full_to_sampled"] > 0
        # more draws than distinct classes at T=1 (peaked) than at T=4 (flat): more mass drawn at T=1
        assert summary["fidelity"][split]["t1"]["sampled_mass"] > summary["fidelity"][split]["t4"]["sampled_mass"]
    text = ok(invoke_cache("info", caches["sampled"])).stdout
    assert f"{DRAWS} tokens drawn from the teacher per row and temperature" in text and "drawn 0." in text
    ok(invoke_cache("verify", caches["sampled"]))


def _rewrite(out: Path, entry: dict, table: pa.Table, manifest: dict) -> None:
    path = out / entry["path"]
    pq.write_table(table, path)
    entry["bytes"], entry["sha256"] = path.stat().st_size, Store(out).sha256(entry["path"])
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.integration
def test_verify_checks_the_counts_and_the_ids(caches, tmp_path):
    out = Path(shutil.copytree(caches["sampled"], tmp_path / "cache"))
    assert verify(out, tasks.for_manifest) == []
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["test"]["parts"][0]
    table = pq.read_table(out / entry["path"])
    idx, count = sampling.from_arrow(table["sample_idx_t1"], table["sample_count_t1"], DRAWS)
    count[2, 0] += 1  # the counts of row 2 no longer sum to the draws
    idx[5, 0] = VOCAB  # an id out of range
    idx[7, :2] = idx[7, 1] if count[7, 1] else idx[7, 0]  # a class twice (or a row of one class, unchanged)
    arrays = sampling.to_arrow(idx, count, pa.uint16(), pa.uint8())
    table = table.set_column(table.schema.get_field_index("sample_idx_t1"), "sample_idx_t1", arrays[0])
    table = table.set_column(table.schema.get_field_index("sample_count_t1"), "sample_count_t1", arrays[1])
    _rewrite(out, entry, table, manifest)
    problems = verify(out, tasks.for_manifest)
    assert any("sample_count_t1 does not sum to label.sampling = 16" in p for p in problems), problems
    assert any("sample_idx_t1 outside [0, 512)" in p for p in problems), problems
    result = invoke_cache("verify", out)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == len(problems)


def _student(tmp_path: Path, **soft) -> Path:
    params = tmp_path / "params.yaml"
    student = {"arch": "gpt2", "arch_kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "epochs": 1,
               "batch_size": 16, "lr": 0.003, "loss": {"soft": {"weight": 0.5, "temperature": 1, **soft},
                                                       "hard": {"weight": 0.5, "labels": True}}}
    params.write_text(yaml.safe_dump({"text_students": {"s": student}}))
    return params


@pytest.mark.integration
def test_a_student_trains_from_sampled_targets_through_the_cli(caches, lm_world, tmp_path):
    params = _student(tmp_path, targets="sampled")
    ok(invoke(distill.main, "s", "--no-progress", "--cache", caches["sampled"], "--prepared", lm_world / "prepared",
              "--students-dir", tmp_path / "students", "--params", params))
    log = (tmp_path / "students" / "s" / "train_log.csv").read_text().splitlines()
    row = dict(zip(log[0].split(","), log[1].split(",")))
    assert np.isfinite(float(row["soft"])) and np.isfinite(float(row["total"]))


@pytest.mark.integration
def test_sampled_targets_from_a_cache_without_them_are_refused_in_one_line(caches, lm_world, tmp_path):
    params = _student(tmp_path, targets="sampled")
    result = invoke(distill.main, "s", "--no-progress", "--cache", caches["full"], "--prepared",
                    lm_world / "prepared", "--students-dir", tmp_path / "students", "--params", params)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "targets: sampled" in result.stderr and "label.sampling" in result.stderr
    assert not (tmp_path / "students" / "s").exists()


@pytest.mark.unit
@pytest.mark.parametrize("value", [0, -3, True, 2.5, 70000])
def test_label_sampling_must_be_a_number_of_draws(value):
    with pytest.raises(ConfigError, match="label.sampling"):
        LabelConfig(sampling=value)


@pytest.mark.unit
def test_label_sampling_seed_must_not_be_negative():
    with pytest.raises(ConfigError, match="label.sampling_seed"):
        LabelConfig(sampling=4, sampling_seed=-1)


@pytest.mark.integration
def test_sampling_keys_stay_out_of_the_cache_key_when_off(lm_world):
    from kd.cache.writer import Teacher, cache_key

    teacher = Teacher(model=None, fingerprint="x", config={})
    assert "sampling" not in cache_key(teacher, {}, LabelConfig())["label"]
    assert cache_key(teacher, {}, LabelConfig(sampling=8))["label"]["sampling"] == 8


@pytest.mark.integration
def test_readme_decodes_a_sampled_row_with_numpy_alone(caches, tmp_path, monkeypatch):
    scope = run_readme_snippet("decode-sampled", caches["sampled"], tmp_path, monkeypatch)
    soft = Cache.open(tmp_path / "data" / "teacher_outputs").soft_targets("test", [], samples=[1.0])
    idx, count = soft.samples[1.0]
    kept = count[0] > 0
    np.testing.assert_array_equal(scope["ids"], idx[0][kept])
    np.testing.assert_array_equal(scope["target"], count[0][kept] / DRAWS)
    assert scope["entropy"] == pytest.approx(float(soft.entropy[1.0][0]))


@pytest.mark.unit
def test_the_draws_fidelity_is_the_kl_to_the_documented_decoding():
    """KL(full || decoded draws) against the decoding written out class by class: count / N of
    the drawn share, Good-Turing's unseen mass (at least 1 / (N + 1)) spread over the rest."""
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g) * 2
    logits[5] = torch.tensor([30.0] + [0.0] * 8)  # every draw the top class: no singleton
    keys = sampling.row_keys(0, np.arange(6), np.zeros(6, np.int32), None, 2.0)
    classes, counts, entropy = sampling.draw(logits, 5, 2.0, keys)
    sums = sampling.fidelity_sums(logits, classes, counts, entropy, 2.0, "t2")
    kl, mass = 0.0, 0.0
    for z, idx, count in zip(logits.double().numpy(), classes, counts):
        p = np.exp(z / 2 - np.log(np.exp(z / 2).sum()))
        drawn = {int(i): int(c) for i, c in zip(idx, count) if c > 0}
        unseen_mass = max(sum(c == 1 for c in drawn.values()), 1) / 6
        q = np.array([drawn[j] / 5 * (1 - unseen_mass) if j in drawn else unseen_mass / (9 - len(drawn))
                      for j in range(9)])
        kl += float((p * np.log(p / q)).sum())
        mass += sum(p[j] for j in drawn)
    assert sums["kl_sampled_t2"] == pytest.approx(kl, rel=1e-5)
    assert sums["sampled_mass_t2"] == pytest.approx(mass, rel=1e-6)


@pytest.mark.unit
def test_the_experiments_params_are_valid_and_its_students_match_its_caches():
    """examples/sampled: its three label sections and every student parse; one distill stage per
    student, each reading the cache its targets need (sampled targets from the sampled cache, the
    top-k arms from the top-32 and compact caches this example labels itself)."""
    from kd.config import section, student, student_names

    root = Path(__file__).parents[1] / "examples" / "sampled"
    sampled = section(root / "params.yaml", "label", LabelConfig)
    compact = section(root / "params_compact.yaml", "label", LabelConfig)
    topk = section(root / "params_topk.yaml", "label", LabelConfig)
    assert sampled.sampling and sampled.top_k == 1 and compact.encoding == "compact" and compact.sampling is None
    assert topk.top_k == 32 and topk.sampling is None and topk.encoding == "topk"  # not the text example's draws
    stages = yaml.safe_load((root / "dvc.yaml").read_text())
    caches = stages["vars"][0]["caches"]
    assert set(caches) == set(student_names(root / "params.yaml"))
    for name in caches:
        cfg = student(root / "params.yaml", name)
        assert cfg.loss.soft.targets == ("sampled" if name.startswith("sampled") else "topk")
        assert cfg.repeats == 3
    for arm in ("topk", "compact", "sampled"):  # each arm reads the cache its own label stage writes
        assert caches[arm] == caches[f"{arm}_hard"] == next(iter(stages["stages"][f"label_{arm}"]["outs"][0]))


@pytest.mark.integration
def test_a_sharded_sampled_cache_is_the_single_process_one(lm_world, tmp_path):
    """Two shards write the same parts and manifest as one process: the draws depend on the row alone."""
    args = ("--top-k", 1, "--sampling", 8, "--temperatures", "1")
    ok(invoke(label.main, *label_args(lm_world, tmp_path / "one", *args, part_size=8)))
    for shard in (0, 1):
        ok(invoke(label.main, *label_args(lm_world, tmp_path / "two", *args, "--shard", shard, "--num-shards", 2,
                                          part_size=8)))
    one, two = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two"))
    assert two["complete"] and two["splits"] == one["splits"] and two["fidelity"] == one["fidelity"]
    assert verify(tmp_path / "two", tasks.for_manifest) == []
