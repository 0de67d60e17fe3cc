"""Tests for kd/losses.py: golden values from an independent reference, then properties.

The golden fixture tests/golden/losses.json is written only by tests/golden/make_golden.py;
this module rebuilds the same inputs with that script's build_inputs() and compares.
"""

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd import kernels, losses

GOLDEN_DIR = Path(__file__).parent / "golden"
FIXTURE = GOLDEN_DIR / "losses.json"


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _load_make_golden()

# --------------------------------------------------------------------------------------------
# golden values

# Every case the fixture must hold, by the function it exercises.
GOLDEN_CASES = {
    "soft_target_loss": ["soft_T1", "soft_T4"],
    "topk_soft_target_loss": [
        "topk_bucket_T4_k3_fp16", "topk_bucket_T1_k5_fp32", "topk_bucket_T2_kC_fp32",
        "topk_bucket_T1_k2_fp16_scale30", "topk_renorm_T4_k3_fp16", "topk_renorm_T2_k5_fp32",
        "topk_renorm_T2_kC_fp32", "topk_reverse_kl_T2_k3_fp16", "topk_jsd_beta03_T1_k4_fp32",
        "topk_skew_kl_T4_k3_fp16", "topk_skew_reverse_kl_alpha02_T2_k5_renorm_fp32", "topk_tvd_T2_kC_fp32",
    ],
    "topk_soft_target_loss_per_row": [
        "topk_per_row_bucket_T4_k3_fp16", "topk_per_row_renorm_T1_k4_fp32", "topk_per_row_jsd_renorm_T2_k3_fp32",
        "topk_per_row_skew_reverse_kl_T1_k2_fp16",
    ],
    "topk_soft_target_loss_from_hidden": [
        "topk_hidden_bucket_T2_k3_fp16", "topk_hidden_bucket_T1_k4_fp32_no_bias", "topk_hidden_reverse_kl_T2_k3_fp16",
        "topk_hidden_tvd_T1_k4_fp32_no_bias",
    ],
    "hint_loss": ["hint_4d", "hint_2d"],
    "attention_map": ["attention_map_p2", "attention_map_p1", "attention_map_1d_p2"],
    "attention_transfer_loss": [
        "at_p2_same_size", "at_p1_same_size", "at_p2_student_larger", "at_p1_student_larger",
        "at_p2_teacher_larger_uneven", "at_p2_1d_student_larger",
    ],
    "attention_map_loss": ["attention_map_loss_fp16_teacher"],
    "rkd_distance_loss": ["rkd_distance"],
    "rkd_angle_loss": ["rkd_angle", "rkd_angle_degenerate"],
    "cosine_embedding_loss": [
        "cosine_3d_mask", "cosine_3d_no_mask", "cosine_2d_mask", "cosine_empty_mask",
    ],
    "sampled_soft_target_loss": ["sampled_T1_n8", "sampled_T4_n3_scale30"],
    "sampled_soft_target_loss_per_row": ["sampled_per_row_T2_n16"],
    "mapped_soft_target_loss": ["mapped_bucket_T2_k6_fp16", "mapped_renorm_T1_k5_fp32", "mapped_skew_kl_T2_k6_fp16"],
    "mapped_soft_target_loss_per_row": ["mapped_per_row_bucket_T1_k4_fp32", "mapped_per_row_jsd_T1_k5_fp32"],
    "uld_loss": ["uld_T1_k4_fp16", "uld_T2_kC_student_smaller_fp32"],
    "uld_loss_per_row": ["uld_per_row_T1_k3_fp32"],
}
KNOWN = {key: fn for fn, keys in GOLDEN_CASES.items() for key in keys}


@pytest.fixture(scope="module")
def golden():
    return json.loads(FIXTURE.read_text())["cases"]


@pytest.mark.unit
def test_fixture_has_no_unknown_cases(golden):
    unknown = sorted(set(golden) - set(KNOWN))
    assert not unknown, f"cases in {FIXTURE.name} this test does not know: {unknown}"


