"""Distillation methods from the cache: hint, attention, RKD, cosine, progressive chains.

Each method trains through `kd distill` on the 8x8 digits with the teacher's directory
removed; the composition of terms, their requirements on the cache and their errors are
checked against real caches built with real feature layers.
"""

from __future__ import annotations

import csv
import functools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from kd import config, features, losses
from kd.cache import Cache
from kd.cli import assistants, distill, label, prepare, teacher
from kd.config import StudentConfig, from_mapping
from kd.errors import CacheMissingError, ConfigError
from kd.methods import Shapes, needed_temperatures, student_layers, student_terms
from kd.tasks import image
from kd.tasks.image import probe_shapes
from kd.tasks.image_models import build
from kd.training import step
from tests.helpers import invoke as run_stage

invoke = functools.partial(run_stage, expect=0)  # every call must succeed unless it says otherwise

ROOT = Path(__file__).parents[1]
CNN = {"widths": [4, 8], "convs_per_stage": 1, "hidden": 16}
TEACHER = {"widths": [8, 16], "convs_per_stage": 1, "hidden": 32}
FEATURES = {"stages.0": "attention", "stages.1": "full", "embed": "pooled"}


def student(loss: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {"arch": "cnn", "arch_kwargs": CNN, "epochs": 1, "batch_size": 32, "lr": 0.003,
            "loss": {"soft": {"weight": 0.9, "temperature": 4}, "hard": {"weight": 0.1}, **loss}, **changes}


STUDENTS = {
    "hint": student({"hint": {"teacher_layer": "stages.1", "student_layer": "stages.1"}}),
    "attention": student({"attention": {"pairs": [["stages.0", "stages.0"], ["stages.1", "stages.1"]]}}),
    "rkd": student({"rkd": {"teacher_layer": "embed", "student_layer": "embed"}}),
    "cosine": student({"cosine": {"teacher_layer": "embed", "student_layer": "embed"}}),
    "small_via_ta": {"arch": "mlp", "arch_kwargs": {"hidden": [8]}, "epochs": 1, "assistant": "ta",
                     "loss": {"soft": {"weight": 0.9, "temperature": 4}, "hard": {"weight": 0.1}}},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Prepared digits, a small CNN teacher and a cache with one layer in each mode; the teacher
    directory is then removed, so every student below trains without it."""
    root = tmp_path_factory.mktemp("methods")
    params = {
        "prepare": {"dataset": "digits", "labeled": 150, "unlabeled": 250, "test": 100},
        "teacher": {"arch": "cnn", "arch_kwargs": TEACHER, "epochs": 3, "batch_size": 32, "shift": 0},
        "label": {"top_k": 5, "temperatures": [1, 4], "features": FEATURES},
        "assistants": {"ta": student({}, arch_kwargs={"widths": [4, 8], "convs_per_stage": 1, "hidden": 8})},
        "students": STUDENTS,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    d = root / "data"
    common = ["--params", root / "params.yaml"]
    invoke(prepare.main, "--out", d / "prepared", *common)
    invoke(teacher.main, "--prepared", d / "prepared", "--out", d / "teacher", "--no-progress", *common)
    invoke(label.main, "--teacher", d / "teacher", "--prepared", d / "prepared", "--out", d / "teacher_outputs",
           "--no-progress", *common)
    shutil.rmtree(d / "teacher")
    return root


def run_distill(workspace: Path, name: str, *extra: Any):
    d = workspace / "data"
    return invoke(distill.main, name, "--cache", d / "teacher_outputs", "--prepared", d / "prepared",
                  "--students-dir", d / "students", "--baselines", d / "baselines", "--assistants",
                  d / "assistants", "--params", workspace / "params.yaml", "--no-progress", *extra)


def train_log(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.integration
@pytest.mark.parametrize("name,terms", [
    ("hint", ["soft", "hard", "hint"]),
    ("attention", ["soft", "hard", "attention"]),
    ("rkd", ["soft", "hard", "rkd_distance", "rkd_angle"]),
    ("cosine", ["soft", "hard", "cosine"]),
])
def test_feature_students_train_from_the_cache_without_the_teacher(workspace, name, terms):
    assert not (workspace / "data" / "teacher").exists()
    run_distill(workspace, name)
    out = workspace / "data" / "students" / name
    (row,) = train_log(out / "train_log.csv")
    assert [k for k in row if k in terms] == terms
    assert all(np.isfinite(float(row[t])) and float(row[t]) >= 0 for t in terms)
    # regressors and projections are trained with the student and dropped: the checkpoint is the student alone
    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == set(build("cnn", CNN, [1, 8, 8], 10).state_dict())


@pytest.mark.integration
def test_progressive_chain_assistant_labels_then_student_learns_from_it(workspace):
    d = workspace / "data"
    result = invoke(assistants.main, "--cache", d / "teacher_outputs", "--prepared", d / "prepared", "--out",
                    d / "assistants", "--baselines", d / "baselines", "--params", workspace / "params.yaml",
                    "--no-progress")
    assert "assistant ta: distilled and labeled" in result.stdout
    ta_cache = Cache.open(d / "assistants" / "ta" / "outputs")
    teacher_cache = Cache.open(d / "teacher_outputs")
    assert ta_cache.manifest["teacher"]["config"]["lineage"] == [teacher_cache.manifest["teacher"]["fingerprint"]]
    assert ta_cache.manifest["features"] == [] and ta_cache.manifest["top_k"] == 5
    again = invoke(assistants.main, "--cache", d / "teacher_outputs", "--prepared", d / "prepared", "--out",
                   d / "assistants", "--baselines", d / "baselines", "--params", workspace / "params.yaml",
                   "--no-progress")
    assert "unchanged, kept" in again.stdout

    run_distill(workspace, "small_via_ta")
    record = json.loads((d / "students" / "small_via_ta" / "config.json").read_text())
    assert record["teacher_fingerprint"] == ta_cache.manifest["teacher"]["fingerprint"]
    assert record["lineage"] == [ta_cache.manifest["teacher"]["fingerprint"],
                                 teacher_cache.manifest["teacher"]["fingerprint"]]


@pytest.mark.integration
def test_a_chain_of_assistants_is_distilled_in_its_order_and_a_student_learns_from_its_end(workspace):
    """teacher -> ta_large -> ta_small -> student: kd assistants trains them in the chain's order
    (listed the other way round), each from the cache of the one before, and the lineage names all."""
    d = workspace / "data"
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    large = student({}, arch_kwargs={"widths": [4, 8], "convs_per_stage": 1, "hidden": 8})
    params["assistants"] = {"ta_small": {"arch": "mlp", "arch_kwargs": {"hidden": [8]}, "epochs": 1,
                                         "assistant": "ta_large", "loss": large["loss"]},
                            "ta_large": large}
    params["students"] = {"tiny": {**STUDENTS["small_via_ta"], "assistant": "ta_small"}}
    (workspace / "chain.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    common = ["--prepared", d / "prepared", "--baselines", d / "baselines", "--params", workspace / "chain.yaml",
              "--no-progress"]
    result = invoke(assistants.main, "--cache", d / "teacher_outputs", "--out", d / "chain", *common)
    assert result.stdout.index("assistant ta_large: distilled") < result.stdout.index("assistant ta_small: distilled")
    fingerprints = {name: Cache.open(d / "chain" / name / "outputs").manifest["teacher"]
                    for name in ("ta_large", "ta_small")}
    teacher_fp = Cache.open(d / "teacher_outputs").manifest["teacher"]["fingerprint"]
    assert fingerprints["ta_small"]["config"]["lineage"] == [fingerprints["ta_large"]["fingerprint"], teacher_fp]
    invoke(distill.main, "tiny", "--cache", d / "teacher_outputs", "--students-dir", d / "chain_students",
           "--assistants", d / "chain", *common)
    record = json.loads((d / "chain_students" / "tiny" / "config.json").read_text())
    assert record["lineage"] == [fingerprints["ta_small"]["fingerprint"], fingerprints["ta_large"]["fingerprint"],
                                 teacher_fp]


@pytest.mark.unit
@pytest.mark.parametrize("chain,message", [
    ({"a": "b", "b": "a"}, "a cycle of assistants (a -> b -> a)"),
    ({"a": "nowhere"}, "'nowhere' is not an entry of assistants"),
])
def test_a_cycle_or_an_unknown_assistant_in_a_chain_is_refused(chain, message):
    from kd.distill import chain_order
    configs = [from_mapping(StudentConfig, {"name": name, "section": "assistants", "assistant": to,
                                            **student({})}, f"assistants.{name}") for name, to in chain.items()]
    with pytest.raises(ConfigError, match=re.escape(message)):
        chain_order(configs)
    with pytest.raises(ConfigError, match="cannot learn from itself"):
        from_mapping(StudentConfig, {"name": "a", "section": "assistants", "assistant": "a", **student({})},
                     "assistants.a")


@pytest.mark.integration
def test_cached_attention_map_and_full_feature_give_the_same_loss(workspace):
    """AT from the cached (B, H*W) map equals AT computed from the cached full activation."""
    cache = Cache.open(workspace / "data" / "teacher_outputs")
    cfg_map = from_mapping(StudentConfig, {"name": "a", **student(
        {"attention": {"pairs": [["stages.0", "stages.0"]]}})}, "students.a")
    model = build("cnn", CNN, [1, 8, 8], 10)
    dataset = image.rows(cache, workspace / "data" / "prepared", cfg_map, memory_mb=2048)
    batch = next(dataset.batches(0, 32, 0))
    specs = {"stages.0": cache.feature_spec("stages.0")}
    built = student_terms(cfg_map, Shapes(probe_shapes(model, [1, 8, 8], student_layers(cfg_map)), specs))
    with torch.no_grad():
        from_map = step(model, batch, built.terms, built.taps)["attention"]
    # The same loss from a full teacher activation: recompute the teacher map from its definition
    teacher_map = batch["teacher.stages.0"].float()
    with torch.no_grad(), features.tap(model, ["stages.0"]) as captured:
        model(batch["x"])
    expected = ((losses.attention_map(captured["stages.0"]) - teacher_map) ** 2).mean()
    assert torch.allclose(from_map, expected)


@pytest.mark.unit
def test_default_label_caches_exactly_what_the_default_students_need():
    params = yaml.safe_load((ROOT / "examples" / "mnist" / "params.yaml").read_text())
    path = ROOT / "examples" / "mnist" / "params.yaml"
    entries = [config.student(path, n) for n in params["students"]]
    entries += [config.student(path, n, "assistants") for n in params.get("assistants") or {}]
    needed: dict[str, set[str]] = {}
    temperatures = {1.0}  # kd eval's KL to the teacher and pseudo-label confidence
    for cfg in entries:
        for layer, modes in cfg.loss.teacher_layers(cfg.where).items():
            needed.setdefault(layer, set(modes))
            needed[layer] &= set(modes)
        temperatures |= set(needed_temperatures(cfg))
    cached = params["label"]["features"]
    assert set(cached) == set(needed), "label.features must hold every layer a default student uses, no more"
    for layer, mode in cached.items():
        assert mode in needed[layer]
        # the smallest mode that serves: attention maps and pooled vectors before full activations
        smallest = [m for m in ("attention", "pooled", "full") if m in needed[layer]][0]
        assert mode == smallest, f"label.features.{layer}: {mode} where {smallest} would do"
    assert {float(t) for t in params["label"]["temperatures"]} == temperatures
    assert (params["label"]["views"] > 0) == any(cfg.views for cfg in entries)


@pytest.mark.unit
@pytest.mark.parametrize("loss,message", [
    ({"hint": {"teacher_layer": "stages.1"}}, r"loss.hint.student_layer: missing"),
    ({"attention": {"pairs": [["stages.0"]]}}, r"loss.attention.pairs"),
    ({"attention": {"pairs": [["stages.0", "stages.0"]], "p": 0}}, r"loss.attention.p: 0 must be > 0"),
    ({"rkd": {"teacher_layer": "embed", "student_layer": "embed", "angle": -1}}, r"loss.rkd.angle: -1 must be >= 0"),
    ({"hint": {"teacher_layer": "embed", "student_layer": "embed"},
      "cosine": {"teacher_layer": "embed", "student_layer": "embed"}}, None),
    ({"hint": {"teacher_layer": "stages.0", "student_layer": "stages.0"},
      "attention": {"pairs": [["stages.0", "stages.0"]], "p": 1}}, None),
    ({"nope": {}}, r"loss.nope: unknown key"),
    ({"cosine": {"teacher_layer": "embed", "student_layer": "embed"}, "_assistant": "ta"},
     r"students.s.assistant: an assistant's cache holds no features"),
])
def test_bad_method_configs_are_refused_naming_the_key(loss, message):
    assistant = loss.pop("_assistant", None)
    data = {"name": "s", **student(loss), **({"assistant": assistant} if assistant else {})}
    if message is None:  # compatible: a layer one term needs full and another full-or-pooled
        cfg = from_mapping(StudentConfig, data, "students.s")
        assert "full" in next(iter(cfg.loss.teacher_layers("students.s").values()))
        return
    with pytest.raises(ConfigError, match=message):
        from_mapping(StudentConfig, data, "students.s")


@pytest.mark.unit
def test_conflicting_modes_for_one_teacher_layer_are_refused():
    loss = {"attention": {"pairs": [["embed", "stages.0"]], "p": 2},
            "rkd": {"teacher_layer": "embed", "student_layer": "embed"}}
    cfg = from_mapping(StudentConfig, {"name": "s", **student(loss)}, "students.s")
    assert cfg.loss.teacher_layers("students.s") == {"embed": ("full",)}  # both accept full
    loss = {"hint": {"teacher_layer": "stages.1", "student_layer": "stages.1"},
            "attention": {"pairs": [["stages.1", "stages.1"]]}}
    cfg = from_mapping(StudentConfig, {"name": "s", **student(loss)}, "students.s")
    assert cfg.loss.teacher_layers("students.s") == {"stages.1": ("full",)}


@pytest.mark.integration
def test_student_refused_when_the_cache_lacks_a_layer_or_mode(workspace):
    cache = Cache.open(workspace / "data" / "teacher_outputs")
    cfg = from_mapping(StudentConfig, {"name": "s", **student(
        {"hint": {"teacher_layer": "stages.0", "student_layer": "stages.0"}})}, "students.s")
    with pytest.raises(CacheMissingError, match=r"set label.features.stages.0: full"):
        cache.require(features=cfg.loss.teacher_layers(cfg.where))


@pytest.mark.integration
def test_unknown_student_layer_and_too_small_map_are_refused(workspace):
    cache = Cache.open(workspace / "data" / "teacher_outputs")
    model = build("cnn", CNN, [1, 8, 8], 10)
    specs = {name: cache.feature_spec(name) for name in FEATURES}
    cfg = from_mapping(StudentConfig, {"name": "s", **student(
        {"rkd": {"teacher_layer": "embed", "student_layer": "nosuch"}})}, "students.s")
    with pytest.raises(ConfigError, match=r"layer 'nosuch' not found"):
        probe_shapes(model, [1, 8, 8], student_layers(cfg))
    # the teacher's stages.0 map is 4x4; a student whose first stage is 2x2 cannot match a cached map
    small = build("cnn", {"widths": [4], "convs_per_stage": 1, "hidden": 8}, [1, 4, 4], 10)
    cfg = from_mapping(StudentConfig, {"name": "s", **student(
        {"attention": {"pairs": [["stages.0", "stages.0"]]}})}, "students.s")
    shapes = Shapes(probe_shapes(small, [1, 4, 4], ["stages.0"]), specs)
    with pytest.raises(ConfigError, match=r"students.s.loss.attention: .*set label.features.stages.0: full"):
        student_terms(cfg, shapes)


@pytest.mark.unit
def test_the_one_meaning_of_loss_hard_per_row_every_case():
    """`loader.hard_labels`, for every (labels, pseudo, threshold) and every kind of row: truth
    known or not, teacher confident or not."""
    import itertools

    from kd.cache import SoftTargets
    from kd.loader import hard_labels
    from kd.methods.hard import HardTerm

    truth = np.array([3, 3, -1, -1])  # known, known, unknown, unknown
    top1 = np.array([5, 5, 6, 6])
    confidence = np.array([0.9, 0.2, 0.9, 0.2])  # the teacher's p(top-1) at T=1
    soft = SoftTargets(ids=np.arange(4), view=np.zeros(4, np.int32), topk_idx=np.stack([top1, top1 + 1], 1),
                       topk_logit=np.zeros((4, 2), np.float16), lse={1.0: -np.log(confidence)})
    assert (hard_labels(None, truth, soft) == -1).all()
    for labels, pseudo, threshold in itertools.product([True, False], [True, False], [0.0, 0.5]):
        if not (labels or pseudo):
            continue
        got = hard_labels(HardTerm(labels=labels, pseudo=pseudo, threshold=threshold), truth, soft)
        expected = [t if labels and t >= 0 else p if pseudo and c >= threshold else -1
                    for t, p, c in zip(truth, top1, confidence)]
        assert got.tolist() == expected, (labels, pseudo, threshold)
