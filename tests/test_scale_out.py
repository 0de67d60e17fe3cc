"""Sharded labeling (`--shard/--num-shards`, torchrun) and caches on S3-compatible storage.

Real files and real processes: the 8x8 `digits` data, a 2-epoch MLP teacher, caches with a
cached layer and one augmented view; `torchrun` runs as a subprocess; the object store is a
moto server on 127.0.0.1 started by the fixture and stopped after.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from kd import tasks
from kd.cache import Cache
from kd.cache.store import Store
from kd.cache.verify import verify
from kd.cli import distill, label, prepare, teacher
from kd.cli import eval as eval_stage
from kd.speed import torch_threads
from tests.helpers import invoke, invoke_cache, ok, students_params, tiny_student, torchrun

LABEL_ARGS = ("--no-progress", "--part-size", "64", "--feature", "hidden.0=full", "--views", "1")


def digest_tree(store: Store) -> dict[str, str]:
    """relative path -> sha256 of every cache file (lock files aside)."""
    return {rel: store.sha256(rel) for rel in store.files("") if not Path(rel).name.startswith(".lock")}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scale")
    params = root / "params.yaml"
    params.write_text("{}\n")
    prepared, teacher_dir = root / "prepared", root / "teacher"
    ok(invoke(prepare.main, "--dataset", "digits", "--labeled", 200, "--unlabeled", 300, "--test", 200,
              "--params", params, "--out", prepared))
    ok(invoke(teacher.main, "--arch", "mlp", "--arch-kwargs", '{"hidden": [32]}', "--epochs", "2", "--no-progress",
              "--prepared", prepared, "--out", teacher_dir, "--params", params))
    reference = root / "reference"
    with torch_threads(1):  # as torchrun's processes label (OMP_NUM_THREADS=1)
        ok(invoke(label.main, *LABEL_ARGS, *paths(root, reference)))
    return {"root": root, "params": params, "prepared": prepared, "teacher": teacher_dir, "reference": reference}


def paths(root: Path, out: Any) -> list[Any]:
    return ["--teacher", root / "teacher", "--prepared", root / "prepared", "--out", out,
            "--params", root / "params.yaml"]


@pytest.mark.integration
def test_shards_labeled_one_after_the_other_merge_into_the_single_process_cache(world, tmp_path):
    out = tmp_path / "cache"
    first = ok(invoke(label.main, *LABEL_ARGS, "--shard", 1, "--num-shards", 3, *paths(world["root"], out)))
    assert "shard 1 of 3 done" in first.output
    with pytest.raises(Exception, match="shards of a sharded `kd label` are still running"):
        Cache.open(out)
    result = invoke_cache("merge", out)
    assert result.exit_code == 1 and "shards 0, 2 of 3 are not finished" in result.output
    ok(invoke(label.main, *LABEL_ARGS, "--shard", 0, "--num-shards", 3, *paths(world["root"], out)))
    last = ok(invoke(label.main, *LABEL_ARGS, "--shard", 2, "--num-shards", 3, *paths(world["root"], out)))
    assert "top-5 of 10 classes" in last.output  # the last shard merged and printed the summary
    assert digest_tree(Store(out)) == digest_tree(Store(world["reference"]))
    assert verify(out, tasks.for_manifest) == []
    ok(invoke_cache("merge", out))  # merging a merged cache is a no-op


@pytest.mark.integration
def test_a_shard_refuses_a_cache_of_another_teacher(world, tmp_path):
    out = Path(shutil.copytree(world["reference"], tmp_path / "cache"))
    result = invoke(label.main, *LABEL_ARGS, "--top-k", 3, "--shard", 0, "--num-shards", 2, *paths(world["root"], out))
    assert result.exit_code == 1 and "holds a cache of another teacher, data or parameters" in result.output
    assert verify(out, tasks.for_manifest) == []  # left as it was


@pytest.mark.integration
def test_shards_of_different_counts_are_not_merged(world, tmp_path):
    out = tmp_path / "cache"
    ok(invoke(label.main, *LABEL_ARGS, "--shard", 0, "--num-shards", 2, *paths(world["root"], out)))
    result = invoke(label.main, *LABEL_ARGS, "--shard", 1, "--num-shards", 3, *paths(world["root"], out))
    assert result.exit_code == 1 and "a shard of a run with another --num-shards" in result.output
    result = invoke_cache("merge", out, "--num-shards", 3)
    assert result.exit_code == 1 and "records of other shard counts" in result.output


@pytest.mark.unit
def test_two_writers_of_a_shared_file_do_not_move_each_others_temporary(tmp_path):
    # Shards that finish together both merge: each writes the same manifest. A fixed
    # temporary name let the first move the second's file away (seen under torchrun).
    store = Store(tmp_path)
    with store.writing("manifest.json", shared=True) as first:
        with store.writing("manifest.json", shared=True) as second:
            assert first != second
            Path(second).write_text("second\n")
        Path(first).write_text("first\n")
    assert (tmp_path / "manifest.json").read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


@pytest.mark.e2e
def test_torchrun_two_processes_label_the_single_process_cache(world, tmp_path):
    out = tmp_path / "cache"
    result = torchrun(2, "label", *LABEL_ARGS, *paths(world["root"], out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert digest_tree(Store(out)) == digest_tree(Store(world["reference"]))
    assert verify(out, tasks.for_manifest) == []


# --- object storage --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(world):
    """A moto S3 server on 127.0.0.1 with bucket `kd-test`; the AWS variables point at it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="kd-test")
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.mark.e2e
def test_label_distill_and_verify_through_s3(world, s3, tmp_path):
    url = "s3://kd-test/caches/digits"
    ok(invoke(label.main, *LABEL_ARGS, *paths(world["root"], url)))
    remote = Store(url)
    assert digest_tree(remote) == digest_tree(Store(world["reference"]))  # the same bytes as on disk
    ok(invoke_cache("verify", url))
    assert "features.zarr" in "".join(remote.files(""))
    info = ok(invoke_cache("info", url))
    assert url in info.output
    params = students_params(tmp_path / "params.yaml", s=tiny_student(
        loss={"soft": {"weight": 0.9, "temperature": 4}, "hard": {"weight": 0.1, "labels": True},
              "hint": {"teacher_layer": "hidden.0", "student_layer": "hidden.0", "weight": 1.0}}))
    weights = {}
    for name, cache in {"s3": url, "disk": world["reference"]}.items():
        ok(invoke(distill.main, "s", "--no-progress", "--cache", cache, "--prepared", world["prepared"],
                  "--students-dir", tmp_path / name, "--baselines", tmp_path / f"{name}-baselines",
                  "--params", params))
        weights[name] = load_file(str(tmp_path / name / "s" / "model.safetensors"))
    assert all((weights["s3"][k] == weights["disk"][k]).all() for k in weights["disk"])
    evaluated = ok(invoke(eval_stage.main, "s", "--cache", url, "--prepared", world["prepared"], "--students-dir",
                          tmp_path / "s3", "--params", params, "--latency-runs", 2, "--throughput-runs", 1))
    assert "student s: accuracy" in evaluated.output


@pytest.mark.e2e
def test_s3_cache_damage_is_detected_and_shards_write_there(world, s3, tmp_path):
    url = "s3://kd-test/caches/sharded"
    for shard in (0, 1):
        ok(invoke(label.main, *LABEL_ARGS, "--shard", shard, "--num-shards", 2, *paths(world["root"], url)))
    remote = Store(url)
    assert digest_tree(remote) == digest_tree(Store(world["reference"]))
    part = "soft_targets/split=labeled/part-00000.parquet"
    body = bytearray(remote.read_bytes(part))
    body[100] ^= 0xFF
    with remote.fs.open_output_stream(remote.full(part)) as handle:
        handle.write(bytes(body))
    result = invoke_cache("verify", url)
    assert result.exit_code == 1 and f"{url}/{part}" in result.output and "sha256" in result.output
    assert hashlib.sha256(bytes(body)).hexdigest() != Store(world["reference"]).sha256(part)
