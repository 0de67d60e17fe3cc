"""The teacher-output cache: writer/reader round trips, views, fidelity, resume, verify.

Everything runs on real Parquet and Zarr files in tmp_path with a small real teacher.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from kd import augment, features, losses, sources, tasks
from kd.cache import Cache, Teacher, label, lse_column, soft_targets
from kd.cache.targets import fidelity_sums
from kd.cache.verify import verify
from kd.config import LabelConfig, PrepareConfig, StudentConfig, from_mapping
from kd.errors import CacheError, CacheMissingError, StaleCacheError
from kd.loader import StreamingSet
from kd.prepared import data_fingerprint, images
from kd.tasks import image
from kd.tasks.image_models import build, fingerprint, load_model, save_model
from tests.helpers import doc_snippet

FEATURES = {"stages.0": "full", "stages.1": "attention", "embed": "pooled"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    sources.prepare(PrepareConfig(dataset="digits", labeled=120, unlabeled=200, test=100, seed=0), out)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, prepared) -> tuple[Teacher, Path]:
    """A small CNN on the 8x8 digits, trained for a few steps so its logits are not uniform."""
    torch.manual_seed(0)
    model = build("cnn", {"widths": [4, 8], "hidden": 16}, [1, 8, 8], 10)
    split = images.read_split(prepared / "labeled.parquet")
    x, y = torch.tensor(split.x).view(-1, 1, 8, 8), torch.tensor(split.y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    directory = tmp_path_factory.mktemp("teacher") / "teacher"
    config = {"arch": "cnn", "arch_kwargs": {"widths": [4, 8], "hidden": 16}, "input_shape": [1, 8, 8],
              "num_classes": 10}
    save_model(directory, model, config)
    return Teacher(model, fingerprint(directory), config), directory


def make_cache(teacher, prepared, out, **label_kwargs) -> Path:
    cfg = LabelConfig(**{"top_k": 4, "temperatures": [1, 2.5, 4], "part_size": 64, "batch_size": 50,
                         **label_kwargs})
    label(teacher, prepared, out, cfg, task_inputs=image.Inputs, progress=False)
    return out


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.unit
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_soft_targets_and_features(teacher, prepared, tmp_path, dtype):
    t, _ = teacher
    out = make_cache(t, prepared, tmp_path / "cache", logit_dtype=dtype, features=FEATURES, views=2)
    cache = Cache.open(out)
    for split in ("labeled", "unlabeled", "test"):
        rows = images.read_split(prepared / f"{split}.parquet")
        ids = np.repeat(rows.ids, 3)
        view = np.tile(np.arange(3), len(rows.ids))
        x = augment.apply_views(torch.tensor(rows.x).repeat_interleave(3, 0), ids, view, [1, 8, 8], 0, augment.shift(2))
        with torch.no_grad(), features.tap(t.model, list(FEATURES)) as captured:
            logits = t.model(x.view(-1, 1, 8, 8))
            expected_features = {n: features.reduce(captured[n], m).to(torch.float16).numpy()
                                 for n, m in FEATURES.items()}
        expected = soft_targets(logits, 4, [1, 2.5, 4], dtype)

        got = cache.soft_targets(split, [1, 2.5, 4])
        np.testing.assert_array_equal(got.ids, ids)
        np.testing.assert_array_equal(got.view, view)
        np.testing.assert_array_equal(got.topk_idx, expected["topk_idx"])
        assert got.topk_logit.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got.topk_logit, expected["topk_logit"])
        for t_value in (1, 2.5, 4):
            np.testing.assert_array_equal(got.lse[float(t_value)], expected[lse_column(t_value)])
        np.testing.assert_array_equal(zarr.open_array(out / f"features.zarr/{split}/id", mode="r")[:], ids)
        for name in FEATURES:
            np.testing.assert_array_equal(cache.feature(split, name)[:], expected_features[name])


@pytest.mark.unit
def test_a_compact_image_cache_holds_the_same_rows_views_and_features(teacher, prepared, tmp_path):
    """`label.encoding: compact` changes only how the top-k is stored: ids, views, lse and
    features equal the float32 cache's, the top-k ids as a set and the top-1 exactly, and the
    streamed rows equal the in-memory ones (tests/test_cache_compact.py checks the values)."""
    t, _ = teacher
    kwargs = {"features": {"stages.1": "attention"}, "views": 2}
    truth = Cache.open(make_cache(t, prepared, tmp_path / "truth", logit_dtype="float32", **kwargs))
    compact = Cache.open(make_cache(t, prepared, tmp_path / "compact", encoding="compact", **kwargs))
    assert verify(compact.root, tasks.for_manifest) == []
    assert str(pq.read_schema(compact.root / "soft_targets/split=test/part-00000.parquet").field("topk_gap").type) \
        == "fixed_size_list<element: uint8>[4]"  # 10 classes: one byte per id
    for split in ("labeled", "unlabeled", "test"):
        want, got = truth.soft_targets(split, [1, 2.5, 4]), compact.soft_targets(split, [1, 2.5, 4])
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.view, want.view)
        np.testing.assert_array_equal(np.sort(got.topk_idx, 1), np.sort(want.topk_idx, 1))
        np.testing.assert_array_equal(got.topk_idx[:, 0], want.topk_idx[:, 0])
        for t_value in (1, 2.5, 4):
            np.testing.assert_array_equal(got.lse[float(t_value)], want.lse[float(t_value)])
        np.testing.assert_array_equal(compact.feature(split, "stages.1")[:], truth.feature(split, "stages.1")[:])
    cfg = from_mapping(StudentConfig, {"name": "s", "views": True, "loss": {"soft": {"temperature": 4}}}, "students.s")
    in_memory = image.rows(compact, prepared, cfg, memory_mb=2048)
    streamed = image.rows(compact, prepared, cfg, memory_mb=0)
    for batch in streamed.batches(epoch=0, batch_size=64, seed=0, views="cached"):
        for name in ("topk_idx", "topk_logit"):
            assert torch.equal(batch[name], in_memory.targets[name][batch["row"]]), name


@pytest.mark.unit
def test_a_sampled_image_cache_draws_per_view_and_streams_the_same_targets(teacher, prepared, tmp_path):
    """`label.sampling` on images: every (sample, view) row draws its own tokens at each cached
    temperature, the cache verifies, and a student with `targets: sampled` gets the same draws
    in memory and streamed."""
    t, _ = teacher
    cache = Cache.open(make_cache(t, prepared, tmp_path / "sampled", views=2, sampling=16,
                                  features={"stages.1": "attention"}))
    assert verify(cache.root, tasks.for_manifest) == []
    soft = cache.soft_targets("test", [], samples=[1, 4])
    idx, count = soft.samples[1.0]
    assert (count.sum(1) == 16).all() and idx.max() < 10
    assert not np.array_equal(idx[soft.view == 0], idx[soft.view == 1])  # each view draws its own
    assert not np.array_equal(soft.samples[4.0][0], idx)
    cfg = from_mapping(StudentConfig, {"name": "s", "views": True,
                                       "loss": {"soft": {"temperature": 4, "targets": "sampled"}}}, "students.s")
    in_memory = image.rows(cache, prepared, cfg, memory_mb=2048)
    assert "lse" not in in_memory.targets
    streamed = image.rows(cache, prepared, cfg, memory_mb=0)
    for batch in streamed.batches(epoch=0, batch_size=64, seed=0, views="cached"):
        for name in ("sample_idx", "sample_count", "entropy"):
            assert torch.equal(batch[name], in_memory.targets[name][batch["row"]]), name


@pytest.mark.unit
def test_columns_and_manifest_follow_the_contract(teacher, prepared, tmp_path):
    t, _ = teacher
    out = make_cache(t, prepared, tmp_path / "cache", features={"stages.1": "attention"})
    schema = pq.read_schema(out / "soft_targets/split=test/part-00000.parquet")
    assert schema.names == ["id", "view", "topk_idx", "topk_logit", "logit_max", "lse_t1", "lse_t2_5", "lse_t4"]
    assert str(schema.field("topk_idx").type) == "fixed_size_list<element: int32>[4]"
    assert str(schema.field("topk_logit").type) == "fixed_size_list<element: halffloat>[4]"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["top_k"] == 4
    assert manifest["teacher"]["fingerprint"] == t.fingerprint
    assert manifest["temperatures"] == [1, 2.5, 4] and manifest["logit_dtype"] == "float16"
    assert manifest["features"] == [{"name": "stages.1", "mode": "attention", "shape": [4], "dtype": "float16",
                                     "source_shape": [8, 2, 2]}]
    for split, rows in (("labeled", 120), ("unlabeled", 200), ("test", 100)):
        info = manifest["splits"][split]
        assert info["rows"] == rows
        assert info["data_fingerprint"] == data_fingerprint(prepared / f"{split}.parquet")
        assert sum(p["rows"] for p in info["parts"]) == rows
        assert all(len(p["sha256"]) == 64 for p in info["parts"])
    assert len(manifest["splits"]["unlabeled"]["parts"]) == 4  # 200 samples in parts of 64
    fid = manifest["fidelity"]["test"]
    assert 0 < fid["t4"]["kept_mass"] <= 1 and fid["t1"]["kept_mass"] >= fid["t4"]["kept_mass"]
    assert 0 <= fid["teacher_accuracy"] <= 1
    assert manifest["fidelity"]["unlabeled"]["teacher_accuracy"] is None  # no labels there


@pytest.mark.unit
def test_doc_snippet_reads_the_cache_with_polars_and_zarr_alone(teacher, prepared, tmp_path, monkeypatch):
    """The documentation's snippet (docs/cache.md), run as written on a cache, gives the teacher's
    softmax at T=4 to float16 precision and the cached layers."""
    t, _ = teacher
    make_cache(t, prepared, tmp_path / "data" / "teacher_outputs", features={"stages.1": "attention"})
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(doc_snippet("read-cache"), scope)
    p, df, feats = scope["p"], scope["df"], scope["feats"]
    test = images.read_split(prepared / "test.parquet")
    with torch.no_grad():
        full = torch.softmax(t.model(torch.tensor(test.x).view(-1, 1, 8, 8)) / 4, 1).numpy()
    order = {i: n for n, i in enumerate(test.ids)}
    full = full[[order[i] for i in df["id"].to_list()]]
    np.testing.assert_allclose(p, np.take_along_axis(full, df["topk_idx"].to_numpy(), 1), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(scope["tail"], 1 - p.sum(1))
    assert (scope["tail"] > -1e-3).all()
    np.testing.assert_array_equal(feats["id"][:], df["id"].to_numpy())
    assert feats["stages.1"].shape == (100, 4)


@pytest.mark.unit
def test_float16_clamps_below_range_instead_of_inf():
    logits = torch.tensor([[0.0, -1e6, 5.0, -70000.0]])
    cols = soft_targets(logits, 4, [1], "float16")
    assert np.isfinite(cols["topk_logit"]).all()
    assert cols["topk_logit"][0, 0] == 0 and cols["logit_max"][0] == 5.0


@pytest.mark.unit
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_k_equal_classes_reproduces_full_logit_kd(tail):
    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(64, 10, generator=g) * 5
    student_logits = torch.randn(64, 10, generator=g) * 3
    cols = soft_targets(teacher_logits, 10, [4], "float32")
    got = losses.topk_soft_target_loss(student_logits, torch.tensor(cols["topk_idx"]).long(),
                                       torch.tensor(cols["topk_logit"]), torch.tensor(cols["lse_t4"]), 4, tail=tail)
    full = losses.soft_target_loss(student_logits, teacher_logits, 4)
    assert abs(float(got) - float(full)) <= 1e-6 * max(1.0, abs(float(full)))


@pytest.mark.unit
def test_fidelity_statistics_on_a_hand_built_example():
    # Two rows, 4 classes, k=2, T=1. Row 0: p = (0.5, 0.25, 0.125, 0.125). Row 1: p uniform.
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]]))
    cols = soft_targets(logits, 2, [1], "float32")
    sums = fidelity_sums(logits, cols, [1])
    assert sums["kept_mass_t1"] == pytest.approx(0.75 + 0.5, abs=1e-6)
    # Row 0: tail 0.25 spread as 0.125 + 0.125 equals the truth -> KL 0. Row 1 also exact -> 0.
    assert sums["kl_t1"] == pytest.approx(0.0, abs=1e-6)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sums = fidelity_sums(logits, soft_targets(logits, 2, [1], "float32"), [1])
    expected_kl = 0.15 * np.log(0.15 / 0.1) + 0.05 * np.log(0.05 / 0.1)
    assert sums["kl_t1"] == pytest.approx(expected_kl, abs=1e-6)


@pytest.mark.unit
def test_views_regenerate_the_teachers_input_bit_for_bit(teacher, prepared, tmp_path):
    """The student's loader rebuilds each cached (id, view) input exactly as the teacher saw it."""
    t, _ = teacher
    seen: list[torch.Tensor] = []
    handle = t.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:  # the writer feeds rows in cache order, so the captured inputs line up with cache rows
        out = make_cache(t, prepared, tmp_path / "cache", views=3, view_seed=11)
    finally:
        handle.remove()
    teacher_inputs = torch.cat(seen[1:])  # seen[0] is the shape probe
    cache = Cache.open(out)
    cfg = from_mapping(StudentConfig, {"name": "s", "views": True, "transfer": ["labeled", "unlabeled"],
                                       "loss": {"soft": {"temperature": 4}}}, "students.s")
    dataset = image.rows(cache, prepared, cfg, memory_mb=2048)
    labeled_rows = cache.split("labeled")["rows"]
    assert len(teacher_inputs) == labeled_rows + cache.split("unlabeled")["rows"] + cache.split("test")["rows"]
    views_used = set()
    for batch in dataset.batches(epoch=0, batch_size=64, seed=0, views="cached"):
        # transfer rows are labeled then unlabeled; the writer labeled splits in the same order
        assert torch.equal(batch["x"], teacher_inputs[batch["row"]])
        views_used.update((batch["row"] % 4).tolist())
    assert views_used == {0, 1, 2, 3}


