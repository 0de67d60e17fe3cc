"""Distillation losses: pure functions of tensors, nothing written to disk.

Each function follows the original authors' reference code, so outside checks can compare
outputs on fixed inputs:
- soft targets (Hinton et al. 2015), in full or from a cached top-k row,
- hints (FitNets, Romero et al. 2015),
- attention transfer (Zagoruyko & Komodakis 2017),
- relational KD, distance and angle (Park et al. 2019),
- hidden-state cosine alignment (DistilBERT, Sanh et al. 2019).

No loss assumes one sample == one prediction: the leading axis is just rows (samples, or
tokens once the cache has a `position` column).
"""

import torch
import torch.nn.functional as F

TAILS = ("bucket", "renorm")


# --------------------------------------------------------------------------------------------
# soft targets


def soft_target_loss(student_logits, teacher_logits, temperature):
    # student_logits, teacher_logits: (B, C)
    # T^2 keeps the gradient scale independent of T (Hinton et al., section 2).
    T = temperature
    log_q = F.log_softmax(student_logits / T, dim=1)
    p = F.softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * T**2


def _kl_rows(log_p, log_q):
    # log_p, log_q: (B, K) -> (B,) sum_k p (log p - log q), with 0 log 0 = 0
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=1)


def topk_soft_target_loss_per_row(student_logits, topk_idx, topk_logit, lse, temperature,
                                  tail="bucket"):
    # student_logits: (B, C); topk_idx, topk_logit: (B, k); lse: (B,) -> (B,) KL per row
    # topk_logit = z[topk_idx] - max(z), lse = logsumexp((z - max z) / T) over all C classes,
    # so topk_logit / T - lse are the teacher's exact log-probs at T. No T^2, no mean: a
    # training loop can mask or weight rows before reducing. The cached targets get no
    # gradient; the student's has a closed form (see _TopkKL), one fused backward step.
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    return _TopkKL.apply(student_logits, topk_idx, topk_logit, lse, float(temperature), tail)


def _topk_kl_parts(student_logits, topk_idx, topk_logit, lse, T, tail):
    """The forward computation: per-row KL and what the closed-form backward needs."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    idx = topk_idx.long()
    t_logp = topk_logit.to(dtype) / T - lse.to(dtype).reshape(-1, 1)  # (B, k)
    s_logp_all = F.log_softmax(student_logits.to(dtype) / T, dim=1)  # (B, C)
    s_logp = s_logp_all.gather(1, idx)  # (B, k)
    parts = {"idx": idx, "s_logp_all": s_logp_all}
    if tail == "renorm":
        p_hat, log_q_hat = F.log_softmax(t_logp, dim=1), F.log_softmax(s_logp, dim=1)
        parts.update(p_hat=p_hat.exp(), q_hat=log_q_hat.exp())
        return _kl_rows(p_hat, log_q_hat), parts
    parts["p"] = t_logp.exp()
    if idx.shape[1] == student_logits.shape[1]:
        return _kl_rows(t_logp, s_logp), parts  # k == C: the tail is empty

    # bucket: everything outside the top-k is one extra class on both sides.
    # float16 rounding can push the teacher's kept mass a hair past 1, hence the clamp.
    t_tail = (1 - parts["p"].sum(dim=1)).clamp(min=0)  # (B,)
    in_topk = torch.zeros_like(s_logp_all, dtype=torch.bool).scatter_(1, idx, True)
    s_log_tail = s_logp_all.masked_fill(in_topk, float("-inf")).logsumexp(dim=1)  # (B,)
    log_p = torch.cat([t_logp, t_tail.log().unsqueeze(1)], dim=1)  # (B, k+1)
    log_q = torch.cat([s_logp, s_log_tail.unsqueeze(1)], dim=1)  # (B, k+1)
    parts.update(t_tail=t_tail, s_log_tail=s_log_tail, in_topk=in_topk)
    return _kl_rows(log_p, log_q), parts


class _TopkKL(torch.autograd.Function):
    """Per-row top-k KL with its gradient in closed form (z = student_logits / T, q = softmax(z)):

    bucket: dKL/dz = q * (sum_k p_k + p_tail) - target, where target_j = p_j on the top-k and
            p_tail * q_j / q_tail outside it (the tail mass spread like the student's own tail);
    renorm: dKL/dz = q_hat - p_hat on the top-k, 0 elsewhere.
    One backward step instead of autograd's walk through every forward op (per-op dispatch
    dominates the cost of a small student's step).
    """

    @staticmethod
    def forward(ctx, student_logits, topk_idx, topk_logit, lse, T, tail):
        with torch.no_grad():
            kl, parts = _topk_kl_parts(student_logits, topk_idx, topk_logit, lse, T, tail)
        ctx.T, ctx.tail, ctx.dtype = T, tail, student_logits.dtype
        ctx.parts = parts
        return kl

    @staticmethod
    def backward(ctx, grad_rows):
        parts, T = ctx.parts, ctx.T
        idx = parts["idx"]
        if ctx.tail == "renorm":
            grad_z = torch.zeros_like(parts["s_logp_all"]).scatter_(1, idx, parts["q_hat"] - parts["p_hat"])
        else:
            q = parts["s_logp_all"].exp()
            p = parts["p"]
            if "t_tail" in parts:
                mass = p.sum(dim=1) + parts["t_tail"]
                target = (parts["s_logp_all"] - parts["s_log_tail"][:, None]).exp() * parts["t_tail"][:, None]
                target = target.masked_fill(parts["in_topk"], 0.0).scatter_(1, idx, p)
            else:
                mass, target = p.sum(dim=1), torch.zeros_like(q).scatter_(1, idx, p)
            grad_z = q * mass[:, None] - target
        grad = (grad_rows.to(grad_z.dtype)[:, None] * grad_z / T).to(ctx.dtype)
        return grad, None, None, None, None, None


def topk_soft_target_loss(student_logits, topk_idx, topk_logit, lse, temperature,
                          tail="bucket"):
    # student_logits: (B, C); topk_idx, topk_logit: (B, k); lse: (B,)
    # With k == C and either tail this equals soft_target_loss.
    kl = topk_soft_target_loss_per_row(student_logits, topk_idx, topk_logit, lse,
                                       temperature, tail)
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
