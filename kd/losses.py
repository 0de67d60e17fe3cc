"""Distillation losses: pure functions of tensors, nothing written to disk.

Each function follows the original authors' reference code, so outside checks can compare
outputs on fixed inputs:
- soft targets (Hinton et al. 2015), in full or from a cached top-k row, with the divergences
  LLM distillers use on that row's partition (GKD's generalised JSD, DistiLLM's skew KLs),
- hints (FitNets, Romero et al. 2015),
- attention transfer (Zagoruyko & Komodakis 2017),
- relational KD, distance and angle (Park et al. 2019),
- hidden-state cosine alignment (DistilBERT, Sanh et al. 2019).

No loss assumes one sample == one prediction: the leading axis is just rows (samples, or
tokens once the cache has a `position` column).
"""

import torch
import torch.nn.functional as F

from kd import divergences, kernels

TAILS = ("bucket", "renorm")
FORWARD_KL = divergences.resolve()


# --------------------------------------------------------------------------------------------
# soft targets


def soft_target_loss(student_logits, teacher_logits, temperature):
    # student_logits, teacher_logits: (B, C)
    # T^2 keeps the gradient scale independent of T (Hinton et al., section 2).
    T = temperature
    log_q = F.log_softmax(student_logits / T, dim=1)
    p = F.softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * T**2


def topk_soft_target_loss_per_row(student_logits, topk_idx, topk_logit, lse, temperature,
                                  tail="bucket", divergence="forward_kl", beta=None, alpha=None):
    # student_logits: (B, C); topk_idx, topk_logit: (B, k); lse: (B,) -> (B,) divergence per row
    # topk_logit = z[topk_idx] - max(z), lse = logsumexp((z - max z) / T) over all C classes,
    # so topk_logit / T - lse are the teacher's exact log-probs at T. The divergence (forward KL
    # by default; `kd.divergences`) is taken on the row's partition: the k kept classes plus
    # the tail bucket (tail="renorm": the k kept classes renormalised). No T^2, no mean: a
    # training loop can mask or weight rows before reducing. The cached targets get no
    # gradient; the student's has a closed form, computed chunk by chunk (see _TopkKL).
    div = _checked(tail, divergence, beta, alpha)
    kernel = _kernel(student_logits, tail, div)
    if kernel is not None:
        return kernel.topk_kl(student_logits, topk_idx, topk_logit, lse, float(temperature), 1.0, False)
    return _TopkKL.apply(student_logits, topk_idx, topk_logit, lse, float(temperature), tail, div)


def _checked(tail, divergence, beta, alpha):
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    return divergences.resolve(divergence, beta, alpha)


def _kernel(student_logits, tail, div=FORWARD_KL):
    """The compiled top-k KL (`kernels.topk_kl`) where it serves: forward KL with the bucket
    tail on small CPU logits (a classifier's batch: one op instead of ~30); else None."""
    rows, classes = student_logits.shape
    if (div != FORWARD_KL or tail != "bucket" or student_logits.device.type != "cpu" or rows == 0
            or rows * classes > KERNEL_ELEMENTS or student_logits.dtype not in (torch.float32, torch.float64)):
        return None
    return kernels.topk_kl()


# Logits up to which the compiled kernel is the faster form: its scalar loop costs about 20 ns
# a logit, the PyTorch form ~8 ns a logit plus ~0.5 ms of dispatch; they meet near 2^15
# (measured: 64 x 100 logits 290 vs 820 us, 256 x 128 660 vs 680 us, 64 x 1000 1,150 vs 590 us).
KERNEL_ELEMENTS = 2**14
# Rows per chunk of the fused loss: about this many elements of (rows, C) temporaries at a time.
CHUNK_ELEMENTS = 2**20
# A student tail mass (relative to its largest probability) below this may have lost terms to
# underflow in exp(z - max z); such rows take a logsumexp over the tail alone.
TAIL_UNDERFLOW = 1e-30