@pytest.mark.unit
def test_every_public_function_has_golden_cases():
    public = {
        name for name, f in inspect.getmembers(losses, inspect.isfunction)
        if not name.startswith("_") and f.__module__ == losses.__name__
    }
    assert public == set(GOLDEN_CASES)


@pytest.mark.unit
@pytest.mark.parametrize("key", sorted(KNOWN))
def test_golden(golden, key):
    if key not in golden:
        pytest.fail(f"case {key!r} missing from {FIXTURE}; run tests/golden/make_golden.py")
    case = golden[key]
    assert case["fn"] == KNOWN[key]
    got = getattr(losses, case["fn"])(**make_golden.build_inputs(case), **case["kwargs"])
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.detach().double().numpy(), case["expected"],
                               rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------
# properties


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _cache_row(teacher_logits, k, temperature, dtype=torch.float32):
    # teacher_logits: (B, C) -> what the label stage stores: topk_idx, topk_logit (B, k); lse (B,)
    z_max = teacher_logits.max(dim=1, keepdim=True).values
    vals, idx = teacher_logits.topk(k, dim=1)
    lse = ((teacher_logits - z_max) / temperature).logsumexp(dim=1)
    return idx.int(), (vals - z_max).to(dtype), lse


def _at_features(seed=0):
    return _randn(4, 3, 6, 6, seed=seed), _randn(4, 5, 6, 6, seed=seed + 1)


# name -> (loss(student, teacher), student, teacher); teacher=None means "same as student"
def _loss_cases():
    z = _randn(8, 10, seed=1, scale=3.0)
    s_at, t_at = _at_features()
    hidden, mask = _randn(3, 5, 8, seed=2), _randn(3, 5, seed=3) > 0
    return {
        "soft": (lambda s, t: losses.soft_target_loss(s, t, 4.0), z, _randn(8, 10, seed=4)),
        "topk_bucket": (lambda s, t: losses.topk_soft_target_loss(s, *_cache_row(t, 3, 2.0), 2.0),
                        z, _randn(8, 10, seed=4)),
        "topk_renorm": (lambda s, t: losses.topk_soft_target_loss(
            s, *_cache_row(t, 3, 2.0), 2.0, tail="renorm"), z, _randn(8, 10, seed=4)),
        "hint": (losses.hint_loss, s_at, _randn(4, 3, 6, 6, seed=5)),
        "attention": (losses.attention_transfer_loss, s_at, t_at),
        "attention_map": (lambda s, t: losses.attention_map_loss(
            losses.attention_map(s), losses.attention_map(t)), s_at, t_at),
        "rkd_distance": (losses.rkd_distance_loss, _randn(6, 5, seed=6), _randn(6, 8, seed=7)),
        "rkd_angle": (losses.rkd_angle_loss, _randn(6, 5, seed=6), _randn(6, 8, seed=7)),
        "cosine": (lambda s, t: losses.cosine_embedding_loss(s, t, mask), hidden,
                   _randn(3, 5, 8, seed=8)),
    }


LOSS_NAMES = list(_loss_cases())


