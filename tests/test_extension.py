"""The two extension points, used the way their docstrings say: a loss method is one module plus
one line in `kd.methods.METHODS`, a dataset one module plus one line in `kd.sources.SOURCES`.
Each test writes its module to tmp_path, imports it as a user's own module, registers it with
one `monkeypatch.setitem` and uses it through the commands (`kd prepare`, `kd distill`)."""

from __future__ import annotations

import csv
import functools
import importlib
import json
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml
from numpy.testing import assert_array_equal

from kd import methods, report
from kd.cli import distill, label, prepare, teacher
from kd.config import PrepareConfig
from kd.methods import METHODS
from kd.prepared import images
from kd.sources import SOURCES, Builtin
from tests.helpers import invoke as run_stage

invoke = functools.partial(run_stage, expect=0)

# A logit-matching method: the student's logits at the teacher's cached top-k, shifted so that
# the top-1 is 0 as the cache holds it, against the cached logits (mean squared error).
TOY_METHOD = '''
    """toy: MSE between the student's logits at the teacher's top-k and the cached ones."""

    from dataclasses import dataclass

    from kd.errors import ConfigError
    from kd.methods.common import Built, Method, Shapes


    @dataclass
    class ToyTerm(Method):
        weight: float = 0.5
        top: int = 3  # the first `top` of the cached top-k

        def check(self, where: str) -> None:
            if self.top < 1:
                raise ConfigError(f"{where}.top: {self.top} must be >= 1")
            super().check(where)


    CONFIG = ToyTerm
    TASKS = ("image",)
    OWN_TOKENIZER = False
    KIND = "logits"


    def build(cfg: ToyTerm, shapes: Shapes) -> Built:
        def term(batch, out):
            # logits: (B, C); topk_idx, topk_logit: (B, k), topk_logit[:, 0] = 0
            picked = out["logits"].gather(1, batch["topk_idx"][:, :cfg.top])
            return (picked - picked[:, :1] - batch["topk_logit"][:, :cfg.top]).pow(2).mean()
        return Built({"toy": (cfg.weight, term)})
'''

# A dataset of image arrays: 3 classes of 8 values, each class a bump at its own place, plus noise.
TOY_SOURCE = '''
    """toy: 150 rows of 8 values in 3 classes, made here."""

    import numpy as np

    from kd.config import PrepareConfig
    from kd.prepared.images import Split


    def make(cfg: PrepareConfig) -> Split:
        y = np.arange(150, dtype=np.int64) % 3
        x = np.random.default_rng(7).normal(0.0, 0.1, (150, 8)).astype(np.float32)
        x[np.arange(150), 3 * y] += 1.0
        return Split(np.arange(1000, 1150, dtype=np.int64), x, y, [8], 3)
'''


def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, code: str) -> ModuleType:
    """`code` written to tmp_path/NAME.py and imported from there, as a user's own module."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


@pytest.mark.integration
def test_a_loss_method_is_one_module_plus_one_registry_line(tmp_path, monkeypatch):
    d = tmp_path / "data"
    student = {"arch": "mlp", "arch_kwargs": {"hidden": [16]}, "epochs": 1, "batch_size": 32,
               "loss": {"soft": {"temperature": 4}, "hard": {"weight": 0.1}, "toy": {"weight": 0.5}}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "prepare": {"dataset": "digits", "labeled": 60, "unlabeled": 100, "test": 60},
        "teacher": {"arch": "mlp", "arch_kwargs": {"hidden": [32]}, "epochs": 2, "batch_size": 32, "shift": 0},
        "label": {"top_k": 4, "temperatures": [1, 4]},
        "students": {"with_toy": student,
                     "typo": {**student, "loss": {"toy": {"wieght": 1.0}}},
                     "bad_top": {**student, "loss": {"toy": {"top": 0}}}}}))
    common = ["--params", params]
    invoke(prepare.main, "--out", d / "prepared", *common)
    invoke(teacher.main, "--prepared", d / "prepared", "--out", d / "teacher", "--no-progress", *common)
    invoke(label.main, "--teacher", d / "teacher", "--prepared", d / "prepared", "--out", d / "cache",
           "--no-progress", *common)

    def run_distill(name: str, expect: int):
        return run_stage(distill.main, name, "--cache", d / "cache", "--prepared", d / "prepared", "--students-dir",
                         d / "students", "--baselines", d / "baselines", "--no-progress", *common, expect=expect)

    # unregistered, `toy` is no key of students.NAME.loss
    assert "students.with_toy.loss.toy: unknown key" in run_distill("with_toy", 1).output

    toy = user_module(tmp_path, monkeypatch, "toy_method", TOY_METHOD)
    monkeypatch.setitem(METHODS, "toy", toy)  # the one registry line

    run_distill("with_toy", 0)
    out = d / "students" / "with_toy"
    with open(out / "train_log.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    terms = ["soft", "hard", "toy"]
    assert [k for k in row if k in terms] == terms  # each term logged by name, in METHODS' order
    assert all(np.isfinite(float(row[t])) and float(row[t]) >= 0 for t in terms)

    # its config is checked like any other: keys by their dotted path, values by its `check`
    assert "students.typo.loss.toy.wieght: unknown key (expected one of: top, weight)" in run_distill("typo", 1).output
    assert "students.bad_top.loss.toy.top: 0 must be >= 1" in run_distill("bad_top", 1).output

    # derived from the registry: the tasks that accept it, the report's label and soft-only reference
    assert methods.supported("image")[-1] == "toy" and "toy" not in methods.supported("causal_lm")
    loss = json.loads((out / "config.json").read_text())["student"]["loss"]
    assert loss["toy"] == {"weight": 0.5, "top": 3}
    assert report.method_label(loss) == "soft + hard + toy"
    assert not report.is_soft_only(loss)  # a logits method beside soft: not soft targets alone


@pytest.mark.integration
def test_a_dataset_source_is_one_module_plus_one_registry_line(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    args = ["--dataset", "toy", "--labeled", 30, "--unlabeled", 60, "--test", 30, "--out", out,
            "--params", tmp_path / "params.yaml"]
    (tmp_path / "params.yaml").write_text("prepare: {}\n")
    result = run_stage(prepare.main, *args, expect=1)
    assert "prepare.dataset: 'toy' is not a known dataset" in result.output

    toy = user_module(tmp_path, monkeypatch, "toy_source", TOY_SOURCE)
    monkeypatch.setitem(SOURCES, "toy", Builtin("images", toy.make))  # the one registry line

    result = invoke(prepare.main, *args)
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [
        ["labeled", "30"], ["unlabeled", "60"], ["test", "30"]]
    made = toy.make(PrepareConfig(dataset="toy"))
    splits = {name: images.read_split(out / f"{name}.parquet") for name in ("labeled", "unlabeled", "test")}
    for name, split in splits.items():
        assert split.input_shape == [8] and split.num_classes == 3
        rows = split.ids - 1000  # each row as the source made it
        assert_array_equal(split.x, made.x[rows])
        assert_array_equal(split.y, made.y[rows] if name != "unlabeled" else -1)
        assert set(made.y[rows]) == {0, 1, 2}  # split by class
    assert len(np.unique(np.concatenate([s.ids for s in splits.values()]))) == 120