def _row_chunks(rows, classes):
    step = max(1, CHUNK_ELEMENTS // max(classes, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class _TopkKL(torch.autograd.Function):
    """Per-row top-k divergence with its gradient in closed form, fused and chunked over rows.

    With z = student_logits / T, q = softmax(z), the row's partition (the k kept classes and
    the tail bucket: Q = (q_kept, q_tail), P likewise from the cache) and h = dD/dlog Q on
    it (`divergences.value_and_h`), H = sum_c h_c:
    bucket: dD/dz_j = h_j - q_j * H on the top-k, and (q_j / q_tail) * (h_tail - q_tail * H)
            outside it (the tail's share spread like the student's own tail);
    renorm: dD/dz = h - q_hat * H on the top-k, 0 elsewhere.
    Forward KL (h = -P) gives q_j * mass - p_j and q_j * mass - p_tail * q_j / q_tail.
    The forward keeps per-row figures only (the student's logsumexp and tail mass, and (B, k)
    tensors); the backward recomputes q one chunk of rows at a time. So the only (B, C) tensor
    is the gradient itself: no log-softmax, mask or target of the student's size is kept, which
    at a language model's vocabulary is what decides the memory of a step.
    """

    @staticmethod
    def forward(ctx, student_logits, topk_idx, topk_logit, lse, T, tail, div):
        value, saved = _topk_kl(student_logits, topk_idx.long(), topk_logit, lse, T, tail, div)
        ctx.save_for_backward(student_logits, topk_idx.long(), *saved)
        ctx.T, ctx.tail = T, tail
        return value

    @staticmethod
    def backward(ctx, grad_rows):
        student_logits, idx, *saved = ctx.saved_tensors
        grad = _topk_kl_grad(student_logits, idx, saved, grad_rows, ctx.T, ctx.tail)
        return grad, None, None, None, None, None, None


@torch.no_grad()
def _topk_kl(student_logits, idx, topk_logit, lse, T, tail, div=FORWARD_KL):
    """(the divergence per row (B,), the per-row figures `_topk_kl_grad` needs), one chunk of
    rows at a time."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    rows, classes = student_logits.shape
    t_logp = topk_logit.to(dtype) / T - lse.to(dtype).reshape(-1, 1)  # (B, k)
    with_tail = tail == "bucket" and idx.shape[1] < classes
    s_lse = torch.empty(rows, dtype=dtype, device=student_logits.device)
    s_log_tail = torch.full_like(s_lse, float("-inf"))
    for chunk in _row_chunks(rows, classes):
        z = student_logits[chunk].to(dtype) / T  # (r, C), a fresh tensor
        top = z.max(dim=1, keepdim=True).values
        e = z.sub_(top).exp_()
        total = e.sum(dim=1)
        s_lse[chunk] = top.squeeze(1) + total.log()
        if with_tail:  # the student's mass outside the top-k, summed directly (no cancellation)
            outside = e.scatter_(1, idx[chunk], 0.0).sum(dim=1)
            s_log_tail[chunk] = outside.log() - total.log()
            small = outside < TAIL_UNDERFLOW  # its terms lost to underflow: a logsumexp of its own
            if small.any():
                z = student_logits[chunk][small].to(dtype) / T
                z.scatter_(1, idx[chunk][small], float("-inf"))
                s_log_tail[chunk][small] = z.logsumexp(dim=1) - s_lse[chunk][small]
    s_logp = student_logits.gather(1, idx).to(dtype) / T - s_lse[:, None]  # (B, k)
    if tail == "renorm":
        log_p_hat, log_q_hat = F.log_softmax(t_logp, dim=1), F.log_softmax(s_logp, dim=1)
        value, h = divergences.value_and_h(div, log_p_hat, log_q_hat)
        # forward KL: H = -sum p_hat = -1 exactly, so that its gradient is q_hat - p_hat
        H = torch.full_like(s_lse, -1.0) if div == FORWARD_KL else h.sum(dim=1)
        return value, (h, H, log_q_hat.exp())
    if not with_tail:  # k == C: the tail is empty
        value, h = divergences.value_and_h(div, t_logp, s_logp)
        no_tail = torch.zeros_like(s_lse)
        return value, (h, no_tail, h.sum(dim=1) + no_tail, s_logp, s_lse, s_log_tail)
    # float16 rounding can push the teacher's kept mass a hair past 1, hence the clamp
    p = t_logp.exp()
    t_tail = (1 - p.sum(dim=1)).clamp(min=0)  # (B,)
    value, h = divergences.value_and_h(div, torch.cat([t_logp, t_tail.log()[:, None]], 1),
                                       torch.cat([s_logp, s_log_tail[:, None]], 1), torch.cat([p, t_tail[:, None]], 1))
    h_top, h_tail = h[:, :-1], h[:, -1]
    return value, (h_top, h_tail, h_top.sum(dim=1) + h_tail, s_logp, s_lse, s_log_tail)


@torch.no_grad()
def _topk_kl_grad(student_logits, idx, saved, grad_rows, T, tail):
    """d(sum_b grad_rows_b * D_b) / d student_logits, (B, C), one chunk of rows at a time."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    scale = grad_rows.to(dtype)[:, None] / T  # (B, 1)
    if tail == "renorm":
        h, H, q_hat = saved
        top = scale * (h - q_hat * H[:, None])  # (B, k)
        return torch.zeros_like(student_logits).scatter_(1, idx, top.to(student_logits.dtype))
    h_top, h_tail, H, s_logp, s_lse, s_log_tail = saved
    top = scale * (h_top - s_logp.exp() * H[:, None])  # (B, k): the gradient on the top-k
    # outside the top-k: u_j * (h_tail - q_tail * H), u_j = q_j / q_tail = exp(z_j - s_lse -
    # s_log_tail) <= 1 there (0 where the student has no tail)
    shift = torch.where(torch.isfinite(s_log_tail), s_lse + s_log_tail, float("inf"))
    coefficient = scale.squeeze(1) * (h_tail - s_log_tail.exp() * H)  # (B,)
    grad = torch.empty_like(student_logits)
    for chunk in _row_chunks(*student_logits.shape):
        u = (student_logits[chunk].to(dtype) / T).sub_(shift[chunk, None]).exp_()
        grad[chunk] = u.mul_(coefficient[chunk, None]).scatter_(1, idx[chunk], top[chunk])
    return grad


def topk_soft_target_loss_from_hidden(hidden, weight, topk_idx, topk_logit, lse, temperature, bias=None,
                                      divergence="forward_kl", beta=None, alpha=None):
    # hidden: (B, H), the student's last hidden state; weight: (C, H), its output layer (bias (C,))
    # -> (B,) divergence per row with the bucket tail, as topk_soft_target_loss_per_row on
    # hidden @ weight.T + bias, without ever holding those (B, C) logits: each chunk of rows
    # is projected, scored and dropped, and projected again for the backward. For a large
    # vocabulary, where the logits (and their gradient) are what fills the memory.
    div = _checked("bucket", divergence, beta, alpha)
    return _HiddenTopkKL.apply(hidden, weight, bias, topk_idx, topk_logit, lse, float(temperature), div)


class _HiddenTopkKL(torch.autograd.Function):
    """`_TopkKL` on logits that exist one chunk of rows at a time: the forward projects, scores
    and drops each chunk; the backward projects it again for its gradient, then the chunk's
    share of the hidden state's and the output layer's gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, topk_idx, topk_logit, lse, T, div):
        idx = topk_idx.long()
        kl = torch.cat([_topk_kl(F.linear(hidden[chunk], weight, bias), idx[chunk], topk_logit[chunk], lse[chunk],
                                 T, "bucket", div)[0] for chunk in _row_chunks(len(hidden), len(weight))])
        ctx.save_for_backward(hidden, weight, bias, idx, topk_logit, lse)
        ctx.T, ctx.div = T, div
        return kl

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, bias, idx, topk_logit, lse = ctx.saved_tensors
        grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros_like(weight)
        grad_bias = None if bias is None else torch.zeros_like(bias)
        with torch.no_grad():
            for chunk in _row_chunks(len(hidden), len(weight)):
                logits = F.linear(hidden[chunk], weight, bias)
                _, saved = _topk_kl(logits, idx[chunk], topk_logit[chunk], lse[chunk], ctx.T, "bucket", ctx.div)
                grad_logits = _topk_kl_grad(logits, idx[chunk], saved, grad_rows[chunk], ctx.T, "bucket")
                grad_hidden[chunk] = grad_logits @ weight
                grad_weight += grad_logits.T @ hidden[chunk]
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def topk_soft_target_loss(student_logits, topk_idx, topk_logit, lse, temperature,
                          tail="bucket", divergence="forward_kl", beta=None, alpha=None):
    # student_logits: (B, C); topk_idx, topk_logit: (B, k); lse: (B,)
    # T^2 * the mean over rows of topk_soft_target_loss_per_row. With k == C and either tail
    # this is the divergence over the full vocabulary (soft_target_loss for forward KL).
    div = _checked(tail, divergence, beta, alpha)
    kernel = _kernel(student_logits, tail, div)
    if kernel is not None:  # the mean and T^2 inside the kernel: two autograd nodes fewer
        return kernel.topk_kl(student_logits, topk_idx, topk_logit, lse, float(temperature),
                              temperature**2 / len(student_logits), True)
    kl = _TopkKL.apply(student_logits, topk_idx, topk_logit, lse, float(temperature), tail, div)
    return kl.mean() * temperature**2


# --------------------------------------------------------------------------------------------
# features


def hint_loss(student_feature, teacher_feature):
    # student_feature, teacher_feature: same shape, the regressor already applied (FitNets)
    return F.mse_loss(student_feature, teacher_feature)


def attention_map(feature, p=2):
    # feature: (B, C, H, W) -> (B, H*W), or (B, C, L) -> (B, L)
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def _pool_to(feature, size):
    # feature: (B, C, *spatial); average-pool only when the spatial size differs
    if tuple(feature.shape[2:]) == size:
        return feature
    pool = F.adaptive_avg_pool2d if feature.dim() == 4 else F.adaptive_avg_pool1d
    return pool(feature, size)


def attention_transfer_loss(student_feature, teacher_feature, p=2):
    # student_feature: (B, Cs, Hs, Ws); teacher_feature: (B, Ct, Ht, Wt); Cs and Ct may differ.
    # Different spatial sizes: the larger feature is average-pooled to the smaller one.
    size = tuple(min(s, t) for s, t in zip(student_feature.shape[2:], teacher_feature.shape[2:]))
    s = attention_map(_pool_to(student_feature, size), p)
    t = attention_map(_pool_to(teacher_feature, size), p)
    return (s - t).pow(2).mean()


def attention_map_loss(student_map, teacher_map):
    # student_map, teacher_map: (B, H*W); the teacher map read from the cache (maybe float16)
    return (student_map - teacher_map.to(student_map.dtype)).pow(2).mean()


# --------------------------------------------------------------------------------------------
# relations between samples (RKD)


def _squared_distances(emb):
    # emb: (B, D) -> (Gram (B, B), squared distances (B, B)), in float64 from the Gram matrix:
    # O(B^2 D) instead of materialising the (B, B, D) differences.
    x = emb.double()
    gram = x @ x.T
    sq = gram.diagonal()
    return gram, (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0)


def _pdist(emb, eps=1e-12):
    # emb: (B, D) -> (B, B) Euclidean distances, diagonal exactly 0.
    # The clamp keeps sqrt's gradient finite for coincident points.
    _, d2 = _squared_distances(emb)
    d = d2.clamp(min=eps).sqrt()
    eye = torch.eye(len(emb), dtype=torch.bool, device=emb.device)
    return d.masked_fill(eye, 0.0).to(emb.dtype)


def rkd_distance_loss(student_emb, teacher_emb):
    # student_emb: (B, Ds); teacher_emb: (B, Dt). Each distance matrix is divided by the mean
    # of its positive (off-diagonal) entries, which makes the loss scale-free.
    with torch.no_grad():
        t_d = _pdist(teacher_emb)
        t_d = t_d / t_d[t_d > 0].mean()
    s_d = _pdist(student_emb)
    s_d = s_d / s_d[s_d > 0].mean()
    return F.smooth_l1_loss(s_d, t_d, reduction="mean")


def _angles(emb, eps=1e-12):
    # emb: (B, D) -> (B, B, B): angle[a, b, c] = <e_ab, e_ac>, e_ab = unit(x_b - x_a); a zero
    # difference (degenerate triple) gives 0. From the Gram matrix G in float64:
    # <x_b - x_a, x_c - x_a> = G_bc - G_ab - G_ac + G_aa, so no (B, B, D) tensor is built
    # (the teacher's embeddings can be wide).
    gram, d2 = _squared_distances(emb)
    sq = gram.diagonal()
    dots = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + sq[:, None, None]
    valid = d2 > eps * eps
    inverse_norm = torch.where(valid, 1 / torch.where(valid, d2, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2))
    return (dots * inverse_norm[:, :, None] * inverse_norm[:, None, :]).to(emb.dtype)


def rkd_angle_loss(student_emb, teacher_emb):
    # student_emb: (B, Ds); teacher_emb: (B, Dt)
    with torch.no_grad():
        t_angle = _angles(teacher_emb)
    return F.smooth_l1_loss(_angles(student_emb), t_angle, reduction="mean")


# --------------------------------------------------------------------------------------------
# hidden states


def cosine_embedding_loss(student_hidden, teacher_hidden, mask=None):
    # student_hidden, teacher_hidden: (B, L, H) or (B, H); mask: (B, L) or (B,) bool.
    # Mean of 1 - cos over the selected rows; an empty selection gives 0 and keeps the graph.
    loss = 1 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)  # (B, L) or (B,)
    if mask is None:
        return loss.mean()
    mask = mask.to(torch.bool)
    return loss.masked_fill(~mask, 0.0).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# sampled soft targets (RS-KD: Sparse Logit Sampling, Anshumann et al., ACL 2025)


def sampled_soft_target_loss_per_row(student_logits, sample_idx, sample_count, entropy, temperature):
    # student_logits: (B, C); sample_idx, sample_count: (B, m), the distinct classes drawn (with
    # replacement) from the teacher's softmax(z / T) and how often each was drawn (padding: count
    # 0); entropy: (B,) the teacher's exact entropy at T -> (B,) KL estimate per row:
    #     sum_j c_j (-log q_T(x_j)) / sum_j c_j  -  H(p_T)
    # The first term is an unbiased estimate of the cross-entropy CE(p_T, q_T) (the draws come
    # from p_T), so the row is an unbiased estimate of KL(p_T || q_T) and its gradient,
    # (softmax(s / T) - c / N) / T, of the full KL's gradient. A single row may be negative.
    T = float(temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.to(dtype) / T
    nll = torch.logsumexp(z, dim=1, keepdim=True) - z.gather(1, sample_idx.long())  # (B, m)
    weight = sample_count.to(dtype)
    return (weight * nll).sum(dim=1) / weight.sum(dim=1) - entropy.to(dtype)


def sampled_soft_target_loss(student_logits, sample_idx, sample_count, entropy, temperature):
    # student_logits: (B, C); sample_idx, sample_count: (B, m); entropy: (B,)
    # T^2 * the mean over rows of the unbiased KL estimate: in expectation over the draws,
    # soft_target_loss against the teacher's full logits (value and gradient).
    kl = sampled_soft_target_loss_per_row(student_logits, sample_idx, sample_count, entropy, temperature)
    return kl.mean() * temperature**2


# --------------------------------------------------------------------------------------------
# students with another tokenizer than the teacher's (the cache unchanged)


def mapped_soft_target_loss_per_row(student_logits, mapped_idx, topk_logit, lse, temperature, tail="bucket",
                                    divergence="forward_kl", beta=None, alpha=None):
    # student_logits: (B, C) over the student's vocabulary; mapped_idx: (B, k) the teacher's
    # top-k ids mapped to student ids (-1: no student token with the same text); topk_logit,
    # lse: as cached -> (B,) divergence per row. Teacher ids mapped onto one student id add
    # their probabilities; unmapped ones join the tail bucket (renorm: they are dropped). Then
    # the top-k divergence of `topk_soft_target_loss_per_row` (the same code) on the merged
    # entries: with every id mapped to a distinct student id (identical tokenizers) it is that
    # call exactly.
    idx = mapped_idx.long()
    chosen = {"tail": tail, "divergence": divergence, "beta": beta, "alpha": alpha}
    if _one_to_one(idx):
        return topk_soft_target_loss_per_row(student_logits, idx, topk_logit, lse, temperature, **chosen)
    return topk_soft_target_loss_per_row(*_merged(student_logits, idx, topk_logit, lse, temperature),
                                         float(temperature), **chosen)


def mapped_soft_target_loss(student_logits, mapped_idx, topk_logit, lse, temperature, tail="bucket",
                            divergence="forward_kl", beta=None, alpha=None):
    # as mapped_soft_target_loss_per_row, T^2 * the mean over rows (topk_soft_target_loss's scale)
    idx = mapped_idx.long()
    chosen = {"tail": tail, "divergence": divergence, "beta": beta, "alpha": alpha}
    if _one_to_one(idx):  # topk_soft_target_loss itself, bit for bit
        return topk_soft_target_loss(student_logits, idx, topk_logit, lse, temperature, **chosen)
    kl = topk_soft_target_loss_per_row(*_merged(student_logits, idx, topk_logit, lse, temperature),
                                       float(temperature), **chosen)
    return kl.mean() * temperature**2


def _merged(student_logits, idx, topk_logit, lse, temperature):
    # the cached top-k with mapped ids merged, as topk_soft_target_loss_per_row's first four
    # arguments: student logits with a sentinel column, merged ids, their logits, lse
    classes = student_logits.shape[1]
    T = float(temperature)
    log_p = topk_logit.float() / T - lse.float().reshape(-1, 1)  # (B, k) teacher log-probs at T
    p = torch.where(idx >= 0, log_p.exp(), 0.0)
    key = torch.where(idx >= 0, idx, classes)  # unmapped -> the sentinel class C
    key, order = key.sort(dim=1)
    p = p.gather(1, order)
    group = torch.cumsum(torch.cat([torch.zeros_like(key[:, :1]), (key.diff(dim=1) != 0).long()], 1), 1)  # (B, k)
    merged_p = torch.zeros_like(p).scatter_add_(1, group, p)
    merged_idx = torch.full_like(key, classes).scatter_(1, group, key)  # groups past the last: the sentinel
    merged_p = torch.where(merged_idx == classes, 0.0, merged_p)
    # back to the cached form: topk_logit / T - lse = log p (-inf where nothing is kept)
    merged_logit = (merged_p.log() + lse.float().reshape(-1, 1)) * T
    # the sentinel is a class of probability 0 on both sides: a column of -inf the student never has
    padded = torch.cat([student_logits, student_logits.new_full((len(student_logits), 1), float("-inf"))], 1)
    return padded, merged_idx, merged_logit, lse.float()


def _one_to_one(idx):
    # every teacher id of every row mapped, onto distinct student ids (identical tokenizers)
    return bool((idx >= 0).all()) and bool((idx.sort(dim=1).values.diff(dim=1) != 0).all())


def uld_loss_per_row(student_logits, topk_logit, lse, temperature):
    # student_logits: (B, C); topk_logit, lse: the teacher's cached top-k (B, k), (B,) -> (B,)
    # Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the teacher's
    # and the student's probabilities at T, each sorted in descending order, zero-padded to the
    # same length; no vocabulary mapping. The cache holds the teacher's k largest only, so the
    # k largest of each are compared entry by entry and the rest (the tails, whose shapes are
    # unknown for the teacher) by their masses: |tail_t - tail_s|, a lower bound of their L1
    # (triangle inequality). With k >= both vocabularies it is ULD's distance exactly.
    T = float(temperature)
    p = (topk_logit.float() / T - lse.float().reshape(-1, 1)).exp().sort(dim=1, descending=True).values  # (B, k)
    log_q = F.log_softmax(student_logits.float() / T, dim=1)
    k = min(p.shape[1], log_q.shape[1])
    q = log_q.topk(k, dim=1).values.exp()  # (B, k') descending
    if q.shape[1] < p.shape[1]:
        q = F.pad(q, (0, p.shape[1] - q.shape[1]))
    tail_p = (1 - p.sum(dim=1)).clamp(min=0)  # float16 rounding may push the kept mass a hair past 1
    tail_q = (1 - q.sum(dim=1)).clamp(min=0)
    return (p - q).abs().sum(dim=1) + (tail_p - tail_q).abs()


def uld_loss(student_logits, topk_logit, lse, temperature):
    # as uld_loss_per_row, the mean over rows
    return uld_loss_per_row(student_logits, topk_logit, lse, temperature).mean()