@pytest.mark.unit
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_zero_when_student_equals_teacher(name):
    loss, student, _ = _loss_cases()[name]
    assert loss(student, student.clone()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradient_reaches_student_only(name):
    loss, student, teacher = _loss_cases()[name]
    student = student.clone().requires_grad_(True)  # the teacher never needs grad
    value = loss(student, teacher)
    value.backward()
    assert value.item() > 0
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.unit
@pytest.mark.parametrize("loss", [losses.rkd_distance_loss, losses.rkd_angle_loss])
def test_rkd_teacher_side_has_no_grad(loss):
    student = _randn(6, 5, seed=0).requires_grad_(True)
    teacher = _randn(6, 8, seed=1).requires_grad_(True)
    loss(student, teacher).backward()
    assert teacher.grad is None


@pytest.mark.unit
@pytest.mark.parametrize("loss", [losses.rkd_distance_loss, losses.rkd_angle_loss])
def test_rkd_invariant_to_embedding_scale(loss):
    s, t = _randn(7, 5, seed=0), _randn(7, 8, seed=1)
    expected = loss(s, t)
    torch.testing.assert_close(loss(s * 3.7, t), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss(s, t * 0.2), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.unit
def test_rkd_angle_degenerate_triples_are_finite():
    s = _randn(5, 4, seed=0).requires_grad_(True)
    t = _randn(5, 4, seed=1)
    t[1] = t[0]  # zero vectors x_1 - x_0 on the teacher side
    s_dup = torch.cat([s[:1], s[:1], s[2:]])  # and on the student side
    value = losses.rkd_angle_loss(s_dup, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


@pytest.mark.unit
@pytest.mark.parametrize("p", [1, 2])
def test_attention_ignores_student_channel_count(p):
    s, t = _at_features()
    doubled = torch.cat([s, s], dim=1)  # same channel mean, twice the channels
    torch.testing.assert_close(losses.attention_transfer_loss(doubled, t, p),
                               losses.attention_transfer_loss(s, t, p))


@pytest.mark.unit
def test_attention_map_is_row_major_and_normalised():
    f = torch.zeros(2, 3, 3, 4)
    f[:, :, 1, 2] = 5.0
    f[1, 0, 0, 0] = 1.0
    a = losses.attention_map(f)
    assert a.shape == (2, 12)
    assert a[0].argmax().item() == 1 * 4 + 2
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))


@pytest.mark.unit
def test_attention_map_loss_matches_attention_transfer_loss():
    s, t = _at_features()
    cached = losses.attention_map(t).half()  # the cache stores maps as float16
    torch.testing.assert_close(losses.attention_map_loss(losses.attention_map(s), cached),
                               losses.attention_transfer_loss(s, t), rtol=1e-2, atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("scale", [1.0, 3.0, 30.0])
def test_topk_with_all_classes_equals_soft_target_loss(tail, temperature, scale):
    s = _randn(16, 10, seed=1, scale=scale)
    t = _randn(16, 10, seed=2, scale=scale)
    got = losses.topk_soft_target_loss(s, *_cache_row(t, 10, temperature), temperature, tail)
    torch.testing.assert_close(got, losses.soft_target_loss(s, t, temperature),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_bucket_tail_never_exceeds_full_loss(k, temperature):
    # KL of the coarse-grained distributions <= KL of the full ones (data processing)
    for seed in range(5):
        s, t = _randn(32, 10, seed=seed, scale=3.0), _randn(32, 10, seed=seed + 100, scale=3.0)
        full = losses.soft_target_loss(s, t, temperature)
        bucket = losses.topk_soft_target_loss(s, *_cache_row(t, k, temperature), temperature)
        assert bucket.item() <= full.item() + 1e-6


@pytest.mark.unit
def test_bucket_tail_clamped_when_float16_mass_exceeds_one():
    s = _randn(4, 10, seed=0)
    idx, topk_logit, lse = _cache_row(_randn(4, 10, seed=1, scale=30.0), 3, 1.0, torch.float16)
    lse = lse - 1e-3  # kept mass now a hair past 1
    per_row = losses.topk_soft_target_loss_per_row(s, idx, topk_logit, lse, 1.0)
    assert torch.isfinite(per_row).all()


@pytest.mark.unit
def test_per_row_is_what_the_mean_is_built_from():
    # token-level rows: (B*L, C), nothing assumes one prediction per sample
    s, t = _randn(3 * 7, 10, seed=0), _randn(3 * 7, 10, seed=1)
    row = _cache_row(t, 4, 2.0, torch.float16)
    per_row = losses.topk_soft_target_loss_per_row(s, *row, 2.0)
    assert per_row.shape == (21,)
    torch.testing.assert_close(per_row.mean() * 4.0, losses.topk_soft_target_loss(s, *row, 2.0))


@pytest.mark.unit
def test_unknown_tail_raises():
    s, t = _randn(4, 10, seed=0), _randn(4, 10, seed=1)
    with pytest.raises(ValueError, match="tail must be one of .*'truncate'"):
        losses.topk_soft_target_loss(s, *_cache_row(t, 3, 1.0), 1.0, tail="truncate")


@pytest.mark.unit
def test_cosine_empty_mask_is_zero_and_keeps_graph():
    s = _randn(2, 3, 4, seed=0).requires_grad_(True)
    value = losses.cosine_embedding_loss(s, _randn(2, 3, 4, seed=1), torch.zeros(2, 3, dtype=torch.bool))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert (s.grad == 0).all()


@pytest.mark.unit
def test_cosine_mask_selects_rows():
    s, t = _randn(2, 3, 4, seed=0), _randn(2, 3, 4, seed=1)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.testing.assert_close(losses.cosine_embedding_loss(s, t, mask),
                               losses.cosine_embedding_loss(s[mask], t[mask]))


@pytest.mark.unit
def test_hint_regressor_learns_exact_linear_map():
    # FitNets: the regressor maps the student's feature onto the teacher's
    student = _randn(64, 6, seed=0)
    A = _randn(9, 6, seed=1)
    teacher = student @ A.T
    torch.manual_seed(0)
    regressor = torch.nn.Linear(6, 9)
    opt = torch.optim.LBFGS(regressor.parameters(), lr=1, max_iter=200,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = losses.hint_loss(regressor(student), teacher)
        loss.backward()
        return loss

    opt.step(closure)
    assert losses.hint_loss(regressor(student), teacher).item() < 1e-6


def plain_topk_kl(student_logits, topk_idx, topk_logit, lse, T, tail):
    """The per-row top-k KL written out with torch ops, for autograd to differentiate."""
    t_logp = topk_logit.to(student_logits.dtype) / T - lse[:, None]
    s_logp_all = F.log_softmax(student_logits / T, dim=1)
    s_logp = s_logp_all.gather(1, topk_idx)
    if tail == "renorm":
        log_p, log_q = F.log_softmax(t_logp, dim=1), F.log_softmax(s_logp, dim=1)
    elif topk_idx.shape[1] == student_logits.shape[1]:
        log_p, log_q = t_logp, s_logp
    else:
        t_tail = (1 - t_logp.exp().sum(1)).clamp(min=0)
        outside = torch.ones_like(s_logp_all, dtype=torch.bool).scatter_(1, topk_idx, False)
        s_log_tail = s_logp_all.masked_fill(~outside, float("-inf")).logsumexp(1)
        log_p, log_q = torch.cat([t_logp, t_tail.log()[:, None]], 1), torch.cat([s_logp, s_log_tail[:, None]], 1)
    return torch.where(log_p.exp() > 0, log_p.exp() * (log_p - log_q), 0.0).sum(1)


@pytest.fixture(params=["chunked", "kernel"])
def topk_form(request, monkeypatch):
    """Each form of the top-k KL in turn: the PyTorch one (`_TopkKL`, kernels off; a test sets
    CHUNK_ELEMENTS so that several chunks are used) and the compiled kernel (`kernels.topk_kl`),
    which the bucket tail takes for small CPU logits. A machine without a C++ compiler skips
    the kernel; one with a compiler must build it."""
    if request.param == "chunked":
        monkeypatch.setenv(kernels.SWITCH, "0")
    else:
        if kernels.compiler() is None:
            pytest.skip("no C++ compiler to build the kernel with")
        monkeypatch.setenv(kernels.SWITCH, "1")
        assert kernels.topk_kl() is not None, "a C++ compiler is here, but the kernel did not build"
    return request.param


@pytest.mark.unit
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_loss_closed_form_gradient_equals_autograd(tail, k, dtype, topk_form, monkeypatch):
    """The closed-form backward of topk_soft_target_loss_per_row equals autograd through a plain
    implementation of the same KL, in both forms: chunked (chunks of a few rows, so that several
    are used) and the compiled kernel (the bucket tail; renorm takes the chunked form anyway)."""
    if topk_form == "chunked":
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 50)  # 5 rows of 10 classes per chunk: 7 chunks
    g = torch.Generator().manual_seed(k)
    teacher = torch.randn(32, 10, generator=g, dtype=torch.float64) * 4
    shifted = teacher - teacher.max(1, keepdim=True).values
    topk_logit, topk_idx = shifted.topk(k, dim=1)
    lse = torch.logsumexp(shifted / 3, dim=1)
    topk_logit = topk_logit.to(torch.float16 if dtype == torch.float32 else dtype)
    weights = torch.rand(32, generator=g, dtype=dtype)
    student = (torch.randn(32, 10, generator=g, dtype=dtype) * 2).requires_grad_()
    assert (losses._kernel(student, tail) is not None) == (topk_form == "kernel" and tail == "bucket")
    fused = losses.topk_soft_target_loss_per_row(student, topk_idx, topk_logit, lse.to(dtype), 3, tail)
    (fused_grad,) = torch.autograd.grad((fused * weights).sum(), student)
    reference = plain_topk_kl(student, topk_idx, topk_logit, lse.to(dtype), 3, tail)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), student)
    torch.testing.assert_close(fused, reference.detach())
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fused_grad, reference_grad, rtol=tolerance * 10, atol=tolerance)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda s: losses.topk_soft_target_loss_per_row(s, topk_idx, topk_logit, lse, 3, tail), (student,))


