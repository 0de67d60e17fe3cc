"""`kd eval` and `kd report`: metric golden values, and the two stages on a real tiny pipeline.

The pipeline is built on tmp_path from real files: a prepared directory written here with
pyarrow, a small MLP teacher, a cache written by `kd.cache.label` (with the teacher's
`hidden.0` pooled, for relational KD), a teacher assistant trained and labeled by
`kd.distill.train_assistant`, and students trained by `kd.distill.train_student`
for one epoch, most with two seeds: a soft-only reference, a pseudo-label student and an RKD
student of the same architecture and budget, a student with no soft-only reference, and a
small student taught both directly and through the assistant. Independent checks recompute
agreement, KL and pseudo-label accuracy from the teacher model itself (which `kd eval` never
loads), per-seed accuracies from the seed checkpoints, and every gain of the report from
the students' seeds.csv.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from kd import evaluation, metrics, report
from kd.cache import Cache, Teacher, label
from kd.cache.targets import soft_targets
from kd.cli import eval as eval_stage
from kd.cli import report as report_stage
from kd.config import EvalConfig, LabelConfig, student
from kd.distill import assistant_cache, train_assistant, train_student
from kd.errors import InputError
from kd.report import SCORES
from kd.report import markdown as report_markdown
from kd.report import plots as report_plots
from kd.report import results as report_results
from kd.speed import count_params, torch_threads
from kd.tasks import image, image_eval
from kd.tasks.image_models import build, fingerprint, load_model, save_model
from kd.training import predict
from tests.helpers import assert_clean_error, invoke

IMAGE = SCORES["image"]  # what the report measures for image students

D, C = 6, 4  # input size and classes of the toy data
SIZES = {"labeled": 64, "unlabeled": 48, "test": 40}
BUDGET = {"epochs": 2, "batch_size": 16, "lr": 0.05}
SOFT = {"soft": {"weight": 0.9, "temperature": 4}, "hard": {"weight": 0.1, "labels": True}}
RKD = {"teacher_layer": "hidden.0", "student_layer": "hidden.0", "distance": 25, "angle": 50}
MLP8 = {"arch": "mlp", "arch_kwargs": {"hidden": [8]}, **BUDGET, "repeats": 2}
MLP4 = {"arch": "mlp", "arch_kwargs": {"hidden": [4]}, **BUDGET, "repeats": 2}
STUDENTS = {
    # one architecture and budget: the soft-only reference, pseudo-labels, soft + RKD
    "soft": {**MLP8, "loss": SOFT},
    "pseudo": {**MLP8, "loss": {"hard": {"weight": 1.0, "labels": True, "pseudo": True}}},
    "rkd": {**MLP8, "loss": {**SOFT, "rkd": RKD}},
    # another learning rate and one seed: a group without a soft-only reference
    "lonely": {**MLP4, "lr": 0.02, "repeats": 1, "loss": {"hard": {"weight": 1.0}, "rkd": RKD}},
    # progressive distillation: the same small student directly and through the assistant
    "small": {**MLP4, "loss": SOFT},
    "small_via_ta": {**MLP4, "assistant": "ta", "loss": SOFT},
    "untrained": {"arch": "mlp", "loss": {"hard": {"weight": 1.0}}},  # in params, never distilled
}
ASSISTANTS = {"ta": {"arch": "mlp", "arch_kwargs": {"hidden": [16]}, "epochs": 2, "batch_size": 16, "lr": 0.01,
                     "loss": SOFT}}
TRAINED = [name for name in STUDENTS if name != "untrained"]
EVAL = {"latency_runs": 3, "throughput_batch": 32, "throughput_runs": 2, "threads": 1}
TEACHER_CONFIG = {"arch": "mlp", "arch_kwargs": {"hidden": [32]}, "input_shape": [D], "num_classes": C}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- golden values of the metric functions -----------------------------------------------------


@pytest.mark.unit
def test_accuracy_and_agreement_golden():
    pred = np.array([0, 1, 2, 2, 1])
    y = np.array([0, 1, 1, 2, -1])  # the last row has no label and does not count
    teacher = np.array([0, 1, 1, 2, 0])
    assert metrics.accuracy(pred, y) == pytest.approx(3 / 4)
    assert metrics.agreement(pred, teacher) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="no labeled rows"):
        metrics.accuracy(pred, np.full(5, -1))


@pytest.mark.unit
def test_ece_golden_and_reliability_bins():
    # 15 bins of width 1/15: 0.95 -> bin 14, 0.55 -> bin 8, 0.50 -> bin 7
    confidence = np.array([0.95, 0.95, 0.55, 0.55, 0.50])
    correct = np.array([True, False, True, True, False])
    # bin 14: 2/5 * |0.5 - 0.95|, bin 8: 2/5 * |1 - 0.55|, bin 7: 1/5 * |0 - 0.5|
    assert metrics.ece(confidence, correct, 15) == pytest.approx(0.18 + 0.18 + 0.10)
    table = metrics.reliability(confidence, correct, 15)
    assert len(table) == 15 and sum(b["count"] for b in table) == 5
    assert [(b["bin"], b["count"], b["accuracy"]) for b in table if b["count"]] == [(7, 1, 0.0), (8, 2, 1.0),
                                                                                     (14, 2, 0.5)]
    assert table[14]["confidence"] == pytest.approx(0.95) and table[0]["accuracy"] is None
    # bins are closed on the right (Guo et al.): an edge belongs to the bin below it; 0 to the first
    edge = np.linspace(0, 1, 16)[3]
    counts = [b["count"] for b in metrics.reliability(np.array([edge, 0.0, 1.0]), np.ones(3, bool), 15)]
    assert counts[2] == 1 and counts[0] == 1 and counts[14] == 1
    assert metrics.ece(np.array([1.0, 1.0]), np.array([True, True])) == 0.0


@pytest.mark.unit
def test_kl_exact_and_bucket_golden():
    # teacher p = (0.5, 0.3, 0.2), student q = (0.4, 0.4, 0.2), as logits = log-probabilities
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    student_logits = torch.log(torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64))
    exact = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    bucket = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)  # top-1 + tail: (0.5, 0.5) vs (0.4, 0.6)
    for k, expected, is_exact in ((3, exact, True), (1, bucket, False)):
        cols = soft_targets(teacher.float(), k, [1], "float32")
        kl, flag = metrics.kl_to_teacher(student_logits, torch.tensor(cols["topk_idx"]),
                                         torch.tensor(cols["topk_logit"]), torch.tensor(cols["lse_t1"]))
        assert kl == pytest.approx(expected, rel=1e-5) and flag is is_exact


@pytest.mark.unit
def test_kl_bucket_is_a_lower_bound_of_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(64, 10, generator=g) * 3, torch.randn(64, 10, generator=g) * 3
    reference = float(F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean"))
    results = {}
    for k in (1, 3, 5, 10):
        cols = soft_targets(t, k, [1], "float16")
        results[k] = metrics.kl_to_teacher(s, torch.tensor(cols["topk_idx"]), torch.tensor(cols["topk_logit"]),
                                           torch.tensor(cols["lse_t1"]))
    assert results[10][1] and results[10][0] == pytest.approx(reference, rel=1e-2)
    for k in (1, 3, 5):
        assert not results[k][1] and 0 <= results[k][0] <= results[10][0] + 1e-6


@pytest.mark.unit
def test_pseudo_label_accuracy_matches_by_id():
    ids, teacher = np.array([5, 3, 9, 1]), np.array([0, 1, 2, 1])
    truth_ids, truth_y = np.array([1, 3, 5, 9, 7]), np.array([1, 0, 0, 2, 4])
    # 5 -> 0 right, 3 -> 0 wrong, 9 -> 2 right, 1 -> 1 right
    assert metrics.pseudo_label_accuracy(teacher, ids, truth_ids, truth_y) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no known label"):
        metrics.pseudo_label_accuracy(teacher, np.array([5, 3, 9, 2]), truth_ids, truth_y)


@pytest.mark.unit
def test_per_class_accuracy_and_confusion_matrix():
    pred, y = np.array([0, 1, 1, 2, 0]), np.array([0, 1, 2, 2, -1])
    acc, support = metrics.per_class_accuracy(pred, y, 4)
    np.testing.assert_array_equal(support, [1, 1, 2, 0])
    np.testing.assert_allclose(acc[:3], [1.0, 1.0, 0.5])
    assert math.isnan(acc[3])  # no test sample of class 3
    np.testing.assert_array_equal(metrics.confusion_matrix(pred, y, 4),
                                  [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])


@pytest.mark.unit
def test_teacher_twin_builds_built_in_archs_only():
    twin = image_eval.teacher_twin({**TEACHER_CONFIG, "params": 999})
    assert count_params(twin) == count_params(build("mlp", {"hidden": [32]}, [D], C))
    assert image_eval.teacher_twin({**TEACHER_CONFIG, "arch": "no_such_package.module:factory"}) is None
    assert image_eval.teacher_twin({"arch": "mlp"}) is None  # no shapes to build from


@pytest.mark.unit
def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.unit
def test_check_config_names_the_key():
    with pytest.raises(Exception, match="eval.throughput_runs"):
        evaluation.check_config(EvalConfig(throughput_runs=0))


@pytest.mark.unit
def test_a_size_share_keeps_the_digits_that_hold():
    from kd.report.markdown import share

    assert [share(f) for f in (5253 / 11.2e6, 0.012, 0.25, 1.5)] == ["0.047%", "1.2%", "25%", "150%"]


@pytest.mark.unit
def test_sentence_is_honest_about_signs():
    m = {"params": 250, "teacher_params": 1000, "speedup_vs_teacher": 4.04, "accuracy": 0.9,
         "baseline_accuracy": 0.904, "accuracy_retained": 0.9 / 0.95}
    assert report.sentence("a", m, IMAGE) == ("**a**: 25% of the teacher's parameters, 4.0x faster, keeps 94.7% of "
                                              "the teacher's accuracy (-0.4 points over training on labels alone).")
    m2 = {**m, "params": 1500, "speedup_vs_teacher": 0.5, "baseline_accuracy": 0.8999}
    assert report.sentence("b", m2, IMAGE) == ("**b**: 150% of the teacher's parameters, 2.0x slower, keeps 94.7% of "
                                               "the teacher's accuracy (+0.0 points over training on labels alone).")


@pytest.mark.unit
def test_mean_std_and_seed_summary_golden():
    assert metrics.mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))  # ddof = 1
    assert metrics.mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="no values"):
        metrics.mean_std([])
    rows = [{"seed": 0, "accuracy": 0.8, "baseline_accuracy": 0.7},
            {"seed": 1, "accuracy": 0.9, "baseline_accuracy": 0.7}]
    summary = metrics.seed_summary(rows)
    assert summary["seeds"] == 2 and set(summary) == set(metrics.SEED_KEYS)
    assert summary["accuracy_mean"] == pytest.approx(0.85)
    assert summary["accuracy_std"] == pytest.approx(0.1 / math.sqrt(2))
    assert summary["baseline_accuracy_mean"] == pytest.approx(0.7) and summary["baseline_accuracy_std"] == 0.0
    assert summary["gain_points_mean"] == pytest.approx(15.0)
    assert summary["gain_points_std"] == pytest.approx(10 / math.sqrt(2))


@pytest.mark.unit
def test_verdict_words_and_method_labels():
    assert report.verdict(0.3, 0.5, 3) == "no measurable gain"
    assert report.verdict(-0.3, 0.5, 3) == "no measurable gain"
    assert report.verdict(-0.8, 0.5, 3) == "hurts"
    assert report.verdict(0.8, 0.5, 3) == "helps"
    assert report.verdict(0.8, 0.0, 1) == "helps (one seed: no spread to judge by)"
    assert report.verdict(0.0, 0.0, 1).startswith("no measurable gain")
    assert report.verdict(None, None, 0) == "no common seed"
    assert report.method_label(SOFT) == "soft + hard"
    assert report.method_label({"hard": {"labels": True, "pseudo": True}}) == "hard (pseudo)"
    assert report.method_label({**SOFT, "rkd": RKD, "hint": None}) == "soft + hard + rkd"
    divergence = {"temperature": 1, "divergence": "forward_kl", "beta": None, "alpha": None}
    assert report.method_label({"soft": divergence}) == "soft"
    assert report.method_label({"soft": {**divergence, "divergence": "jsd"}}) == "soft (jsd 0.5)"
    assert report.method_label({"soft": {**divergence, "divergence": "skew_kl", "alpha": 0.2}}) == "soft (skew_kl 0.2)"
    assert report.method_label({"mapped": {**divergence, "divergence": "tvd"}}) == "mapped (tvd)"
    assert report.is_soft_only({**SOFT, "hint": None}) and not report.is_soft_only({**SOFT, "rkd": RKD})
    assert not report.is_soft_only({"hard": {"pseudo": True}})


def result_of(name: str, spec: dict, accuracies: dict[str, float]) -> report.StudentResult:
    """A StudentResult as load_student builds it, from per-seed accuracies (baselines at 0.5)."""
    seeds = {seed: {"accuracy": a, "baseline_accuracy": 0.5} for seed, a in accuracies.items()}
    m = metrics.seed_summary([{"seed": k, **v} for k, v in seeds.items()])
    m.update(params=100, teacher_params=1000, teacher_accuracy=0.9)
    return report.StudentResult(name, Path(name), m, {"student": {"name": name, **spec}}, {}, [], seeds)


@pytest.mark.unit
def test_methods_table_picks_one_reference_and_normalises_numbers():
    base = {"arch": "mlp", "arch_kwargs": {"hidden": [8]}, "epochs": 1, "batch_size": 16, "lr": 0.01, "seed": 0,
            "repeats": 2}
    results = [result_of("b_soft", {**base, "weight_decay": 0, "loss": SOFT}, {"0": 0.6, "1": 0.7}),
               result_of("a_soft", {**base, "weight_decay": 0.0, "loss": {"soft": {"temperature": 2}}},
                         {"0": 0.5, "1": 0.7}),
               result_of("c_rkd", {**base, "loss": {**SOFT, "rkd": RKD}}, {"0": 0.6, "1": 0.8, "2": 0.9}),
               result_of("d_alone", {**base, "lr": 0.1, "loss": {**SOFT, "rkd": RKD}}, {"0": 0.6, "1": 0.6})]
    rows = {row["student"]: row for row in report.methods_table(results, IMAGE)}
    assert rows["a_soft"]["role"] == "reference" and rows["a_soft"]["group"] == rows["b_soft"]["group"] == 1
    assert rows["b_soft"]["reference"] == rows["c_rkd"]["reference"] == "a_soft"
    assert rows["b_soft"]["gain_over_soft_mean"] == pytest.approx(5.0)  # (+10, 0) points
    assert rows["b_soft"]["verdict"] == "no measurable gain"  # 5 +- 7.07
    assert rows["c_rkd"]["paired_seeds"] == 2  # seed "2" has no partner
    assert rows["c_rkd"]["gain_over_soft_mean"] == pytest.approx(10.0)
    assert rows["c_rkd"]["gain_over_soft_std"] == pytest.approx(0, abs=1e-9)
    assert rows["c_rkd"]["verdict"] == "helps"
    assert rows["d_alone"]["role"] == "no soft-only reference" and rows["d_alone"]["gain_over_soft_mean"] is None
    # no direct counterpart: the only assistant-free student has another loss
    via = result_of("via", {**base, "assistant": "ta", "loss": SOFT}, {"0": 0.6, "1": 0.7})
    (row,) = report.progressive_table([via, results[2]], None, IMAGE)
    assert row["direct"] is None and row["verdict"].startswith("no direct counterpart")
    assert row["assistant_params"] is None and row["difference_mean"] is None
    (row,) = report.progressive_table([via, results[0], results[1]], None, IMAGE)
    assert row["direct"] == "b_soft" and row["difference_mean"] == 0.0 and row["verdict"] == "no measurable gain"


@pytest.mark.unit
@pytest.mark.parametrize("task", sorted(SCORES))
def test_every_task_describes_a_complete_report(task):
    score = SCORES[task]
    assert score.columns[0] == "student" and score.columns.index("seeds") < len(score.columns)
    for key in (score.key, score.baseline_key, score.change_column, score.throughput_key, f"{score.key}_mean",
                f"{score.key}_std", f"{score.change_key}_mean", f"{score.change_key}_std"):
        assert key in score.columns, key
    assert len(set(score.columns)) == len(score.columns)
    assert set(score.plots) <= set(report_plots.DRAW) and "training_curves.png" in score.plots
    shown = score.columns[1:score.columns.index("seeds")]
    assert all(c in report_markdown.HEADERS or c in (score.key, score.baseline_key, score.teacher_key,
                                                      score.change_column) for c in shown)


@pytest.mark.unit
def test_leaderboard_puts_the_best_mean_first_whichever_way_the_score_goes(tmp_path):
    def ranked(task, per_seed, twin):
        score, results = SCORES[task], []
        for name, values in per_seed.items():
            m = {c: 1 for c in score.columns if c not in ("student", score.change_column)}
            m.update(metrics.seed_summary([{score.key: v, score.baseline_key: twin} for v in values],
                                          score.key, score.change_key, score.paired))
            m.update({score.key: values[0], score.baseline_key: twin})
            results.append(report.StudentResult(name, tmp_path / name, m, {}, {}, []))
        rows = report.leaderboard(results, score)
        assert all(tuple(row) == score.columns for row in rows)
        return rows

    # "a" has the better first seed, "b" the better mean over seeds: the mean decides
    rows = ranked("causal_lm", {"a": [10.0, 50.0], "b": [20.0, 20.0], "c": [35.0, 35.0]}, 40.0)
    assert [row["student"] for row in rows] == ["b", "a", "c"]  # lower perplexity is better
    assert rows[1]["perplexity_reduction"] == pytest.approx(1 - 10 / 40)  # the first seed's, against its twin
    assert rows[1]["perplexity_reduction_mean"] == pytest.approx(1 - 30 / 40)
    rows = ranked("masked_lm", {"a": [0.9, 0.1], "b": [0.6, 0.6], "c": [0.2, 0.2]}, 0.5)
    assert [row["student"] for row in rows] == ["b", "a", "c"]  # higher accuracy is better
    assert rows[1]["accuracy_gain_points"] == pytest.approx(100 * (0.9 - 0.5))


@pytest.mark.unit
def test_a_student_of_another_task_is_refused_naming_both(tmp_path):
    directory = tmp_path / "students" / "m"
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps({"objective": "masked", "masked_accuracy": 0.5}))
    with pytest.raises(InputError, match=r"metrics.json: a student of objective 'masked', the cache's students "
                                         r"have 'causal' \(run `kd eval m` on this cache\)"):
        report_results.load_student(tmp_path / "students", "m", SCORES["causal_lm"])
    with pytest.raises(InputError, match="objective 'masked'.*have None"):
        report_results.load_student(tmp_path / "students", "m", SCORES["image"])
    (directory / "metrics.json").write_text(json.dumps({"objective": "masked", "masked_accuracy": 0.5}))
    with pytest.raises(InputError, match="missing key 'params'"):
        report_results.load_student(tmp_path / "students", "m", SCORES["masked_lm"])


# --- a real tiny pipeline ----------------------------------------------------------------------


def write_split_file(path: Path, ids, x, y, input_shape) -> None:
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False),
                        pa.field("x", pa.list_(pa.float32(), x.shape[1]), nullable=False),
                        pa.field("y", pa.int64())])
    schema = schema.with_metadata({"input_shape": json.dumps(input_shape), "num_classes": str(C), "dataset": "toy"})
    table = pa.table({"id": pa.array(ids, pa.int64()),
                      "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1]),
                      "y": pa.array(y, pa.int64(), mask=y < 0)}, schema=schema)
    pq.write_table(table, path)


def make_prepared(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1.5, (C, D))
    root.mkdir(parents=True)
    splits, start = {}, 1000
    for name, n in SIZES.items():
        y = rng.integers(0, C, n)
        x = (centers[y] + rng.normal(0, 1.0, (n, D))).astype(np.float32)
        ids = rng.permutation(np.arange(start, start + n)).astype(np.int64)
        start += n
        splits[name] = (ids, x, y)
        write_split_file(root / f"{name}.parquet", ids, x, np.full(n, -1) if name == "unlabeled" else y, [D])
    ids, _, y = splits["unlabeled"]
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "y": pa.array(y, pa.int64())}),
                   root / "unlabeled_truth.parquet")
    return splits


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    prepared = root / "data" / "prepared"
    splits = make_prepared(prepared)

    torch.manual_seed(0)
    teacher = build(TEACHER_CONFIG["arch"], TEACHER_CONFIG["arch_kwargs"], [D], C)
    _, x, y = splits["labeled"]
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.03)
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(teacher(torch.tensor(x)), torch.tensor(y)).backward()
        optimizer.step()
    teacher_dir = root / "data" / "teacher"
    save_model(teacher_dir, teacher, TEACHER_CONFIG)
    teacher, teacher_config = load_model(teacher_dir)
    cache = root / "data" / "teacher_outputs"
    label_cfg = LabelConfig(top_k=2, temperatures=[1, 4], logit_dtype="float32", part_size=24,
                            features={"hidden.0": "pooled"})
    label(Teacher(teacher, fingerprint(teacher_dir), teacher_config), prepared, cache, label_cfg,
          task_inputs=image.Inputs, progress=False)

    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"assistants": ASSISTANTS, "students": STUDENTS, "eval": EVAL}, sort_keys=False))
    students, assistants, baselines = (root / "data" / d for d in ("students", "assistants", "baselines"))
    train_assistant(student(params, "ta", "assistants"), Cache.open(cache), prepared, assistants, baselines, label_cfg,
                    progress=False)
    for name in TRAINED:
        cfg = student(params, name)
        source = cache if cfg.assistant is None else assistant_cache(assistants, cfg.assistant)
        train_student(cfg, Cache.open(source), prepared, students / name, baselines, progress=False)
    return {"root": root, "prepared": prepared, "cache": cache, "students": students, "params": params,
            "assistants": assistants, "teacher": teacher, "teacher_config": teacher_config, "splits": splits}


def eval_args(world, name, *extra):
    return (name, "--params", world["params"], "--students-dir", world["students"], "--cache", world["cache"],
            "--prepared", world["prepared"], *extra)


@pytest.fixture(scope="module")
def evaluated(world):
    return {name: invoke(eval_stage.main, *eval_args(world, name, "--ece-bins", 15)) for name in TRAINED}


@pytest.mark.integration
def test_eval_writes_every_contract_key(world, evaluated):
    for name, result in evaluated.items():
        assert result.exit_code == 0, result.output + result.stderr
        assert f"student {name}: accuracy" in result.stdout
        m = json.loads((world["students"] / name / "metrics.json").read_text())
        assert set(m) == set(image_eval.CONTRACT_KEYS) | set(image_eval.PROVENANCE_KEYS) | set(metrics.SEED_KEYS)
        assert all(isinstance(v, (int, float, bool, str)) for v in m.values())  # flat, for dvc metrics show
        for key in ("accuracy", "baseline_accuracy", "teacher_accuracy", "agreement", "ece", "pseudo_label_accuracy"):
            assert 0.0 <= m[key] <= 1.0, key
        assert m["accuracy_retained"] == pytest.approx(m["accuracy"] / m["teacher_accuracy"])
        assert m["kl_to_teacher"] >= 0 and m["kl_exact"] is False  # top-2 of 4 classes
        assert m["latency_ms"] > 0 and m["throughput"] > 0 and m["speedup_vs_teacher"] > 0
        assert m["teacher_throughput_source"] == "measured"
        model, config = load_model(world["students"] / name)
        assert m["params"] == count_params(model) == config["params"]
        assert m["size_bytes"] == (world["students"] / name / "model.safetensors").stat().st_size
        assert m["teacher_params"] == count_params(world["teacher"])


@pytest.mark.integration
def test_eval_metrics_agree_with_the_teacher_itself(world, evaluated):
    _, x, y = world["splits"]["test"]
    z = predict(world["teacher"], torch.tensor(x), [D]).double()
    teacher_pred = z.argmax(1).numpy()
    p = torch.softmax(z, 1)
    for name in evaluated:
        m = json.loads((world["students"] / name / "metrics.json").read_text())
        model, _ = load_model(world["students"] / name)
        q = torch.softmax(predict(model, torch.tensor(x), [D]).double(), 1)
        assert m["teacher_accuracy"] == pytest.approx(float((teacher_pred == y).mean()))
        assert m["accuracy"] == pytest.approx(float((q.argmax(1).numpy() == y).mean()))
        assert m["agreement"] == pytest.approx(float((q.argmax(1).numpy() == teacher_pred).mean()))
        # KL of (top-2 classes + tail bucket), written out by hand
        top = p.argsort(1, descending=True)[:, :2]
        pk, qk = p.gather(1, top), q.gather(1, top)
        pb = torch.cat([pk, (1 - pk.sum(1, keepdim=True)).clamp(min=0)], 1)
        qb = torch.cat([qk, 1 - qk.sum(1, keepdim=True)], 1)
        kl = lambda a, b: float((torch.xlogy(a, a) - torch.xlogy(a, b)).sum(1).mean())  # noqa: E731 (0 log 0 = 0)
        assert m["kl_to_teacher"] == pytest.approx(kl(pb, qb), rel=1e-4)
        exact = kl(p, q)
        assert m["kl_to_teacher"] <= exact + 1e-9
    ids, ux, uy = world["splits"]["unlabeled"]
    pseudo = predict(world["teacher"], torch.tensor(ux), [D]).argmax(1).numpy()
    m = json.loads((world["students"] / "soft" / "metrics.json").read_text())
    assert m["pseudo_label_accuracy"] == pytest.approx(float((pseudo == uy).mean()))


@pytest.mark.integration
def test_eval_writes_plot_data(world, evaluated):
    plots = world["students"] / "soft" / "plots"
    with open(plots / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    with open(plots / "confusion.csv") as f:
        confusion = list(csv.DictReader(f))
    with open(plots / "reliability.csv") as f:
        reliability = list(csv.DictReader(f))
    assert [int(r["class"]) for r in per_class] == list(range(C))
    assert sum(int(r["support"]) for r in per_class) == SIZES["test"]
    assert len(confusion) == SIZES["test"] and set(confusion[0]) == {"actual", "predicted"}
    m = json.loads((plots.parent / "metrics.json").read_text())
    assert sum(r["actual"] == r["predicted"] for r in confusion) / SIZES["test"] == pytest.approx(m["accuracy"])
    assert len(reliability) == 15 and sum(int(r["count"]) for r in reliability) == SIZES["test"]
    assert not list(plots.parent.glob(".*tmp*"))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.integration
def test_eval_summarises_every_seed(world, evaluated):
    _, x, y = world["splits"]["test"]
    for name in TRAINED:
        directory = world["students"] / name
        m = json.loads((directory / "metrics.json").read_text())
        rows = read_csv(directory / "plots" / "seeds.csv")
        repeats = STUDENTS[name].get("repeats", 1)
        assert [int(r["seed"]) for r in rows] == list(range(repeats)) and m["seeds"] == repeats
        acc = [float(r["accuracy"]) for r in rows]
        base = [float(r["baseline_accuracy"]) for r in rows]
        gains = [100 * (a - b) for a, b in zip(acc, base)]
        assert (acc[0], base[0]) == (pytest.approx(m["accuracy"]), pytest.approx(m["baseline_accuracy"]))
        assert m["accuracy_mean"] == pytest.approx(statistics.mean(acc))
        assert m["baseline_accuracy_mean"] == pytest.approx(statistics.mean(base))
        assert m["gain_points_mean"] == pytest.approx(statistics.mean(gains))
        if repeats == 1:
            assert m["accuracy_std"] == 0.0 and m["gain_points_std"] == 0.0
        else:
            assert m["accuracy_std"] == pytest.approx(statistics.stdev(acc))
            assert m["gain_points_std"] == pytest.approx(statistics.stdev(gains))
        # every further seed, and its own twin, predicted here from its checkpoint
        for row in rows[1:]:
            seed_dir = directory / "seeds" / row["seed"]
            for key, sub in (("accuracy", seed_dir), ("baseline_accuracy", seed_dir / "baseline")):
                model, _ = load_model(sub)
                pred = predict(model, torch.tensor(x), [D]).argmax(1).numpy()
                assert float(row[key]) == pytest.approx(float((pred == y).mean()))
    # the via-assistant student is measured against the original teacher's cache
    m = json.loads((world["students"] / "small_via_ta" / "metrics.json").read_text())
    assert m["teacher_params"] == count_params(world["teacher"])


@pytest.mark.integration
def test_eval_refuses_a_student_whose_seeds_are_incomplete(world, evaluated, tmp_path):
    students = tmp_path / "students"
    shutil.copytree(world["students"] / "soft", students / "soft")
    shutil.rmtree(students / "soft" / "seeds" / "1")
    before = snapshot(students / "soft")
    result = invoke(eval_stage.main, "soft", "--params", world["params"], "--students-dir", students,
                    "--cache", world["cache"], "--prepared", world["prepared"])
    assert_clean_error(result, str(students / "soft" / "seeds"), "repeats 2", "kd distill soft")
    assert snapshot(students / "soft") == before


@pytest.mark.integration
def test_evaluate_returns_plot_data_and_falls_back_for_a_custom_teacher(world):
    cache = Cache.open(world["cache"])
    cfg = EvalConfig(**EVAL)
    result = image_eval.evaluate(world["students"] / "soft", cache, world["prepared"], cfg)
    matrix = np.array(result["plots"]["confusion"])
    assert matrix.shape == (C, C) and matrix.sum() == SIZES["test"]
    assert np.trace(matrix) / SIZES["test"] == pytest.approx(result["accuracy"])
    assert len(result["plots"]["reliability"]) == 15 and len(result["plots"]["per_class"]) == C
    # a teacher whose architecture is not built in: never imported; its recorded throughput, or nothing
    custom = {**cache.manifest["teacher"]["config"], "arch": "someones_package.models:big", "throughput": 1e9}
    cache.manifest["teacher"]["config"] = custom
    result = image_eval.evaluate(world["students"] / "soft", cache, world["prepared"], cfg)
    assert result["teacher_throughput_source"] == "manifest"
    assert result["speedup_vs_teacher"] == pytest.approx(result["throughput"] / 1e9)
    del custom["throughput"]
    result = image_eval.evaluate(world["students"] / "soft", cache, world["prepared"], cfg)
    assert result["teacher_throughput_source"] == "unavailable" and result["speedup_vs_teacher"] is None
    assert result["teacher_params"] == custom["params"]


@pytest.mark.integration
def test_eval_unknown_student_is_one_clear_line(world, evaluated):
    result = invoke(eval_stage.main, *eval_args(world, "nobody"))
    assert_clean_error(result, "students.nobody", "soft")
    assert not (world["students"] / "nobody").exists()
    result = invoke(eval_stage.main, *eval_args(world, "untrained"))
    assert_clean_error(result, str(world["students"] / "untrained"), "kd distill untrained")
    assert not (world["students"] / "untrained").exists()


@pytest.mark.integration
def test_eval_refuses_test_data_the_cache_was_not_built_from(world, evaluated, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(world["prepared"], prepared)
    ids, x, y = world["splits"]["test"]
    write_split_file(prepared / "test.parquet", ids[::-1].copy(), x[::-1].copy(), y[::-1].copy(), [D])
    before = snapshot(world["students"] / "soft")
    result = invoke(eval_stage.main, *eval_args(world, "soft")[:-2], "--prepared", prepared)
    assert_clean_error(result, str(prepared / "test.parquet"), "kd label")
    assert snapshot(world["students"] / "soft") == before


def report_args(world, students, out):
    return ("--students-dir", students, "--out", out, "--params", world["params"], "--cache", world["cache"],
            "--assistants", world["assistants"])


@pytest.fixture(scope="module")
def reported(world, evaluated):
    # params.yaml's students minus the one never trained
    params = world["root"] / "report_params.yaml"
    students = {k: v for k, v in STUDENTS.items() if k != "untrained"}
    params.write_text(yaml.safe_dump({"assistants": ASSISTANTS, "students": students}))
    out = world["root"] / "data" / "report"
    result = invoke(report_stage.main, "--students-dir", world["students"], "--out", out, "--params", params,
                    "--cache", world["cache"], "--assistants", world["assistants"])
    return result, out, params


def seed_accuracies(world, name) -> dict[int, float]:
    rows = read_csv(world["students"] / name / "plots" / "seeds.csv")
    return {int(r["seed"]): float(r["accuracy"]) for r in rows}


def paired(world, name, reference) -> tuple[float, float, int]:
    """Mean and sample std (points) of name's accuracy minus reference's, seed by seed."""
    a, b = seed_accuracies(world, name), seed_accuracies(world, reference)
    diffs = [100 * (a[s] - b[s]) for s in sorted(set(a) & set(b))]
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, len(diffs)


def words(mean: float, std: float) -> str:
    return "no measurable gain" if abs(mean) <= std else ("hurts" if mean < 0 else "helps")


@pytest.mark.integration
def test_report_writes_leaderboard_sentences_and_plots(world, reported):
    result, out, _ = reported
    assert result.exit_code == 0, result.output + result.stderr
    rows = read_csv(out / "leaderboard.csv")
    assert tuple(rows[0]) == IMAGE.columns
    assert sorted(r["student"] for r in rows) == sorted(TRAINED)
    means = [float(r["accuracy_mean"]) for r in rows]
    assert means == sorted(means, reverse=True)
    text = (out / "report.md").read_text()
    assert "top-2 of 4" in text and "[1, 4]" in text
    for name in TRAINED:
        m = json.loads((world["students"] / name / "metrics.json").read_text())
        row = next(r for r in rows if r["student"] == name)
        assert float(row["gain_over_baseline_points"]) == pytest.approx(100 * (m["accuracy"] - m["baseline_accuracy"]))
        assert float(row["accuracy_mean"]) == pytest.approx(m["accuracy_mean"], abs=1e-6)
        assert int(row["seeds"]) == m["seeds"]
        assert report.sentence(name, m, IMAGE) in text
        assert "% of the teacher's parameters, " in report.sentence(name, m, IMAGE)
    assert f"| {rows[0]['student']} |" in text
    assert "Over 2 seeds: accuracy" in text
    for png in IMAGE.plots:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 1000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report")]


@pytest.mark.integration
def test_report_methods_gain_over_soft_alone(world, reported):
    _, out, _ = reported
    rows = {r["student"]: r for r in read_csv(out / "methods.csv")}
    assert tuple(next(iter(rows.values()))) == report.METHODS_COLUMNS
    assert set(rows) == set(TRAINED)
    # soft, pseudo and rkd share architecture and budget; soft (soft targets, no feature term) is the reference
    assert rows["soft"]["group"] == rows["pseudo"]["group"] == rows["rkd"]["group"]
    assert len({rows[n]["group"] for n in ("soft", "lonely", "small", "small_via_ta")}) == 4
    assert rows["soft"]["role"] == "reference" and rows["soft"]["gain_over_soft_mean"] == ""
    assert (rows["pseudo"]["method"], rows["rkd"]["method"]) == ("hard (pseudo)", "soft + hard + rkd")
    for name in ("pseudo", "rkd"):
        mean, std, n = paired(world, name, "soft")
        row = rows[name]
        assert (row["role"], row["reference"], int(row["paired_seeds"])) == ("compared", "soft", 2) and n == 2
        assert float(row["gain_over_soft_mean"]) == pytest.approx(mean, abs=1e-5)
        assert float(row["gain_over_soft_std"]) == pytest.approx(std, abs=1e-5)
        assert row["verdict"] == words(mean, std)
    for name, row in rows.items():
        m = json.loads((world["students"] / name / "metrics.json").read_text())
        acc = list(seed_accuracies(world, name).values())
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.mean(acc), abs=1e-6)
        assert int(row["seeds"]) == len(acc) == m["seeds"]
        assert float(row["gain_over_baseline_mean"]) == pytest.approx(m["gain_points_mean"], abs=1e-5)
    assert rows["lonely"]["role"] == rows["lonely"]["verdict"] == "no soft-only reference"
    assert rows["lonely"]["gain_over_soft_mean"] == "" and rows["lonely"]["reference"] == ""
    assert rows["small_via_ta"]["role"] == "reference"  # alone in its group: the assistant is part of the budget
    text = (out / "report.md").read_text()
    assert "## Methods: gain over soft targets alone" in text
    for name in ("pseudo", "rkd"):
        row = rows[name]
        assert (f"- **{name}** ({row['method']}) vs **soft** (soft alone): "
                f"{float(row['gain_over_soft_mean']):+.2f} ± {float(row['gain_over_soft_std']):.2f} points over 2 "
                f"paired seeds: {row['verdict']}.") in text.replace("-0.00", "+0.00")
    assert "- **lonely** (hard + rkd): no soft-only reference" in text


@pytest.mark.integration
def test_report_progressive_distillation(world, reported):
    _, out, _ = reported
    (row,) = read_csv(out / "progressive.csv")
    assert tuple(row) == report.PROGRESSIVE
    ta = json.loads((world["assistants"] / "ta" / "config.json").read_text())
    ta_cache = json.loads((world["assistants"] / "ta" / "outputs" / "manifest.json").read_text())
    assert (row["student"], row["assistant"], row["direct"]) == ("small_via_ta", "ta", "small")
    assert int(row["assistant_params"]) == ta["params"] == count_params(build("mlp", {"hidden": [16]}, [D], C))
    assert float(row["assistant_accuracy"]) == pytest.approx(ta_cache["fidelity"]["test"]["teacher_accuracy"])
    assert int(row["teacher_params"]) == count_params(world["teacher"])
    mean, std, n = paired(world, "small_via_ta", "small")
    assert float(row["difference_mean"]) == pytest.approx(mean, abs=1e-5)
    assert float(row["difference_std"]) == pytest.approx(std, abs=1e-5)
    assert int(row["paired_seeds"]) == n == 2 and row["verdict"] == words(mean, std)
    for key, name in (("direct_accuracy_mean", "small"), ("via_accuracy_mean", "small_via_ta")):
        assert float(row[key]) == pytest.approx(statistics.mean(seed_accuracies(world, name).values()), abs=1e-6)
    text = (out / "report.md").read_text()
    assert "## Progressive distillation" in text
    assert "- **small_via_ta** (" in text and "through **ta** (" in text and "vs **small** directly" in text


@pytest.mark.integration
def test_report_refuses_a_student_without_metrics(world, reported, tmp_path):
    _, out, params = reported
    students = tmp_path / "students"
    shutil.copytree(world["students"], students)
    (students / "pseudo" / "metrics.json").unlink()
    before = snapshot(out)
    result = invoke(report_stage.main, "--students-dir", students, "--out", out, "--params", params,
                    "--cache", world["cache"], "--assistants", world["assistants"])
    assert_clean_error(result, str(students / "pseudo" / "metrics.json"), "kd eval pseudo")
    assert snapshot(out) == before  # the previous report is untouched, nothing half-written
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report")]
    # seeds.csv gone or out of step with metrics.json: evaluated by an older `kd eval`, or half-copied
    shutil.copy(world["students"] / "pseudo" / "metrics.json", students / "pseudo" / "metrics.json")
    (students / "rkd" / "plots" / "seeds.csv").unlink()
    result = invoke(report_stage.main, *report_args(world, students, tmp_path / "report")[:4], "--params", params,
                    "--cache", world["cache"])
    assert_clean_error(result, str(students / "rkd" / "plots" / "seeds.csv"), "kd eval rkd")
    shutil.copy(world["students"] / "lonely" / "plots" / "seeds.csv", students / "rkd" / "plots" / "seeds.csv")
    result = invoke(report_stage.main, *report_args(world, students, tmp_path / "report")[:4], "--params", params,
                    "--cache", world["cache"])
    assert_clean_error(result, str(students / "rkd" / "plots" / "seeds.csv"), "counts 2 seeds", "kd eval rkd")
    assert not (tmp_path / "report").exists()
    # a student named in params.yaml that was never trained
    result = invoke(report_stage.main, *report_args(world, world["students"], tmp_path / "report"))
    assert_clean_error(result, "untrained", "kd distill untrained")
    assert not (tmp_path / "report").exists()
