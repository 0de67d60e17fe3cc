"""Tests for the soft-target divergences (kd/divergences.py, `divergence` of the top-k losses):
each against a plain implementation written here from the definitions (GKD's generalised JSD as
TRL computes it, DistiLLM's skew KLs), on the full vocabulary (k = V) and on the cache's
partition (k kept classes plus the tail bucket, or renormalised); gradcheck; properties; the
hidden-state and mapped forms; the config checks; and a student trained with each through
`kd distill`. Golden values for them live with the others in tests/golden/losses.json."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from kd import divergences, losses
from kd.config import StudentConfig, from_mapping
from kd.errors import ConfigError
from tests.helpers import assert_clean_error, invoke, label_args, ok, text_student

# (divergence, its keyword arguments): every divergence, the mixed ones at two weights
CASES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {}), ("jsd", {"beta": 0.2}), ("skew_kl", {}),
         ("skew_kl", {"alpha": 0.4}), ("skew_reverse_kl", {}), ("skew_reverse_kl", {"alpha": 0.3}), ("tvd", {})]
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in kw.items())}".rstrip("-") for name, kw in CASES]


def plain(p, q, divergence, beta=None, alpha=None):
    """D(P, Q) per row from probabilities p (teacher), q (student), (B, K), all entries > 0,
    with torch ops for autograd: the definitions, nothing shared with kd."""
    def kl(a, b):
        return (a * (a.log() - b.log())).sum(dim=1)

    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    if divergence == "jsd":  # TRL's generalized_jsd_loss: beta 0 and 1 are the two KLs themselves
        b = 0.5 if beta is None else beta
        if b == 0:
            return kl(p, q)
        if b == 1:
            return kl(q, p)
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    a = 0.1 if alpha is None else alpha
    if divergence == "skew_kl":
        return kl(p, a * p + (1 - a) * q)
    if divergence == "skew_reverse_kl":
        return kl(q, a * q + (1 - a) * p)
    assert divergence == "tvd"
    return 0.5 * (p - q).abs().sum(dim=1)


def cache_row(teacher, k, T):
    # teacher: (B, V) logits -> what the label stage stores: topk_idx, topk_logit (B, k), lse (B,)
    shifted = teacher - teacher.max(dim=1, keepdim=True).values
    logit, idx = shifted.topk(k, dim=1)
    return idx, logit, (shifted / T).logsumexp(dim=1)


def logits(rows, classes, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale


def value_and_grad(fn, student, weights):
    student = student.detach().clone().requires_grad_()
    value = fn(student)
    (grad,) = torch.autograd.grad((value * weights).sum(), student)
    return value.detach(), grad


# --------------------------------------------------------------------------------------------
# against plain implementations


@pytest.mark.unit
@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_with_every_class_kept_it_is_the_full_vocabulary_divergence(divergence, kw, T, tail, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 40)  # 3 rows of 13 classes a chunk: several chunks
    teacher, student = logits(12, 13, 1, 3.0), logits(12, 13, 2)
    weights = torch.rand(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    idx, logit, lse = cache_row(teacher, 13, T)
    got, got_grad = value_and_grad(lambda s: losses.topk_soft_target_loss_per_row(
        s, idx, logit, lse, T, tail, divergence=divergence, **kw), student, weights)
    want, want_grad = value_and_grad(lambda s: plain(F.softmax(teacher / T, 1), F.softmax(s / T, 1), divergence,
                                                     **kw), student, weights)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def coarse(teacher, student, idx, T, tail):
    """The (k+1)-class coarse-grained distributions of the full ones (the kept classes and the
    rest), or (tail="renorm") the kept classes renormalised: P, Q (B, K)."""
    p, q = F.softmax(teacher / T, 1), F.softmax(student / T, 1)
    outside = torch.ones_like(p, dtype=torch.bool).scatter_(1, idx, False)
    kept_p, kept_q = p.gather(1, idx), q.gather(1, idx)
    if tail == "renorm":
        return kept_p / kept_p.sum(1, keepdim=True), kept_q / kept_q.sum(1, keepdim=True)
    return (torch.cat([kept_p, (p * outside).sum(1, keepdim=True)], 1),
            torch.cat([kept_q, (q * outside).sum(1, keepdim=True)], 1))


@pytest.mark.unit
@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("k", [1, 4])
def test_with_k_kept_it_is_the_divergence_of_the_coarse_grained_distributions(divergence, kw, T, tail, k,
                                                                              monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 40)
    teacher, student = logits(10, 11, 4, 3.0), logits(10, 11, 5)
    weights = torch.rand(10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    idx, logit, lse = cache_row(teacher, k, T)
    got, got_grad = value_and_grad(lambda s: losses.topk_soft_target_loss_per_row(
        s, idx, logit, lse, T, tail, divergence=divergence, **kw), student, weights)
    want, want_grad = value_and_grad(lambda s: plain(*coarse(teacher, s, idx, T, tail), divergence, **kw),
                                     student, weights)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.unit
@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
def test_the_mean_loss_is_t_squared_times_the_mean_row(divergence, kw):
    teacher, student = logits(6, 9, 7, 3.0), logits(6, 9, 8).float()
    idx, logit, lse = cache_row(teacher, 3, 2.0)
    rows = losses.topk_soft_target_loss_per_row(student, idx, logit.half(), lse.float(), 2.0,
                                                divergence=divergence, **kw)
    mean = losses.topk_soft_target_loss(student, idx, logit.half(), lse.float(), 2.0, divergence=divergence, **kw)
    torch.testing.assert_close(mean, rows.mean() * 4)


@pytest.mark.unit
@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_gradcheck_in_float64(divergence, kw, tail):
    teacher, student = logits(5, 7, 9, 3.0), logits(5, 7, 10).requires_grad_()
    idx, logit, lse = cache_row(teacher, 3, 2.0)
    assert torch.autograd.gradcheck(lambda s: losses.topk_soft_target_loss_per_row(
        s, idx, logit, lse, 2.0, tail, divergence=divergence, **kw), (student,))


# --------------------------------------------------------------------------------------------
# properties


@pytest.mark.unit
@pytest.mark.parametrize("beta,same_as", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_jsd_at_beta_0_and_1_is_forward_and_reverse_kl(beta, same_as, tail):
    teacher, student = logits(8, 10, 11, 3.0), logits(8, 10, 12).float()
    idx, logit, lse = cache_row(teacher, 4, 2.0)
    weights = torch.rand(8)
    jsd = value_and_grad(lambda s: losses.topk_soft_target_loss_per_row(
        s, idx, logit.half(), lse.float(), 2.0, tail, divergence="jsd", beta=beta), student, weights)
    kl = value_and_grad(lambda s: losses.topk_soft_target_loss_per_row(
        s, idx, logit.half(), lse.float(), 2.0, tail, divergence=same_as), student, weights)
    assert torch.equal(jsd[0], kl[0]) and torch.equal(jsd[1], kl[1])


@pytest.mark.unit
@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_nonnegative_and_zero_with_gradient_zero_when_student_equals_teacher(divergence, kw, tail):
    teacher = logits(16, 12, 13, 4.0)
    idx, logit, lse = cache_row(teacher, 5, 2.0)
    for seed in range(5):
        student = logits(16, 12, 20 + seed, 3.0)
        assert (losses.topk_soft_target_loss_per_row(student, idx, logit, lse, 2.0, tail, divergence=divergence,
                                                     **kw) >= -1e-12).all()
    value, grad = value_and_grad(lambda s: losses.topk_soft_target_loss_per_row(
        s, idx, logit, lse, 2.0, tail, divergence=divergence, **kw), teacher, torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(value, torch.zeros_like(value), rtol=0, atol=1e-12)
    if divergence != "tvd":  # |P - Q| has a kink at P = Q: rounding picks a side of it
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)


@pytest.mark.unit
@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
def test_an_empty_teacher_tail_keeps_every_divergence_finite(divergence, kw):
    # float16 rounding pushes the teacher's kept mass past 1: its tail is clamped to 0 (reverse
    # KL then reads the floor of LOG_FLOOR), and the student's tail still learns
    teacher = torch.tensor([[8.0, 0.0, -30.0, -30.0, -30.0]], dtype=torch.float64)
    idx, logit, lse = cache_row(teacher, 2, 1.0)
    lse = lse - 1e-3  # the kept mass is now e^0.001 > 1
    value, grad = value_and_grad(lambda s: losses.topk_soft_target_loss_per_row(
        s, idx, logit, lse, 1.0, divergence=divergence, **kw), torch.zeros(1, 5, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64))
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    if divergence != "tvd":
        assert (grad[0, 2:] > 0).all()  # the student's tail classes are pushed down


@pytest.mark.unit
def test_only_forward_kl_takes_the_compiled_kernel():
    student = torch.zeros(4, 8)
    for divergence, kw in CASES:
        div = divergences.resolve(divergence, **kw)
        if div.name != "forward_kl":
            assert losses._kernel(student, "bucket", div) is None


# --------------------------------------------------------------------------------------------
# the other forms


@pytest.mark.unit
@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
def test_the_hidden_state_form_equals_the_logits_form(divergence, kw, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 30)  # 3 rows of 10 classes a chunk
    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(11, 6, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(10, generator=g, dtype=torch.float64).requires_grad_()
    idx, logit, lse = cache_row(logits(11, 10, 15, 3.0), 3, 2.0)
    rows = torch.rand(11, generator=g, dtype=torch.float64)
    fused = losses.topk_soft_target_loss_from_hidden(hidden, weight, idx, logit, lse, 2.0, bias,
                                                     divergence=divergence, **kw)
    fused_grads = torch.autograd.grad((fused * rows).sum(), (hidden, weight, bias))
    plain_rows = losses.topk_soft_target_loss_per_row(F.linear(hidden, weight, bias), idx, logit, lse, 2.0,
                                                      divergence=divergence, **kw)
    plain_grads = torch.autograd.grad((plain_rows * rows).sum(), (hidden, weight, bias))
    torch.testing.assert_close(fused, plain_rows)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.unit
@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_mapped_with_identical_tokenizers_is_soft_exactly(divergence, kw, tail):
    teacher, student = logits(6, 9, 16, 3.0), logits(6, 9, 17).float().requires_grad_()
    idx, logit, lse = cache_row(teacher, 4, 2.0)
    soft = losses.topk_soft_target_loss(student, idx, logit.half(), lse.float(), 2.0, tail, divergence=divergence,
                                        **kw)
    mapped = losses.mapped_soft_target_loss(student, idx, logit.half(), lse.float(), 2.0, tail,
                                            divergence=divergence, **kw)
    assert torch.equal(soft, mapped)
    assert torch.equal(*(torch.autograd.grad(loss, student)[0] for loss in (soft, mapped)))


@pytest.mark.unit
@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
def test_a_teacher_token_the_student_lacks_joins_the_tail(divergence, kw):
    # mapped with the second kept id unmapped (-1) is the top-k loss without that id: its
    # teacher probability and the student's class both fall in the tail bucket
    teacher, student = logits(6, 9, 18, 3.0), logits(6, 9, 19).requires_grad_()
    idx, logit, lse = cache_row(teacher, 4, 2.0)
    mapped_idx = idx.clone()
    mapped_idx[:, 1] = -1
    keep = [0, 2, 3]
    mapped = losses.mapped_soft_target_loss_per_row(student, mapped_idx, logit, lse, 2.0, divergence=divergence,
                                                    **kw)
    dropped = losses.topk_soft_target_loss_per_row(student, idx[:, keep], logit[:, keep], lse, 2.0,
                                                   divergence=divergence, **kw)
    torch.testing.assert_close(mapped, dropped.float() if mapped.dtype == torch.float32 else dropped)
    torch.testing.assert_close(*(torch.autograd.grad(rows.sum(), student)[0] for rows in (mapped, dropped)))


# --------------------------------------------------------------------------------------------
# config


def soft_student(**soft):
    return {"name": "s", "arch": "mlp", "epochs": 1, "batch_size": 8, "lr": 0.01,
            "loss": {"soft": {"weight": 0.9, "temperature": 4, **soft}, "hard": {"weight": 0.1}}}


@pytest.mark.unit
@pytest.mark.parametrize("soft,message", [
    ({"divergence": "kl"}, r"students.s.loss.soft.divergence: 'kl' must be one of \('forward_kl', "),
    ({"divergence": "jsd", "beta": 1.5}, r"students.s.loss.soft.beta: 1.5 must be in \[0, 1\]"),
    ({"divergence": "jsd", "beta": -0.1}, r"students.s.loss.soft.beta: -0.1 must be in \[0, 1\]"),
    ({"divergence": "skew_kl", "alpha": 0}, r"students.s.loss.soft.alpha: 0.0 must be in \(0, 1\)"),
    ({"divergence": "skew_reverse_kl", "alpha": 1}, r"students.s.loss.soft.alpha: 1.0 must be in \(0, 1\)"),
    ({"beta": 0.5}, r"students.s.loss.soft.beta: set, but divergence 'forward_kl' does not read it \(only jsd\)"),
    ({"divergence": "tvd", "alpha": 0.1},
     r"students.s.loss.soft.alpha: set, but divergence 'tvd' does not read it \(only skew_kl and skew_reverse_kl\)"),
    ({"divergence": "skew_kl", "beta": 0.1}, r"students.s.loss.soft.beta: set, but divergence 'skew_kl'"),
    ({"divergence": "reverse_kl", "targets": "sampled"},
     r"students.s.loss.soft.divergence: 'reverse_kl' needs top-k targets; targets: sampled estimates forward_kl"),
])
def test_bad_divergence_configs_are_refused_in_one_line(soft, message):
    with pytest.raises(ConfigError, match=message) as caught:
        from_mapping(StudentConfig, soft_student(**soft), "students.s")
    assert "\n" not in str(caught.value)


@pytest.mark.unit
@pytest.mark.parametrize("soft", [{}, {"divergence": "jsd"}, {"divergence": "jsd", "beta": 0}, {"divergence": "tvd"},
                                  {"divergence": "skew_reverse_kl", "alpha": 0.5}])
def test_good_divergence_configs_are_taken(soft):
    cfg = from_mapping(StudentConfig, soft_student(**soft), "students.s")
    assert cfg.loss.soft.divergence == soft.get("divergence", "forward_kl")


@pytest.mark.unit
def test_the_python_api_refuses_what_the_config_refuses():
    student, idx, logit, lse = torch.zeros(2, 5), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2), torch.ones(2)
    for kw, message in [({"divergence": "kl"}, "divergence: 'kl'"), ({"beta": 0.3}, "beta: set"),
                        ({"divergence": "jsd", "beta": 2}, r"beta: 2.0 must be in \[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            losses.topk_soft_target_loss(student, idx, logit, lse, 1.0, **kw)


# --------------------------------------------------------------------------------------------
# through the CLI


@pytest.fixture(scope="module")
def text_cache(lm_world, tmp_path_factory):
    from kd.cli import label

    out = tmp_path_factory.mktemp("divergences")
    ok(invoke(label.main, *label_args(lm_world, out / "cache", "--top-k", 8, "--temperatures", "1")))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("divergence", divergences.DIVERGENCES)
def test_a_text_student_trains_with_each_divergence_through_the_cli(divergence, lm_world, text_cache, tmp_path):
    from kd.cli import distill

    soft = {"weight": 0.5, "temperature": 1, "divergence": divergence}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"s": text_student(soft=soft,
                                                                           hard={"weight": 0.5, "labels": True})}}))
    ok(invoke(distill.main, "s", "--no-progress", "--cache", text_cache / "cache", "--prepared",
              lm_world / "prepared", "--students-dir", tmp_path / "students", "--baselines", text_cache / "baselines",
              "--params", params))
    out = tmp_path / "students" / "s"
    header, *rows = (out / "train_log.csv").read_text().strip().split("\n")
    soft_loss = float(rows[-1].split(",")[header.split(",").index("soft")])
    assert soft_loss > 0 and soft_loss == soft_loss  # finite, positive
    assert json.loads((out / "student.json").read_text())["student"]["loss"]["soft"]["divergence"] == divergence


@pytest.mark.integration
def test_a_divergence_with_sampled_targets_is_refused_through_the_cli_in_one_line(lm_world, text_cache, tmp_path):
    from kd.cli import distill

    soft = {"weight": 0.5, "temperature": 1, "divergence": "jsd", "targets": "sampled"}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"text_students": {"s": text_student(soft=soft)}}))
    assert_clean_error(invoke(distill.main, "s", "--no-progress", "--cache", text_cache / "cache", "--prepared",
                              lm_world / "prepared", "--students-dir", tmp_path / "students", "--params", params),
                       "text_students.s.loss.soft.divergence: 'jsd' needs top-k targets")