@pytest.mark.unit
def test_topk_loss_is_exact_when_the_students_tail_underflows(topk_form, monkeypatch):
    """A student sure of its top-k (its tail under exp's float32 range): the tail's logsumexp is
    taken on its own, so the loss and gradient stay finite and equal the float64 figures."""
    if topk_form == "chunked":
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 10)  # a chunk per row
    student = torch.full((4, 10), -150.0)
    student[:, :3] = torch.tensor([0.0, -1.0, -2.0])
    student = student.requires_grad_()
    teacher = torch.tensor([0.0, -0.5, -1.0] + [-3.0] * 7).repeat(4, 1)
    topk_logit, topk_idx = teacher.topk(3, dim=1)
    lse = teacher.logsumexp(1)
    fused = losses.topk_soft_target_loss_per_row(student, topk_idx, topk_logit, lse, 1.0)
    (grad,) = torch.autograd.grad(fused.sum(), student)
    wide = student.detach().double().requires_grad_()
    reference = plain_topk_kl(wide, topk_idx, topk_logit.double(), lse.double(), 1.0, "bucket")
    (reference_grad,) = torch.autograd.grad(reference.sum(), wide)
    assert torch.isfinite(fused).all() and fused.min() > 10  # the teacher's 0.14 tail costs ~150 nats x 0.14
    torch.testing.assert_close(fused.double(), reference.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.unit
def test_a_kept_entry_of_probability_zero_adds_nothing(topk_form, monkeypatch):
    """A cached entry whose logit is -inf (what `mapped` gives a merged-away id) has p = 0: it
    adds 0, not 0 * inf = NaN, in both forms of the loss; the gradient stays finite."""
    if topk_form == "chunked":
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 10)
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 7, generator=g).requires_grad_()
    teacher = torch.randn(4, 7, generator=g) * 2
    shifted = teacher - teacher.max(1, keepdim=True).values
    topk_logit, topk_idx = shifted.topk(4, dim=1)
    lse = shifted.logsumexp(1)
    topk_logit[:, -1] = float("-inf")
    kl = losses.topk_soft_target_loss_per_row(student, topk_idx, topk_logit, lse, 1.0)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    expected = plain_topk_kl(student.detach().double(), topk_idx, topk_logit.double(), lse.double(), 1.0, "bucket")
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad).all()


