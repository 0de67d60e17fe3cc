"""Crash safety, determinism and a full disk: what a crash or a bad environment leaves behind.

Real processes are killed with SIGKILL at chosen points (a harness wraps one library
function to kill its own process after N calls); the rerun must equal an uninterrupted run.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from kd.cli import distill, label, prepare, teacher
from tests.helpers import KILL_DISTILL, digest
from tests.helpers import invoke as run_stage

invoke = functools.partial(run_stage, expect=0)  # every call must succeed unless it says otherwise

STUDENT = {"arch": "mlp", "arch_kwargs": {"hidden": [16]}, "epochs": 4, "batch_size": 32, "lr": 0.003,
           "repeats": 2, "loss": {"soft": {"weight": 0.9, "temperature": 4}, "hard": {"weight": 0.1}}}
PARAMS = {
    "prepare": {"dataset": "digits", "labeled": 150, "unlabeled": 250, "test": 100},
    "teacher": {"arch": "mlp", "arch_kwargs": {"hidden": [32]}, "epochs": 3, "batch_size": 32, "shift": 0},
    "label": {"top_k": 4, "temperatures": [1, 4], "part_size": 64},
    "students": {"s": STUDENT},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    d, params = root / "data", ["--params", root / "params.yaml"]
    invoke(prepare.main, "--out", d / "prepared", *params)
    invoke(teacher.main, "--prepared", d / "prepared", "--out", d / "teacher", "--no-progress", *params)
    invoke(label.main, "--teacher", d / "teacher", "--prepared", d / "prepared", "--out", d / "cache",
           "--no-progress", *params)
    return root


def distill_args(workspace: Path, out: Path) -> list[str]:
    d = workspace / "data"
    return ["s", "--cache", str(d / "cache"), "--prepared", str(d / "prepared"),
            "--students-dir", str(out / "students"), "--baselines", str(out / "baselines"),
            "--checkpoints", str(out / "checkpoints"),
            "--params", str(workspace / "params.yaml"), "--no-progress"]


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory) -> Path:
    """An uninterrupted `kd distill s` (two seeds, each with its twin)."""
    out = tmp_path_factory.mktemp("reference")
    invoke(distill.main, *distill_args(workspace, out))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("after", [
    2,  # mid first seed
    pytest.param(6, marks=pytest.mark.slow),  # in its baseline twin
    pytest.param(9, marks=pytest.mark.slow),  # mid second seed
])
def test_distill_killed_then_resumed_equals_an_uninterrupted_run(workspace, reference, tmp_path, after, child_env):
    out = tmp_path / "resumed"
    killed = subprocess.run([sys.executable, "-c", KILL_DISTILL, str(after), *distill_args(workspace, out)],
                            capture_output=True, text=True, env=child_env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "students" / "s").exists()  # nothing that looks finished
    assert any((out / "checkpoints").glob("*.pt"))
    invoke(distill.main, *distill_args(workspace, out))
    assert digest(out / "students" / "s") == digest(reference / "students" / "s")
    assert not any((out / "checkpoints").glob("*.pt"))  # removed once training is done


@pytest.mark.integration
def test_same_params_same_seed_give_identical_cache_and_weights(workspace, reference, tmp_path):
    d = workspace / "data"
    again = tmp_path / "cache"
    invoke(label.main, "--teacher", d / "teacher", "--prepared", d / "prepared", "--out", again, "--no-progress",
           "--params", workspace / "params.yaml")
    assert digest(again) == digest(d / "cache")
    again = tmp_path / "again"
    invoke(distill.main, *distill_args(workspace, again))
    assert digest(again / "students" / "s") == digest(reference / "students" / "s")


KILL_PREPARE = textwrap.dedent("""
    import os, signal, sys
    from kd.prepared import images
    from kd.cli import app

    original, calls = images.write_split, [0]
    def write_then_die(*a, **k):
        original(*a, **k)
        calls[0] += 1
        if calls[0] >= 2:
            os.kill(os.getpid(), signal.SIGKILL)
    images.write_split = write_then_die
    app(["prepare", *sys.argv[1:]])