@pytest.mark.unit
def test_view_shift_is_a_pure_function_and_matches_a_plain_shift():
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 64)
    ids, views = np.array([7, 7]), np.array([0, 5])
    once = augment.apply_views(x, ids, views, [1, 8, 8], seed=3, recipe=augment.shift(2))
    again = augment.apply_views(x.clone(), ids, views, [1, 8, 8], seed=3, recipe=augment.shift(2))
    assert torch.equal(once, again) and torch.equal(once[0], x[0])
    dy, dx = augment.view_shifts(ids, views, 3, 2, 2)[1]
    image = x[1].view(8, 8).numpy()
    expected = np.zeros_like(image)
    for r in range(8):
        for c in range(8):
            if 0 <= r - dy < 8 and 0 <= c - dx < 8:
                expected[r, c] = image[r - dy, c - dx]
    np.testing.assert_array_equal(once[1].view(8, 8).numpy(), expected)
    assert augment.view_shifts(np.arange(1000), np.ones(1000), 3, 2, 2).std(0).min() > 1  # not constant


@pytest.mark.unit
def test_same_key_leaves_the_cache_untouched_and_new_key_rebuilds(teacher, prepared, tmp_path):
    t, _ = teacher
    out = make_cache(t, prepared, tmp_path / "cache")
    before = tree_digest(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    make_cache(t, prepared, out)
    assert tree_digest(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == mtimes
    make_cache(t, prepared, out, top_k=3)
    assert Cache.open(out).manifest["top_k"] == 3 and verify(out, tasks.for_manifest) == []


@pytest.mark.unit
def test_student_refused_when_cache_lacks_what_it_needs(teacher, prepared, tmp_path):
    t, _ = teacher
    cache = Cache.open(make_cache(t, prepared, tmp_path / "cache"))
    with pytest.raises(CacheMissingError, match=r"add 3 to label.temperatures"):
        cache.require(temperatures=[3])
    with pytest.raises(CacheMissingError, match=r"set label.features.embed: pooled"):
        cache.require(features={"embed": "pooled"})
    with pytest.raises(CacheMissingError, match=r"set label.views"):
        cache.require(views=True)


@pytest.mark.unit
def test_stale_cache_is_refused(teacher, prepared, tmp_path):
    t, _ = teacher
    cache = Cache.open(make_cache(t, prepared, tmp_path / "cache"))
    other = tmp_path / "other"
    sources.prepare(PrepareConfig(dataset="digits", labeled=120, unlabeled=200, test=100, seed=1), other)
    with pytest.raises(StaleCacheError, match="data fingerprint differs"):
        cache.check(other, ["labeled"])


@pytest.mark.unit
def test_incomplete_cache_is_refused(teacher, prepared, tmp_path):
    t, _ = teacher
    out = make_cache(t, prepared, tmp_path / "cache")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="incomplete"):
        Cache.open(out)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import pyarrow.parquet as pq, zarr
    from kd.cache import Teacher, label
    from kd.config import LabelConfig
    from kd.tasks import image
    from kd.tasks.image_models import fingerprint, load_model

    teacher_dir, prepared, out, what, after = sys.argv[1:6]
    calls = 0
    def die_after(original):
        def wrapped(*args, **kwargs):
            global calls
            calls += 1
            if calls > int(after):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return wrapped
    if what == "parquet":   # inside a part: the temporary Parquet file is open
        pq.ParquetWriter.write_table = die_after(pq.ParquetWriter.write_table)
    else:                   # inside a part: Zarr chunks half written
        zarr.Array.__setitem__ = die_after(zarr.Array.__setitem__)
    model, config = load_model(__import__("pathlib").Path(teacher_dir))
    cfg = LabelConfig(top_k=4, temperatures=[1, 4], part_size=16, batch_size=8, features={"stages.0": "full"})
    label(Teacher(model, fingerprint(__import__("pathlib").Path(teacher_dir)), config),
          __import__("pathlib").Path(prepared), __import__("pathlib").Path(out), cfg, task_inputs=image.Inputs,
          progress=False)
""")


@pytest.mark.integration
@pytest.mark.parametrize("what,after", [
    ("parquet", 3), ("parquet", 17), ("zarr", 5),
    *[pytest.param(what, after, marks=pytest.mark.slow)
      for what, after in [("parquet", 1), ("parquet", 9), ("parquet", 26), ("zarr", 1), ("zarr", 12), ("zarr", 40)]],
])
def test_sigkill_mid_label_then_rerun_equals_uninterrupted(teacher, prepared, tmp_path, what, after, child_env,
                                                          capfd):
    _, teacher_dir = teacher
    model, config = load_model(teacher_dir)  # as `kd label` loads it
    t = Teacher(model, fingerprint(teacher_dir), config)
    reference = tmp_path / "reference"
    label(t, prepared, reference, LabelConfig(top_k=4, temperatures=[1, 4], part_size=16, batch_size=8,
                                              features={"stages.0": "full"}), task_inputs=image.Inputs, progress=False)
    out = tmp_path / "cache"
    args = [sys.executable, "-c", KILL_SCRIPT, str(teacher_dir), str(prepared), str(out), what, str(after)]
    killed = subprocess.run(args, capture_output=True, text=True, env=child_env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    for info in manifest["splits"].values():  # the manifest never lists a part that is not there
        assert all((out / p["path"]).is_file() for p in info["parts"])
    assert not any(p.name.endswith(".parquet") and p.stat().st_size == 0 for p in out.rglob("*"))
    written = sum(len(info["parts"]) for info in manifest["splits"].values())
    label(t, prepared, out, LabelConfig(top_k=4, temperatures=[1, 4], part_size=16, batch_size=8,
                                        features={"stages.0": "full"}), task_inputs=image.Inputs, progress=False)
    said = capfd.readouterr().err
    if written:  # the rerun says where it resumes
        assert f"kd label: resuming {out} after {written} of " in said, said
    assert tree_digest(out) == tree_digest(reference)
    assert verify(out, tasks.for_manifest) == []


@pytest.mark.unit
def test_second_writer_fails_at_once(teacher, prepared, tmp_path):
    from kd.cache.shards import locked

    out = tmp_path / "cache"
    with locked(out):
        with pytest.raises(CacheError, match="another `kd label` is writing"):
            make_cache(teacher[0], prepared, out)
    make_cache(teacher[0], prepared, out)
    assert verify(out, tasks.for_manifest) == []


@pytest.mark.unit
def test_manifest_paths_cannot_leave_the_cache(teacher, prepared, tmp_path):
    t, _ = teacher
    out = make_cache(t, prepared, tmp_path / "cache")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["test"]["parts"][0]["path"] = "../../etc/passwd"
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(out, tasks.for_manifest)
    assert len(problems) == 1 and "not inside the cache" in problems[0]
    with pytest.raises(CacheError, match="not inside the cache"):
        Cache.open(out)


@pytest.mark.unit
def test_streaming_set_serves_every_row_once_with_the_same_targets(teacher, prepared, tmp_path):
    t, _ = teacher
    cache = Cache.open(make_cache(t, prepared, tmp_path / "cache", part_size=32, views=1))
    cfg = from_mapping(StudentConfig, {"name": "s", "views": True,
                                       "loss": {"soft": {"temperature": 4}, "hard": {"pseudo": True}}}, "students.s")
    in_memory = image.rows(cache, prepared, cfg, memory_mb=2048)
    streamed = image.rows(cache, prepared, cfg, memory_mb=0)  # nothing fits: stream
    assert isinstance(streamed, StreamingSet) and len(streamed) == len(in_memory) == 320
    rows = []
    for batch in streamed.batches(epoch=0, batch_size=16, seed=0, views="cached"):
        reference = {name: target[batch["row"]] for name, target in in_memory.targets.items()}
        for name, value in batch.items():
            if name != "x":
                assert torch.equal(value, reference[name]), name
        sample = batch["row"] // 2
        assert torch.equal(batch["x"], torch.stack([
            augment.apply_views(in_memory.inputs["x"][i:i + 1], in_memory.ids[i:i + 1], np.array([int(r) % 2]),
                                [1, 8, 8], 0, augment.shift(2))[0].view(1, 8, 8)
            for i, r in zip(sample.tolist(), batch["row"])]))
        rows += batch["row"].tolist()
    assert sorted(r // 2 for r in rows) == list(range(320))  # every sample exactly once
    first_order = rows[:16]
    again = next(iter(streamed.batches(epoch=0, batch_size=16, seed=0, views="cached")))["row"].tolist()
    other = next(iter(streamed.batches(epoch=1, batch_size=16, seed=0, views="cached")))["row"].tolist()
    assert again == first_order and other != first_order