@pytest.mark.unit
def test_topk_loss_with_a_student_that_has_no_tail(topk_form, monkeypatch):
    """A student whose logits outside the teacher's top-k are -inf (masked) while the teacher
    keeps mass there: the KL is +inf, as it should be, and the gradient stays finite (no NaN
    to poison the step), 0 outside the top-k and q * mass - p on it."""
    if topk_form == "chunked":
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 10)
    student = torch.full((3, 6), float("-inf"))
    student[:, :3] = torch.tensor([[0.0, -1.0, 0.5]])
    student = student.requires_grad_()
    teacher = torch.tensor([[0.0, -0.3, -0.9, -2.0, -2.0, -2.0]]).repeat(3, 1)
    topk_logit, topk_idx = teacher.topk(3, dim=1)
    lse = teacher.logsumexp(1)
    kl = losses.topk_soft_target_loss_per_row(student, topk_idx, topk_logit, lse, 1.0)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    assert torch.isinf(kl).all()
    p = (topk_logit - lse[:, None]).exp()
    q = student.detach()[:, :3].softmax(1)
    torch.testing.assert_close(grad[:, :3], q - p)  # the teacher's whole mass is 1
    assert (grad[:, 3:] == 0).all()


@pytest.mark.unit
def test_the_kernel_and_the_pytorch_form_give_the_same_mean_loss_and_gradient(topk_form):
    """topk_soft_target_loss (mean over rows x T^2, which the kernel takes inside) is the same
    in both forms, on a float16 cache with some rows' kept mass past 1 by rounding."""
    topk_idx, topk_logit, lse = _cache_row(_randn(64, 10, seed=7, scale=6.0), 5, 4.0, torch.float16)
    student = _randn(64, 10, seed=8, scale=2.0).requires_grad_()
    loss = losses.topk_soft_target_loss(student, topk_idx, topk_logit, lse, 4.0)
    (grad,) = torch.autograd.grad(loss, student)
    with kernels.disabled():
        plain_student = student.detach().clone().requires_grad_()
        expected = losses.topk_soft_target_loss(plain_student, topk_idx, topk_logit, lse, 4.0)
        (expected_grad,) = torch.autograd.grad(expected, plain_student)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.unit