""")


@pytest.mark.integration
def test_prepare_killed_midway_leaves_the_previous_output_intact(workspace, tmp_path):
    out = tmp_path / "prepared"
    shutil.copytree(workspace / "data" / "prepared", out)
    before = digest(out)
    killed = subprocess.run([sys.executable, "-c", KILL_PREPARE, "--seed", "7", "--out", str(out),
                             "--params", str(workspace / "params.yaml")], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert digest(out) == before
    invoke(prepare.main, "--seed", "7", "--out", out, "--params", workspace / "params.yaml")
    assert digest(out) != before and not list(tmp_path.glob(".prepared.tmp-*"))


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 256 KiB tmpfs: writing a cache there runs out of space (needs root to mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.integration
def test_disk_full_while_labeling_is_one_clear_line_and_nothing_finished(workspace, small_disk):
    d = workspace / "data"
    out = small_disk / "cache"
    big = dict(PARAMS, label={**PARAMS["label"], "features": {"hidden.0": "full"}, "logit_dtype": "float32",
                              "views": 8})
    params = small_disk.parent / "big.yaml"
    params.write_text(yaml.safe_dump(big))
    result = invoke(label.main, "--teacher", d / "teacher", "--prepared", d / "prepared", "--out", out,
                    "--no-progress", "--params", params, expect=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and os.strerror(errno.ENOSPC) in lines[0] and "Traceback" not in result.output
    manifest = out / "manifest.json"
    assert not manifest.exists() or '"complete": false' in manifest.read_text()
    assert not list(out.rglob("*.tmp"))  # no half-written part left behind


@pytest.mark.integration
def test_nan_teacher_logits_are_refused_naming_the_ids(workspace, tmp_path):
    from safetensors.torch import load_file, save_file

    d = workspace / "data"
    broken = Path(shutil.copytree(d / "teacher", tmp_path / "teacher"))
    state = load_file(str(broken / "model.safetensors"))
    state["head.bias"][3] = float("nan")
    save_file(state, str(broken / "model.safetensors"))
    out = tmp_path / "cache"
    result = invoke(label.main, "--teacher", broken, "--prepared", d / "prepared", "--out", out, "--no-progress",
                    "--params", workspace / "params.yaml", expect=1)
    (line,) = result.stderr.strip().splitlines()
    assert "NaN or Inf logits" in line and "ids [" in line
    assert not (out / "manifest.json").exists() or '"complete": false' in (out / "manifest.json").read_text()


@pytest.mark.unit
def test_no_pickle_on_any_load_path():
    """Weights are safetensors; the only torch.load (our own checkpoints) is weights_only=True."""
    root = Path(__file__).parents[1]
    for path in root.glob("kd/**/*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


@pytest.mark.unit
def test_checkpoint_cannot_name_code_to_import(tmp_path):
    from kd.errors import ConfigError
    from kd.tasks.image_models import build, load_model, save_model

    save_model(tmp_path, build("mlp", {"hidden": [4]}, [4], 2), {"arch": "os:system", "arch_kwargs": {},
                                                                 "input_shape": [4], "num_classes": 2})
    with pytest.raises(ConfigError, match="never from a checkpoint or cache"):
        load_model(tmp_path)


@pytest.mark.integration
def test_a_part_path_that_links_out_of_the_cache_is_refused(workspace, tmp_path):
    import json

    from kd import tasks
    from kd.cache import Cache
    from kd.cache.verify import verify
    from kd.errors import CacheError

    cache = Path(shutil.copytree(workspace / "data" / "cache", tmp_path / "cache"))
    manifest = json.loads((cache / "manifest.json").read_text())
    part = cache / manifest["splits"]["test"]["parts"][0]["path"]
    outside = tmp_path / "elsewhere.parquet"
    part.rename(outside)
    part.symlink_to(outside)
    assert any("a link leaving the cache" in p for p in verify(cache, tasks.for_manifest))
    with pytest.raises(CacheError, match="a link leaving the cache"):
        Cache.open(cache)
