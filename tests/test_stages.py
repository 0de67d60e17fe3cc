"""`kd teacher`, `kd label`, `kd distill` and `kd cache info/verify` through typer's CliRunner.

Real files on tmp_path: the 8x8 `digits` dataset (200 labeled, 300 unlabeled, 200 test), a
2-epoch MLP teacher and 1-2 epoch students. The prepared data, the teacher and two caches (one
plain, one holding the MLP layer `hidden.0` in full) are built once per module; a test that
corrupts or rewrites any of them works on its own copy (shutil.copytree into its tmp_path).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from safetensors.torch import load_file

from kd.cli import distill, label, prepare, teacher
from tests.helpers import assert_clean_error, invoke, invoke_cache, ok, students_params, tiny_student

pytestmark = pytest.mark.integration

TEACHER_ARGS = ("--arch", "mlp", "--arch-kwargs", '{"hidden": [32]}', "--epochs", "2")
SIZES = {"labeled": 200, "unlabeled": 300, "test": 200}
FEATURE_LAYER = "hidden.0"  # the MLP teacher's first hidden layer: a (32,) vector per sample
PART_SIZE = 128


@dataclass
class Built:
    root: Path
    params: Path  # an empty params.yaml: every stage on its built-in defaults
    prepared: Path
    teacher: Path
    cache: Path  # `kd label` defaults (top-5, T in [1, 4], float16, no features), 128 samples per part
    feature_cache: Path  # the same plus --feature hidden.0=full


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("stages")
    params = root / "params.yaml"
    params.write_text("{}\n")
    b = Built(root, params, root / "prepared", root / "teacher", root / "cache", root / "feature_cache")
    ok(invoke(prepare.main, "--dataset", "digits", "--labeled", SIZES["labeled"], "--unlabeled",
              SIZES["unlabeled"], "--test", SIZES["test"], "--params", params, "--out", b.prepared))
    ok(invoke(teacher.main, *TEACHER_ARGS, "--no-progress", "--prepared", b.prepared, "--out", b.teacher,
              "--params", params))
    ok(invoke(label.main, *label_paths(b, b.cache)))
    ok(invoke(label.main, "--feature", f"{FEATURE_LAYER}=full", *label_paths(b, b.feature_cache)))
    return b


# --- helpers ---------------------------------------------------------------------------------


def label_paths(b: Built, out: Path, teacher_dir: Path | None = None) -> list[Any]:
    # 128 samples per part: two or three parts per split, so part lists and chunk offsets matter
    return ["--no-progress", "--part-size", PART_SIZE, "--teacher", teacher_dir or b.teacher,
            "--prepared", b.prepared, "--out", out, "--params", b.params]


def distill_paths(b: Built, params: Path, tmp: Path, cache: Path | None = None,
                  prepared: Path | None = None) -> list[Any]:
    return ["--no-progress", "--cache", cache or b.cache, "--prepared", prepared or b.prepared,
            "--students-dir", tmp / "students", "--baselines", tmp / "baselines", "--params", params]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file (the writer's lock file aside)."""
    return {str(p.relative_to(root)): (sha256(p), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def copy_cache(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def manifest_of(cache: Path) -> dict[str, Any]:
    return json.loads((cache / "manifest.json").read_text())


def write_manifest(cache: Path, manifest: dict[str, Any]) -> None:
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2))


def part(cache: Path, split: str = "labeled", index: int = 0) -> Path:
    return cache / manifest_of(cache)["splits"][split]["parts"][index]["path"]


def parts_table(cache: Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """Every part of a split, in manifest order (the cache's row order)."""
    entries = manifest_of(cache)["splits"][split]["parts"]
    return pa.concat_tables([pq.read_table(cache / e["path"], columns=columns) for e in entries])


def flip_byte(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    offset = len(raw) // 2 if offset is None else offset
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_nothing_finished(out: Path) -> None:
    """No output a later stage or DVC could take for a result: at most the writer's lock file."""
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert left in ([], [".lock"]), left


def assert_problems(result: Any, *needles: str) -> list[str]:
    """`kd cache verify` found problems: exit 1, one stderr line per problem, each naming its file."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(needles), result.stderr
    unmatched = list(lines)
    for needle in needles:
        hit = next((line for line in unmatched if needle in line), None)
        assert hit is not None, f"no problem line names {needle!r}: {lines}"
        unmatched.remove(hit)
    return lines


# --- happy paths -------------------------------------------------------------------------------


def test_teacher_writes_weights_config_and_metrics(built):
    assert {p.name for p in built.teacher.iterdir()} == {"model.safetensors", "config.json", "metrics.json"}
    config = json.loads((built.teacher / "config.json").read_text())
    assert config["arch"] == "mlp" and config["arch_kwargs"] == {"hidden": [32]}
    assert config["input_shape"] == [1, 8, 8] and config["num_classes"] == 10
    metrics = json.loads((built.teacher / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    weights = load_file(str(built.teacher / "model.safetensors"))
    assert sum(t.numel() for t in weights.values()) == 64 * 32 + 32 + 32 * 10 + 10
    assert not built.teacher.with_name("teacher.tmp").exists()


def test_teacher_prints_accuracy_and_replaces_its_output(built, run_command, tmp_path):
    out = Path(shutil.copytree(built.teacher, tmp_path / "teacher"))
    (out / "stale.txt").write_text("left over from an older run")
    result = ok(run_command(teacher.main, *TEACHER_ARGS, "--no-progress", "--prepared", built.prepared,
                            "--out", out, "--params", built.params))
    assert "test accuracy" in result.stdout and str(out) in result.stdout
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "metrics.json"}
    # same data, arch and seed: the same teacher
    assert sha256(out / "model.safetensors") == sha256(built.teacher / "model.safetensors")


def test_cache_manifest_follows_the_contract(built):
    from kd.tasks.image_models import fingerprint

    manifest = manifest_of(built.cache)
    assert isinstance(manifest["schema_version"], int)
    assert manifest["teacher"]["fingerprint"] == fingerprint(built.teacher)
    assert len(manifest["teacher"]["fingerprint"]) == 64
    assert manifest["teacher"]["config"]["arch"] == "mlp"
    assert manifest["top_k"] == 5 and manifest["temperatures"] == [1, 4] and manifest["logit_dtype"] == "float16"
    assert manifest["features"] == []
    assert set(manifest["splits"]) == set(SIZES)
    for split, rows in SIZES.items():
        info = manifest["splits"][split]
        assert info["rows"] == rows
        assert info["data_fingerprint"] == sha256(built.prepared / f"{split}.parquet")
        assert len(info["parts"]) == -(-rows // PART_SIZE) and sum(p["rows"] for p in info["parts"]) == rows
        for entry in info["parts"]:
            assert entry["path"].startswith(f"soft_targets/split={split}/part-")
            assert entry["sha256"] == sha256(built.cache / entry["path"])
        fidelity = manifest["fidelity"][split]
        for t in ("t1", "t4"):
            assert 0.0 < fidelity[t]["kept_mass"] <= 1.0 + 1e-6
            assert fidelity[t]["kl_full_to_cached"] >= 0.0


def test_cache_parts_hold_the_contract_columns(built):
    table = parts_table(built.cache, "labeled")
    assert table.column_names == ["id", "view", "topk_idx", "topk_logit", "logit_max", "lse_t1", "lse_t4"]
    assert table.schema.field("id").type == pa.int64() and table.schema.field("view").type == pa.int32()
    assert table.schema.field("topk_idx").type == pa.list_(pa.int32(), 5)
    assert table.schema.field("topk_logit").type == pa.list_(pa.float16(), 5)
    logits = np.stack(table["topk_logit"].to_numpy(zero_copy_only=False))
    assert (logits[:, 0] == 0).all() and (np.diff(logits.astype(np.float32), axis=1) <= 0).all()
    prepared_ids = pq.read_table(built.prepared / "labeled.parquet", columns=["id"])["id"].to_numpy()
    np.testing.assert_array_equal(table["id"].to_numpy(), prepared_ids)
    assert (table["view"].to_numpy() == 0).all()


def test_feature_cache_records_and_aligns_the_layer(built):
    manifest = manifest_of(built.feature_cache)
    assert manifest["features"] == [{"name": FEATURE_LAYER, "mode": "full", "shape": [32], "dtype": "float16",
                                     "source_shape": [32]}]
    for split, rows in SIZES.items():
        array = zarr.open_array(str(built.feature_cache / "features.zarr" / split / FEATURE_LAYER), mode="r")
        assert array.shape == (rows, 32) and array.dtype == np.float16
        ids = zarr.open_array(str(built.feature_cache / "features.zarr" / split / "id"), mode="r")[:]
        parquet_ids = parts_table(built.feature_cache, split, ["id"])["id"].to_numpy()
        np.testing.assert_array_equal(ids, parquet_ids)
    # the soft targets do not depend on which features are cached
    assert parts_table(built.feature_cache, "unlabeled").equals(parts_table(built.cache, "unlabeled"))


def test_cache_info_text_and_json(built):
    text = ok(invoke_cache("info", built.cache)).stdout
    fp = manifest_of(built.cache)["teacher"]["fingerprint"]
    for needle in ("schema 1", "top-5 of 10 classes", "float16", "temperatures [1, 4]", fp[:16], "mlp",
                   "labeled: 200 samples", "unlabeled: 300 samples", "test: 200 samples", "kept"):
        assert needle in text, f"{needle!r} not in:\n{text}"
    summary = json.loads(ok(invoke_cache("info", built.cache, "--json")).stdout)
    assert summary["schema_version"] == 1 and summary["complete"] is True
    assert summary["teacher"]["fingerprint"] == fp
    assert (summary["top_k"], summary["temperatures"], summary["logit_dtype"]) == (5, [1, 4], "float16")
    assert {s: v["rows"] for s, v in summary["splits"].items()} == SIZES
    assert set(summary["fidelity"]) == set(SIZES)
    features = json.loads(ok(invoke_cache("info", built.feature_cache, "--json")).stdout)["features"]
    assert [f["name"] for f in features] == [FEATURE_LAYER]
    assert FEATURE_LAYER in ok(invoke_cache("info", built.feature_cache)).stdout


@pytest.mark.parametrize("which", ["cache", "feature_cache"])
def test_cache_verify_passes_an_intact_cache(built, which):
    result = ok(invoke_cache("verify", getattr(built, which)))
    assert "intact" in result.stdout and result.stderr == ""


def test_distill_writes_student_baseline_twin_and_log(built, run_command, tmp_path):
    params = students_params(tmp_path / "params.yaml", soft=tiny_student(epochs=2))
    result = ok(run_command(distill.main, "soft", *distill_paths(built, params, tmp_path)))
    out = tmp_path / "students" / "soft"
    assert "baseline twin" in result.stdout and "trained" in result.stdout
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "train_log.csv", "baseline", "seeds"}
    # one seed (repeats: 1): no seed directory under seeds/, only the index (never an empty DVC output)
    assert [p.name for p in (out / "seeds").iterdir()] == ["index.json"]
    assert json.loads((out / "seeds" / "index.json").read_text()) == {"0": "."}
    assert {p.name for p in (out / "baseline").iterdir()} == {"model.safetensors", "config.json", "train_log.csv"}
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "mlp" and config["arch_kwargs"] == {"hidden": [16]}
    assert config["input_shape"] == [1, 8, 8] and config["num_classes"] == 10
    assert config["teacher_fingerprint"] == manifest_of(built.cache)["teacher"]["fingerprint"]
    log = read_log(out / "train_log.csv")
    assert [row["epoch"] for row in log] == ["1", "2"]
    assert {"soft", "hard", "total"} <= set(log[0])  # a column per loss term
    assert all(np.isfinite(float(row[k])) for row in log for k in ("soft", "hard", "total"))
    twin_log = read_log(out / "baseline" / "train_log.csv")
    assert [row["epoch"] for row in twin_log] == ["1", "2"] and "hard" in twin_log[0] and "soft" not in twin_log[0]
    student_w = load_file(str(out / "model.safetensors"))
    twin_w = load_file(str(out / "baseline" / "model.safetensors"))
    assert student_w.keys() == twin_w.keys()
    assert all(student_w[k].shape == twin_w[k].shape for k in student_w)
    assert not out.with_name("soft.tmp").exists()




@pytest.mark.parametrize("batch_size", [
    8,  # every buffer but the last is a multiple of 8 samples: as many batches as in memory
    pytest.param(64),
])
def test_distill_streams_the_cache_under_a_small_memory_budget(built, run_command, tmp_path, batch_size):
    # 0.01 MB holds less than one 128-sample part: the student streams the cache part by part
    params = students_params(tmp_path / "params.yaml", streamed=tiny_student(epochs=2, batch_size=batch_size))
    ok(run_command(distill.main, "streamed", "--memory-mb", "0.01", *distill_paths(built, params, tmp_path)))
    log = read_log(tmp_path / "students" / "streamed" / "train_log.csv")
    assert [row["epoch"] for row in log] == ["1", "2"]
    assert all(np.isfinite(float(row[k])) for row in log for k in ("soft", "hard", "total"))


# --- kd label: idempotent, rebuilt on a new key --------------------------------------------------


def test_label_twice_leaves_the_cache_untouched_then_top_k_rebuilds(built, run_command, tmp_path):
    out = copy_cache(built.cache, tmp_path)
    before = tree(out)
    started = time.perf_counter()
    result = ok(run_command(label.main, *label_paths(built, out)))
    assert time.perf_counter() - started < 5.0
    assert tree(out) == before  # same bytes, same mtimes: nothing rewritten, not even the manifest
    assert "top-5" in result.stdout

    ok(run_command(label.main, "--top-k", "3", *label_paths(built, out)))
    manifest = manifest_of(out)
    assert manifest["top_k"] == 3
    assert pq.read_table(part(out)).schema.field("topk_idx").type == pa.list_(pa.int32(), 3)
    assert all(sha256(out / p["path"]) == p["sha256"] for s in manifest["splits"].values() for p in s["parts"])
    ok(invoke_cache("verify", out))


# --- kd distill never needs the teacher ------------------------------------------------------------


def test_distill_runs_with_defaults_and_without_the_teacher(built, workdir, run_command, monkeypatch):
    import kd.tasks.image_models

    data_dir = workdir / "data"
    shutil.copytree(built.prepared, data_dir / "prepared")
    shutil.copytree(built.cache, data_dir / "teacher_outputs")
    shutil.copytree(built.teacher, data_dir / "teacher")
    shutil.move(data_dir / "teacher", workdir / "moved_away")  # the teacher is gone from data/

    def no_teacher(*args, **kwargs):
        raise AssertionError("kd distill loaded a model")

    monkeypatch.setattr(kd.tasks.image_models, "load_model", no_teacher)
    students_params(workdir / "params.yaml", alone=tiny_student())
    result = ok(run_command(distill.main, "alone", "--no-progress"))  # every path at its default, under data/
    out = data_dir / "students" / "alone"
    assert str(Path("data/students/alone")) in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "baseline" / "model.safetensors").is_file()
    assert any((data_dir / "baselines").iterdir())
    config = json.loads((out / "config.json").read_text())
    assert config["teacher_fingerprint"] == manifest_of(built.cache)["teacher"]["fingerprint"]
    assert not (data_dir / "teacher").exists()


# --- baseline twins are shared ---------------------------------------------------------------------


def test_students_with_the_same_arch_seed_and_budget_share_one_twin(built, run_command, tmp_path):
    params = students_params(
        tmp_path / "params.yaml",
        hinton=tiny_student(),
        warm=tiny_student(loss={"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5}}),
        other_seed=tiny_student(seed=1),
    )
    first = ok(run_command(distill.main, "hinton", *distill_paths(built, params, tmp_path)))
    second = ok(run_command(distill.main, "warm", *distill_paths(built, params, tmp_path)))
    third = ok(run_command(distill.main, "other_seed", *distill_paths(built, params, tmp_path)))
    assert "trained" in first.stdout and "reused" in second.stdout and "trained" in third.stdout
    students = tmp_path / "students"
    for name in ("model.safetensors", "config.json", "train_log.csv"):
        hinton, warm = students / "hinton" / "baseline" / name, students / "warm" / "baseline" / name
        assert hinton.read_bytes() == warm.read_bytes()
    assert sha256(students / "hinton" / "model.safetensors") != sha256(students / "warm" / "model.safetensors")
    assert sha256(students / "hinton" / "baseline" / "model.safetensors") != \
        sha256(students / "other_seed" / "baseline" / "model.safetensors")
    assert len(list((tmp_path / "baselines").iterdir())) == 2


# --- params-driven students ------------------------------------------------------------------------


def test_undefined_student_is_named(built, run_command, tmp_path):
    params = students_params(tmp_path / "params.yaml", known=tiny_student())
    result = run_command(distill.main, "ghost", *distill_paths(built, params, tmp_path))
    assert_clean_error(result, "students.ghost", "known")
    assert not (tmp_path / "students" / "ghost").exists()


def test_unknown_student_key_is_named(built, run_command, tmp_path):
    params = students_params(tmp_path / "params.yaml", typo=tiny_student(epoch=3))
    result = run_command(distill.main, "typo", *distill_paths(built, params, tmp_path))
    assert_clean_error(result, "students.typo.epoch")
    assert not (tmp_path / "students" / "typo").exists()


def test_temperature_missing_from_the_cache_says_what_to_add(built, run_command, tmp_path):
    params = students_params(tmp_path / "params.yaml",
                             hot=tiny_student(loss={"soft": {"weight": 1.0, "temperature": 3}}))
    result = run_command(distill.main, "hot", *distill_paths(built, params, tmp_path))
    assert_clean_error(result, "3", "label.temperatures")
    assert not (tmp_path / "students" / "hot").exists()


def test_pseudo_label_student_trains(built, run_command, tmp_path):
    params = students_params(tmp_path / "params.yaml", pseudo=tiny_student(
        loss={"hard": {"weight": 1.0, "labels": True, "pseudo": True, "threshold": 0.5}}))
    ok(run_command(distill.main, "pseudo", *distill_paths(built, params, tmp_path)))
    out = tmp_path / "students" / "pseudo"
    log = read_log(out / "train_log.csv")
    assert len(log) == 1 and "hard" in log[0] and "soft" not in log[0]
    assert (out / "baseline" / "model.safetensors").is_file()


def test_soft_at_t1_with_pseudo_label_threshold_trains(built, run_command, tmp_path):
    params = students_params(tmp_path / "params.yaml", both=tiny_student(
        loss={"soft": {"weight": 0.5, "temperature": 1},
              "hard": {"weight": 0.5, "labels": True, "pseudo": True, "threshold": 0.5}}))
    ok(run_command(distill.main, "both", *distill_paths(built, params, tmp_path)))
    assert (tmp_path / "students" / "both" / "model.safetensors").is_file()


# --- error paths: kd teacher -----------------------------------------------------------------------


def test_teacher_without_prepared_data(built, run_command, tmp_path):
    missing, out = tmp_path / "nowhere", tmp_path / "teacher"
    result = run_command(teacher.main, *TEACHER_ARGS, "--no-progress", "--prepared", missing, "--out", out,
                         "--params", built.params)
    assert_clean_error(result, str(missing / "labeled.parquet"))
    assert not out.exists() and not out.with_name("teacher.tmp").exists()




@pytest.mark.parametrize("option,value", [("--epochs", 0), ("--batch-size", 0), ("--lr", -1), ("--lr", 0),
                                          ("--weight-decay", -1), ("--shift", -1)])
def test_teacher_rejects_a_bad_option(built, run_command, tmp_path, option, value):
    out = tmp_path / "teacher"
    args = {"--arch": "mlp", "--arch-kwargs": '{"hidden": [8]}', "--epochs": 1, option: value}
    result = run_command(teacher.main, *[a for kv in args.items() for a in kv], "--no-progress",
                         "--prepared", built.prepared, "--out", out, "--params", built.params)
    assert_clean_error(result, "teacher." + option[2:].replace("-", "_"), str(value))
    assert not out.exists()


# --- error paths: kd label -------------------------------------------------------------------------


def test_label_with_weights_that_are_not_safetensors(built, run_command, tmp_path):
    bad = Path(shutil.copytree(built.teacher, tmp_path / "teacher"))
    (bad / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors header\xff" * 8)
    out = tmp_path / "cache"
    result = run_command(label.main, *label_paths(built, out, teacher_dir=bad))
    assert_clean_error(result, str(bad / "model.safetensors"), "safetensors")
    assert_nothing_finished(out)


def test_label_with_weights_that_do_not_match_the_architecture(built, run_command, tmp_path):
    bad = Path(shutil.copytree(built.teacher, tmp_path / "teacher"))
    config = json.loads((bad / "config.json").read_text())
    config["arch_kwargs"] = {"hidden": [64]}
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "cache"
    result = run_command(label.main, *label_paths(built, out, teacher_dir=bad))
    assert_clean_error(result, str(bad / "model.safetensors"), "mlp")
    assert_nothing_finished(out)


BAD_LABEL_OPTIONS = [
    pytest.param(["--top-k", "0"], ["label.top_k", "0"], id="top-k-0"),
    pytest.param(["--top-k", "11"], ["top_k", "11", "10 classes"], id="top-k-11"),
    pytest.param(["--temperatures", "0"], ["label.temperatures", "0"], id="temperature-0"),
    pytest.param(["--logit-dtype", "float8"], ["logit_dtype", "float8"], id="float8"),
    pytest.param(["--feature", "nosuchlayer=full"], ["nosuchlayer"], id="no-such-layer"),
    pytest.param(["--feature", f"{FEATURE_LAYER}=attention"], [FEATURE_LAYER, "attention"],
                 id="attention-on-a-vector"),
]


@pytest.mark.parametrize("args,needles", BAD_LABEL_OPTIONS)
def test_label_rejects_a_bad_option(built, run_command, tmp_path, args, needles):
    out = tmp_path / "cache"
    result = run_command(label.main, *args, *label_paths(built, out))
    assert_clean_error(result, *needles)
    assert_nothing_finished(out)


def test_label_bad_option_leaves_no_manifest(built, run_command, tmp_path):
    out = tmp_path / "cache"
    result = run_command(label.main, "--top-k", "11", *label_paths(built, out))
    assert_clean_error(result, "11")
    assert_nothing_finished(out)


@pytest.mark.parametrize("args", [
    pytest.param(["--top-k", "0"], id="top-k-0"),
    pytest.param(["--top-k", "11"], id="top-k-11"),
    pytest.param(["--temperatures", "0"], id="temperature-0"),
    pytest.param(["--logit-dtype", "float8"], id="float8"),
    pytest.param(["--feature", "nosuchlayer=full"], id="no-such-layer"),
    pytest.param(["--feature", f"{FEATURE_LAYER}=attention"], id="attention-on-a-vector"),
])
def test_label_bad_option_leaves_an_existing_cache_intact(built, run_command, tmp_path, args):
    out = copy_cache(built.cache, tmp_path)
    before = tree(out)
    result = run_command(label.main, *args, *label_paths(built, out))
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert tree(out) == before
    ok(invoke_cache("verify", out))


# --- error paths: params.yaml ----------------------------------------------------------------------


@pytest.mark.parametrize("term,weight", [("hard", 1.5), ("hard", -0.1), ("soft", 2.0)])
def test_loss_weight_outside_unit_interval(built, run_command, tmp_path, term, weight):
    student = tiny_student()
    student["loss"][term]["weight"] = weight
    params = students_params(tmp_path / "params.yaml", heavy=student)
    result = run_command(distill.main, "heavy", *distill_paths(built, params, tmp_path))
    assert_clean_error(result, f"students.heavy.loss.{term}.weight", str(weight))
    assert not (tmp_path / "students" / "heavy").exists()


@pytest.mark.parametrize("stage", ["teacher", "label", "distill"])
def test_invalid_yaml_in_params(built, run_command, tmp_path, stage):
    params = tmp_path / "params.yaml"
    params.write_text("students:\n  broken: {arch: mlp\n    epochs: [1,\n")
    out = tmp_path / "out"
    if stage == "teacher":
        result = run_command(teacher.main, "--no-progress", "--prepared", built.prepared, "--out", out,
                             "--params", params)
    elif stage == "label":
        result = run_command(label.main, "--no-progress", "--teacher", built.teacher, "--prepared", built.prepared,
                             "--out", out, "--params", params)
    else:
        result = run_command(distill.main, "broken", "--no-progress", "--cache", built.cache, "--prepared",
                             built.prepared, "--students-dir", out, "--baselines", tmp_path / "baselines",
                             "--params", params)
    assert_clean_error(result, str(params), "YAML")
    assert_nothing_finished(out)


# --- error paths: kd distill on a bad cache --------------------------------------------------------


def test_distill_refuses_a_newer_schema(built, run_command, tmp_path):
    cache = copy_cache(built.cache, tmp_path)
    manifest = manifest_of(cache)
    manifest["schema_version"] = 99
    write_manifest(cache, manifest)
    params = students_params(tmp_path / "params.yaml", s=tiny_student())
    result = run_command(distill.main, "s", *distill_paths(built, params, tmp_path, cache=cache))
    assert_clean_error(result, str(cache / "manifest.json"), "99")
    assert not (tmp_path / "students" / "s").exists()


def test_distill_refuses_a_missing_cache(built, run_command, tmp_path):
    params = students_params(tmp_path / "params.yaml", s=tiny_student())
    result = run_command(distill.main, "s", *distill_paths(built, params, tmp_path, cache=tmp_path / "none"))
    assert_clean_error(result, str(tmp_path / "none" / "manifest.json"), "kd label")
    assert not (tmp_path / "students" / "s").exists()


def test_distill_refuses_a_stale_cache(built, run_command, tmp_path):
    prepared = Path(shutil.copytree(built.prepared, tmp_path / "prepared"))
    ok(run_command(prepare.main, "--dataset", "digits", "--labeled", SIZES["labeled"], "--unlabeled",
                   SIZES["unlabeled"], "--test", SIZES["test"], "--seed", 1, "--params", built.params,
                   "--out", prepared))
    params = students_params(tmp_path / "params.yaml", s=tiny_student())
    result = run_command(distill.main, "s", *distill_paths(built, params, tmp_path, prepared=prepared))
    assert_clean_error(result, str(built.cache), "kd label")
    assert not (tmp_path / "students" / "s").exists()


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped-byte", "truncated"])
def test_distill_refuses_a_damaged_part(built, run_command, tmp_path, damage):
    cache = copy_cache(built.cache, tmp_path)
    corrupt = part(cache)
    damage(corrupt)
    params = students_params(tmp_path / "params.yaml", s=tiny_student())
    result = run_command(distill.main, "s", *distill_paths(built, params, tmp_path, cache=cache))
    assert_clean_error(result, str(corrupt), "kd cache verify")
    assert not (tmp_path / "students" / "s").exists()


# --- kd cache info / verify on damaged caches ------------------------------------------------------


def test_cache_info_on_a_missing_cache(tmp_path):
    result = invoke_cache("info", tmp_path / "none")
    assert_clean_error(result, str(tmp_path / "none" / "manifest.json"))


def test_verify_flipped_byte(built, tmp_path):
    cache = copy_cache(built.cache, tmp_path)
    corrupt = part(cache)
    flip_byte(corrupt)
    assert_problems(invoke_cache("verify", cache), str(corrupt))


def test_verify_truncated_part(built, tmp_path):
    cache = copy_cache(built.cache, tmp_path)
    corrupt = part(cache, "test")
    truncate(corrupt)
    assert_problems(invoke_cache("verify", cache), str(corrupt))


def test_verify_deleted_part(built, tmp_path):
    cache = copy_cache(built.cache, tmp_path)
    gone = part(cache, "unlabeled", 1)
    gone.unlink()
    assert_problems(invoke_cache("verify", cache), str(gone))


def test_verify_extra_file(built, tmp_path):
    cache = copy_cache(built.cache, tmp_path)
    extra = part(cache).with_name("part-00099.parquet")  # e.g. left over from a larger split
    shutil.copyfile(part(cache), extra)
    assert_problems(invoke_cache("verify", cache), str(extra))


def test_verify_manifest_sha256_edited(built, tmp_path):
    cache = copy_cache(built.cache, tmp_path)
    manifest = manifest_of(cache)
    manifest["splits"]["test"]["parts"][0]["sha256"] = "0" * 64
    write_manifest(cache, manifest)
    assert_problems(invoke_cache("verify", cache), str(part(cache, "test")))


def test_verify_manifest_part_list_missing_a_part(built, tmp_path):
    cache = copy_cache(built.cache, tmp_path)
    unlisted = part(cache, "labeled", -1)
    manifest = manifest_of(cache)
    manifest["splits"]["labeled"]["parts"].pop()
    write_manifest(cache, manifest)
    # the split's part list is short, and the file it no longer lists is an extra
    assert_problems(invoke_cache("verify", cache), str(cache / "manifest.json"), str(unlisted))


def chunk_file(cache: Path, split: str = "labeled", layer: str = FEATURE_LAYER) -> Path:
    chunks = sorted(p for p in (cache / "features.zarr" / split / layer / "c").rglob("*") if p.is_file())
    assert chunks, f"no chunk files under {cache / 'features.zarr' / split / layer}"
    return chunks[0]


def test_verify_deleted_zarr_chunk(built, tmp_path):
    cache = copy_cache(built.feature_cache, tmp_path)
    chunk = chunk_file(cache)
    chunk.unlink()
    assert_problems(invoke_cache("verify", cache), str(chunk))


def test_verify_truncated_zarr_chunk(built, tmp_path):
    cache = copy_cache(built.feature_cache, tmp_path)
    truncate(chunk_file(cache, "test"))
    # the manifest holds one digest over a part's chunks: the line names the array
    assert_problems(invoke_cache("verify", cache), str(cache / "features.zarr" / "test" / FEATURE_LAYER))


def test_verify_zarr_ids_out_of_alignment(built, tmp_path):
    cache = copy_cache(built.feature_cache, tmp_path)
    ids = zarr.open_array(str(cache / "features.zarr" / "labeled" / "id"), mode="r+")
    ids[:2] = ids[:2][::-1]  # two rows of the first part swap their ids
    assert_problems(invoke_cache("verify", cache), str(cache / "features.zarr" / "labeled"))


def test_verify_zarr_ids_out_of_alignment_with_consistent_checksums(built, tmp_path):
    """Even with the manifest's chunk digests rewritten to match, the ids must equal the Parquet ids."""
    from kd.cache.layout import chunks_sha256
    from kd.cache.store import Store

    cache = copy_cache(built.feature_cache, tmp_path)
    ids = zarr.open_array(str(cache / "features.zarr" / "labeled" / "id"), mode="r+")
    ids[:2] = ids[:2][::-1]  # two rows of the first part swap their ids
    manifest = manifest_of(cache)
    for entry in manifest["splits"]["labeled"]["parts"]:
        entry["features"]["id"] = chunks_sha256(Store(cache), manifest, "labeled", "id", entry["first_row"],
                                                entry["rows"])
    write_manifest(cache, manifest)
    lines = assert_problems(invoke_cache("verify", cache), str(cache / "features.zarr" / "labeled"))
    assert "aligned" in lines[0]


def test_verify_missing_cache(tmp_path):
    assert_problems(invoke_cache("verify", tmp_path / "none"), str(tmp_path / "none" / "manifest.json"))