def test_the_kernel_refuses_ids_outside_the_students_classes(topk_form):
    """An id past the student's classes is refused in one line naming both (the PyTorch form's
    gather refuses it too), not read out of bounds."""
    student = torch.zeros(2, 4, requires_grad=True)
    topk_idx, topk_logit, lse = torch.tensor([[0, 4], [1, 2]]), torch.zeros(2, 2), torch.zeros(2)
    with pytest.raises((RuntimeError, IndexError), match="4"):
        losses.topk_soft_target_loss_per_row(student, topk_idx, topk_logit, lse, 1.0)


FAILED_BUILD = """
import torch, warnings
from kd import kernels, losses
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert kernels.topk_kl() is None
print("WARNED", " | ".join(str(w.message) for w in caught))
student = torch.randn(8, 10, requires_grad=True)
teacher = torch.randn(8, 10)
topk_logit, topk_idx = teacher.topk(3, dim=1)
loss = losses.topk_soft_target_loss(student, topk_idx, topk_logit, teacher.logsumexp(1), 2.0)
loss.backward()
assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
print("TRAINED")
"""


@pytest.mark.integration
@pytest.mark.parametrize("compiler", ["false", "no-such-compiler"])
def test_without_a_working_compiler_the_loss_takes_its_pytorch_form(compiler, tmp_path):
    """A compiler that fails (/bin/false, in a fresh process and an empty extensions folder, so
    that the build really runs) or none at all leaves the PyTorch form with one warning naming
    the reason, and the loss still trains."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), kernels.SWITCH: "1",
           "CXX": compiler if compiler == "false" else str(tmp_path / compiler)}
    done = subprocess.run([sys.executable, "-c", FAILED_BUILD], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    warned = next(line for line in done.stdout.splitlines() if line.startswith("WARNED"))
    assert ("did not build" if compiler == "false" else "no C++ compiler") in warned
    assert warned.count("kd: ") == 1 and "TRAINED" in done.stdout


@pytest.mark.unit
def test_the_hidden_state_variant_equals_the_loss_on_projected_logits(monkeypatch):
    """Values and gradients (hidden state, weight, bias) of topk_soft_target_loss_from_hidden
    equal topk_soft_target_loss_per_row on hidden @ weight.T + bias, with several chunks."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * 11)  # 3 rows of 11 classes per chunk
    hidden, weight, bias = _randn(10, 7, seed=1), _randn(11, 7, seed=2, scale=0.5), _randn(11, seed=3)
    topk_idx, topk_logit, lse = _cache_row(_randn(10, 11, seed=4, scale=3.0), 4, 2.0, torch.float16)
    weights = torch.rand(10, generator=torch.Generator().manual_seed(5))
    grads = []
    for fused in (True, False):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        kl = (losses.topk_soft_target_loss_from_hidden(h, w, topk_idx, topk_logit, lse, 2.0, bias=b) if fused else
              losses.topk_soft_target_loss_per_row(h @ w.T + b, topk_idx, topk_logit, lse, 2.0))
        grads.append((kl.detach(), *torch.autograd.grad((kl * weights).sum(), (h, w, b))))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    wide = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(lambda h, w, b: losses.topk_soft_target_loss_from_hidden(
        h, w, topk_idx, topk_logit.double(), lse.double(), 2.0, bias=b), wide)


