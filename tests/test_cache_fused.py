"""The soft targets and statistics of `kd label` read in chunks of rows (`targets.scan`) equal the
straightforward whole-batch forms they replaced (kept here as the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.cache import targets
from kd.cache.batch import Batch
from kd.cache.layout import lse_column, temperature_key
from kd.cache.targets import Tally, batch_columns, fidelity_sums, finite_rows, soft_targets
from kd.config import LabelConfig

pytestmark = pytest.mark.unit


def reference_soft_targets(logits, top_k, temperatures, dtype):
    """The whole-batch form: (R, C) temporaries for the shift and each temperature."""
    logits = logits.float()
    logit_max = logits.max(dim=1).values
    shifted = logits - logit_max[:, None]
    topk_logit, topk_idx = shifted.topk(top_k, dim=1, sorted=True)
    if dtype == "float16":
        topk_logit = topk_logit.clamp(min=targets.FLOAT16_MIN)
    cols = {"topk_idx": topk_idx.to(torch.int32).numpy(), "topk_logit": topk_logit.to(getattr(torch, dtype)).numpy(),
            "logit_max": logit_max.numpy()}
    for t in temperatures:
        cols[lse_column(t)] = torch.logsumexp(shifted / float(t), dim=1).numpy()
    return cols


def reference_fidelity_sums(logits, cols, temperatures):
    """The whole-batch form: the teacher's full softmax p built per temperature."""
    z = logits.float()
    num_classes = z.shape[1]
    idx = torch.tensor(cols["topk_idx"], dtype=torch.long)
    kept_logit = torch.tensor(cols["topk_logit"], dtype=torch.float32)
    k = idx.shape[1]
    sums = {}
    for t in temperatures:
        lse = torch.tensor(cols[lse_column(t)])
        scaled = z / float(t)
        full_lse = torch.logsumexp(scaled, dim=1)
        p_full = scaled.sub_(full_lse[:, None]).exp_()
        neg_entropy = torch.einsum("nc,nc->n", p_full, z) / float(t) - full_lse
        log_q = kept_logit / float(t) - lse[:, None]
        kept = torch.exp(log_q).sum(1)
        p_at_kept = p_full.gather(1, idx)
        kl = neg_entropy - (p_at_kept * log_q).sum(1)
        if k < num_classes:
            tail = ((1 - kept).clamp(min=0) / (num_classes - k)).clamp(min=1e-30)
            kl -= (1 - p_at_kept.sum(1)).clamp(min=0) * torch.log(tail)
        sums[f"kept_mass_{temperature_key(t)}"] = float(kept.sum())
        sums[f"kl_{temperature_key(t)}"] = float(kl.clamp(min=0).sum())
    return sums


def lm_like(rows, classes, seed=0, dtype=torch.float32):
    """Logits with a language model's spread (a few large, a long tail) and ties where dtype rounds."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, classes, generator=g) * 2 + torch.rand(rows, 1, generator=g) * 30).to(dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16])
def test_chunked_soft_targets_equal_the_whole_batch_form_bit_for_bit(monkeypatch, dtype, logit_dtype):
    logits = lm_like(37, 1000, dtype=logit_dtype)  # bfloat16: many tied logits
    want = reference_soft_targets(logits, 16, [1, 2.5, 4], dtype)
    for chunk_bytes in (4 * 1000, 4 * 1000 * 5, 1 << 30):  # one row, 5 rows (37 is not a multiple), all
        monkeypatch.setitem(targets.CHUNK_BYTES, "cpu", chunk_bytes)
        got = soft_targets(logits, 16, [1, 2.5, 4], dtype)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
            assert got[name].dtype == want[name].dtype


def test_chunked_soft_targets_leave_the_logits_untouched(monkeypatch):
    monkeypatch.setitem(targets.CHUNK_BYTES, "cpu", 4 * 100 * 3)
    logits = lm_like(10, 100)
    before = logits.clone()
    soft_targets(logits, 5, [1, 2], "float32")
    assert torch.equal(logits, before)


@pytest.mark.parametrize("k", [1, 16, 500])
def test_fidelity_from_one_scan_equals_the_full_softmax_form(monkeypatch, k):
    monkeypatch.setitem(targets.CHUNK_BYTES, "cpu", 4 * 500 * 7)
    logits = lm_like(40, 500, seed=1)
    cols = soft_targets(logits, k, [1, 4], "float16")
    want = reference_fidelity_sums(logits, cols, [1, 4])
    got = fidelity_sums(logits, cols, [1, 4])
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-4), name  # k = C: KL is rounding


@pytest.mark.parametrize("temperatures", [[1, 4], [2.0]])
def test_batch_statistics_equal_the_straightforward_ones(temperatures):
    logits = lm_like(30, 300, seed=2)
    truth = np.arange(30) % 300 * 7 % 300
    truth[::4] = -1  # unknown rows
    scored = np.ones(30, bool)
    scored[1::3] = False  # views beyond 0
    batch = Batch(np.arange(30), np.zeros(30, np.int32), None, logits, {}, truth, scored)
    cfg = LabelConfig(top_k=8, temperatures=temperatures, logit_dtype="float32")
    tally = Tally()
    cols = batch_columns(batch, cfg, {"name": "topk"}, tally)
    want_cols = reference_soft_targets(logits, 8, temperatures, "float32")
    for name, value in want_cols.items():
        np.testing.assert_array_equal(cols[name], value)
    s = torch.from_numpy(scored)
    want = reference_fidelity_sums(logits[s], {k: v[scored] for k, v in want_cols.items()}, temperatures)
    for name, value in want.items():
        assert tally.sums[name] == pytest.approx(value, rel=1e-4), name
    known = (truth >= 0) & scored
    assert tally.scored == scored.sum() and tally.labeled == known.sum()
    assert tally.correct == int((logits.argmax(1).numpy() == truth)[known].sum())
    nll = F.cross_entropy(logits[torch.from_numpy(known)], torch.from_numpy(truth[known]), reduction="sum")
    assert tally.nll == pytest.approx(float(nll), rel=1e-5)


def test_finite_rows_finds_nan_and_inf_and_an_overflowing_sum():
    logits = torch.zeros(5, 10)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("-inf")
    logits[3, 9] = float("inf")
    logits[4] = 3e38  # finite values whose sum overflows
    assert finite_rows(logits).tolist() == [True, False, False, False, True]