# --------------------------------------------------------------------------------------------
# sampled soft targets: an unbiased estimate of the full soft-target loss


def _draws(teacher_logits, temperature, draws, repeats, seed=0):
    # `repeats` independent sets of `draws` draws per teacher row, as the label stage stores them
    g = torch.Generator().manual_seed(seed)
    z = teacher_logits.repeat(repeats, 1)
    return make_golden.sampled_row(z, draws, temperature, g)


@pytest.mark.unit
@pytest.mark.parametrize("temperature, draws", [(1.0, 4), (4.0, 1), (2.0, 12)])
def test_sampled_loss_mean_over_draws_is_the_full_kl(temperature, draws):
    # The mean of the per-row estimate over many independent draws converges to the full KL
    # (within 5 standard errors), and the mean of its gradient to the full gradient.
    B, C, repeats = 4, 20, 4000
    teacher, student = _randn(B, C, seed=11, scale=2.0), _randn(B, C, seed=12, scale=2.0)
    rows = _draws(teacher, temperature, draws, repeats)
    logits = student.repeat(repeats, 1).requires_grad_(True)
    kl = losses.sampled_soft_target_loss_per_row(logits, rows["sample_idx"], rows["sample_count"],
                                                 rows["entropy"], temperature)
    kl.sum().backward()  # row r's gradient is d kl_r / d logits_r: rows are independent
    exact = student.clone().requires_grad_(True)
    full_kl = F.kl_div(F.log_softmax(exact / temperature, 1), F.softmax(teacher / temperature, 1),
                       reduction="none").sum(1)
    full_kl.sum().backward()
    values, grads = kl.detach().view(repeats, B), logits.grad.view(repeats, B, C)
    se = values.std(0) / repeats**0.5
    assert ((values.mean(0) - full_kl.detach()).abs() <= 5 * se + 1e-6).all()
    g_se = grads.std(0) / repeats**0.5
    assert ((grads.mean(0) - exact.grad).abs() <= 5 * g_se + 1e-6).all()
    # and the estimate is not the full KL row by row (the test above could not fail otherwise)
    assert (values - full_kl.detach()).abs().max() > 1e-3


@pytest.mark.unit
def test_sampled_loss_is_the_top_k_loss_scaled_when_every_draw_is_the_top_class():
    # A teacher so peaked that every draw is its top-1: the estimate is the cross-entropy at that
    # class minus the (near-zero) entropy, which is the full KL.
    teacher = torch.zeros(3, 6)
    teacher[:, 2] = 60.0
    student = _randn(3, 6, seed=3)
    rows = _draws(teacher, 1.0, 5, 1)
    assert (rows["sample_idx"][:, 0] == 2).all() and (rows["sample_count"][:, 0] == 5).all()
    torch.testing.assert_close(losses.sampled_soft_target_loss(student, **rows, temperature=1.0),
                               losses.soft_target_loss(student, teacher, 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_sampled_loss_ignores_padding_and_keeps_float64():
    student = _randn(2, 7, seed=4).double()
    idx = torch.tensor([[1, 3, 0], [5, 0, 0]])
    padded = losses.sampled_soft_target_loss_per_row(student, idx, torch.tensor([[2, 1, 0], [3, 0, 0]]),
                                                     torch.zeros(2), 1.0)
    moved = losses.sampled_soft_target_loss_per_row(student, idx.flip(1), torch.tensor([[0, 1, 2], [0, 0, 3]]),
                                                     torch.zeros(2), 1.0)
    assert padded.dtype == torch.float64
    torch.testing.assert_close(padded, moved)
