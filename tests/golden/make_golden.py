"""Regenerate tests/golden/losses.json: golden values for every loss in kd/losses.py.

Run explicitly, never from the test suite:

    python tests/golden/make_golden.py

Each case names a loss, a seed and the input shapes; `build_inputs` turns that into tensors
with a seeded torch.Generator (tests/test_losses.py imports it to rebuild the same inputs).
The expected values come from the straightforward float64 NumPy loops below, written from the
papers' definitions, NOT from kd.losses, so the fixture checks the library against an
independent implementation. Writes only tests/golden/losses.json.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).parent / "losses.json"

# --------------------------------------------------------------------------------------------
# cases: key -> loss, seed, inputs [name, shape, kind], keyword arguments


def _case(fn, seed, inputs, scale=1.0, cache_row=None, sampled_row=None, **kwargs):
    case = {"fn": fn, "seed": seed, "scale": scale, "inputs": inputs, "kwargs": kwargs}
    if cache_row is not None:
        case["cache_row"] = cache_row  # derive topk_idx/topk_logit/lse from teacher_logits
    if sampled_row is not None:
        case["sampled_row"] = sampled_row  # derive sample_idx/sample_count/entropy from teacher_logits
    return case


def _logits(B, C):
    return [["student_logits", [B, C], "normal"], ["teacher_logits", [B, C], "normal"]]


def _pair(name, s_shape, t_shape, t_kind="normal", s_kind="normal"):
    return [[f"student_{name}", s_shape, s_kind], [f"teacher_{name}", t_shape, t_kind]]


CASES = {
    "soft_T1": _case("soft_target_loss", 1, _logits(6, 10), scale=2.0, temperature=1.0),
    "soft_T4": _case("soft_target_loss", 2, _logits(6, 10), scale=3.0, temperature=4.0),
    "topk_bucket_T4_k3_fp16": _case(
        "topk_soft_target_loss", 3, _logits(6, 10), scale=3.0,
        cache_row={"k": 3, "dtype": "float16"}, temperature=4.0, tail="bucket"),
    "topk_bucket_T1_k5_fp32": _case(
        "topk_soft_target_loss", 4, _logits(6, 10), scale=2.0,
        cache_row={"k": 5, "dtype": "float32"}, temperature=1.0, tail="bucket"),
    "topk_bucket_T2_kC_fp32": _case(
        "topk_soft_target_loss", 5, _logits(5, 8), scale=2.0,
        cache_row={"k": 8, "dtype": "float32"}, temperature=2.0, tail="bucket"),
    "topk_bucket_T1_k2_fp16_scale30": _case(
        "topk_soft_target_loss", 6, _logits(4, 12), scale=30.0,
        cache_row={"k": 2, "dtype": "float16"}, temperature=1.0, tail="bucket"),
    "topk_renorm_T4_k3_fp16": _case(
        "topk_soft_target_loss", 7, _logits(6, 10), scale=3.0,
        cache_row={"k": 3, "dtype": "float16"}, temperature=4.0, tail="renorm"),
    "topk_renorm_T2_k5_fp32": _case(
        "topk_soft_target_loss", 8, _logits(6, 10), scale=2.0,
        cache_row={"k": 5, "dtype": "float32"}, temperature=2.0, tail="renorm"),
    "topk_renorm_T2_kC_fp32": _case(
        "topk_soft_target_loss", 9, _logits(5, 8), scale=2.0,
        cache_row={"k": 8, "dtype": "float32"}, temperature=2.0, tail="renorm"),
    "topk_per_row_bucket_T4_k3_fp16": _case(
        "topk_soft_target_loss_per_row", 10, _logits(5, 10), scale=3.0,
        cache_row={"k": 3, "dtype": "float16"}, temperature=4.0, tail="bucket"),
    "topk_per_row_renorm_T1_k4_fp32": _case(
        "topk_soft_target_loss_per_row", 11, _logits(5, 10), scale=2.0,
        cache_row={"k": 4, "dtype": "float32"}, temperature=1.0, tail="renorm"),
    "topk_hidden_bucket_T2_k3_fp16": _case(
        "topk_soft_target_loss_from_hidden", 31,
        [["hidden", [5, 6], "normal"], ["weight", [10, 6], "normal"], ["bias", [10], "normal"],
         ["teacher_logits", [5, 10], "normal"]], scale=2.0, cache_row={"k": 3, "dtype": "float16"},
        temperature=2.0),
    "topk_hidden_bucket_T1_k4_fp32_no_bias": _case(
        "topk_soft_target_loss_from_hidden", 32,
        [["hidden", [6, 4], "normal"], ["weight", [9, 4], "normal"], ["teacher_logits", [6, 9], "normal"]],
        scale=1.5, cache_row={"k": 4, "dtype": "float32"}, temperature=1.0),
    # the divergences of kd.divergences on the same partition (Divergences: GKD, DistiLLM)
    "topk_reverse_kl_T2_k3_fp16": _case(
        "topk_soft_target_loss", 41, _logits(6, 10), scale=2.0,
        cache_row={"k": 3, "dtype": "float16"}, temperature=2.0, tail="bucket", divergence="reverse_kl"),
    "topk_jsd_beta03_T1_k4_fp32": _case(
        "topk_soft_target_loss", 42, _logits(6, 10), scale=2.0,
        cache_row={"k": 4, "dtype": "float32"}, temperature=1.0, tail="bucket", divergence="jsd", beta=0.3),
    "topk_skew_kl_T4_k3_fp16": _case(
        "topk_soft_target_loss", 43, _logits(5, 12), scale=3.0,
        cache_row={"k": 3, "dtype": "float16"}, temperature=4.0, tail="bucket", divergence="skew_kl"),
    "topk_skew_reverse_kl_alpha02_T2_k5_renorm_fp32": _case(
        "topk_soft_target_loss", 44, _logits(6, 10), scale=2.0,
        cache_row={"k": 5, "dtype": "float32"}, temperature=2.0, tail="renorm", divergence="skew_reverse_kl",
        alpha=0.2),
    "topk_tvd_T2_kC_fp32": _case(
        "topk_soft_target_loss", 45, _logits(5, 8), scale=2.0,
        cache_row={"k": 8, "dtype": "float32"}, temperature=2.0, tail="bucket", divergence="tvd"),
    "topk_per_row_jsd_renorm_T2_k3_fp32": _case(
        "topk_soft_target_loss_per_row", 46, _logits(5, 10), scale=3.0,
        cache_row={"k": 3, "dtype": "float32"}, temperature=2.0, tail="renorm", divergence="jsd"),
    "topk_per_row_skew_reverse_kl_T1_k2_fp16": _case(
        "topk_soft_target_loss_per_row", 47, _logits(5, 10), scale=2.0,
        cache_row={"k": 2, "dtype": "float16"}, temperature=1.0, tail="bucket", divergence="skew_reverse_kl"),
    "topk_hidden_reverse_kl_T2_k3_fp16": _case(
        "topk_soft_target_loss_from_hidden", 48,
        [["hidden", [5, 6], "normal"], ["weight", [10, 6], "normal"], ["bias", [10], "normal"],
         ["teacher_logits", [5, 10], "normal"]], scale=2.0, cache_row={"k": 3, "dtype": "float16"},
        temperature=2.0, divergence="reverse_kl"),
    "topk_hidden_tvd_T1_k4_fp32_no_bias": _case(
        "topk_soft_target_loss_from_hidden", 49,
        [["hidden", [6, 4], "normal"], ["weight", [9, 4], "normal"], ["teacher_logits", [6, 9], "normal"]],
        scale=1.5, cache_row={"k": 4, "dtype": "float32"}, temperature=1.0, divergence="tvd"),
    "hint_4d": _case("hint_loss", 12, _pair("feature", [4, 3, 5, 5], [4, 3, 5, 5])),
    "hint_2d": _case("hint_loss", 13, _pair("feature", [8, 16], [8, 16])),
    "attention_map_p2": _case("attention_map", 14, [["feature", [3, 4, 5, 6], "normal"]], p=2),
    "attention_map_p1": _case("attention_map", 15, [["feature", [3, 4, 5, 6], "normal"]], p=1),
    "attention_map_1d_p2": _case("attention_map", 16, [["feature", [3, 4, 7], "normal"]], p=2),
    "at_p2_same_size": _case(
        "attention_transfer_loss", 17, _pair("feature", [4, 3, 4, 4], [4, 6, 4, 4]), p=2),
    "at_p1_same_size": _case(
        "attention_transfer_loss", 18, _pair("feature", [4, 3, 4, 5], [4, 6, 4, 5]), p=1),
    "at_p2_student_larger": _case(
        "attention_transfer_loss", 19, _pair("feature", [4, 3, 8, 8], [4, 6, 4, 4]), p=2),
    "at_p1_student_larger": _case(
        "attention_transfer_loss", 20, _pair("feature", [4, 3, 6, 6], [4, 5, 3, 3]), p=1),
    "at_p2_teacher_larger_uneven": _case(
        "attention_transfer_loss", 21, _pair("feature", [4, 3, 3, 3], [4, 5, 7, 7]), p=2),
    "at_p2_1d_student_larger": _case(
        "attention_transfer_loss", 22, _pair("feature", [4, 3, 10], [4, 5, 5]), p=2),
    "attention_map_loss_fp16_teacher": _case(
        "attention_map_loss", 23, _pair("map", [4, 16], [4, 16], t_kind="normal_f16")),
    "rkd_distance": _case("rkd_distance_loss", 24, _pair("emb", [6, 5], [6, 8]), scale=2.0),
    "rkd_angle": _case("rkd_angle_loss", 25, _pair("emb", [6, 5], [6, 8])),
    "rkd_angle_degenerate": _case(
        "rkd_angle_loss", 26, _pair("emb", [6, 5], [6, 8], s_kind="normal_dup01")),
    "cosine_3d_mask": _case(
        "cosine_embedding_loss", 27,
        _pair("hidden", [3, 5, 8], [3, 5, 8]) + [["mask", [3, 5], "mask"]]),
    "cosine_3d_no_mask": _case("cosine_embedding_loss", 28, _pair("hidden", [3, 5, 8], [3, 5, 8])),
    "cosine_2d_mask": _case(
        "cosine_embedding_loss", 29, _pair("hidden", [6, 8], [6, 8]) + [["mask", [6], "mask"]]),
    "cosine_empty_mask": _case(
        "cosine_embedding_loss", 30,
        _pair("hidden", [3, 5, 8], [3, 5, 8]) + [["mask", [3, 5], "mask_empty"]]),
    "sampled_T1_n8": _case("sampled_soft_target_loss", 31, _logits(6, 10), scale=2.0,
                           sampled_row={"draws": 8}, temperature=1.0),
    "sampled_T4_n3_scale30": _case("sampled_soft_target_loss", 32, _logits(5, 12), scale=30.0,
                                   sampled_row={"draws": 3}, temperature=4.0),
    "sampled_per_row_T2_n16": _case("sampled_soft_target_loss_per_row", 33, _logits(6, 10), scale=3.0,
                                    sampled_row={"draws": 16}, temperature=2.0),
    # a student of another tokenizer: the teacher's top-k ids mapped (`mapping`: teacher id j ->
    # student id j // 2, or -1 when j % 3 == 2: pairs merged, a third unmapped)
    "mapped_bucket_T2_k6_fp16": _case(
        "mapped_soft_target_loss", 33, [["student_logits", [5, 7], "normal"], ["teacher_logits", [5, 14], "normal"]],
        scale=2.0, cache_row={"k": 6, "dtype": "float16", "mapping": "half"}, temperature=2.0, tail="bucket"),
    "mapped_renorm_T1_k5_fp32": _case(
        "mapped_soft_target_loss", 34, [["student_logits", [4, 7], "normal"], ["teacher_logits", [4, 14], "normal"]],
        scale=2.0, cache_row={"k": 5, "dtype": "float32", "mapping": "half"}, temperature=1.0, tail="renorm"),
    "mapped_skew_kl_T2_k6_fp16": _case(
        "mapped_soft_target_loss", 50, [["student_logits", [5, 7], "normal"], ["teacher_logits", [5, 14], "normal"]],
        scale=2.0, cache_row={"k": 6, "dtype": "float16", "mapping": "half"}, temperature=2.0, tail="bucket",
        divergence="skew_kl", alpha=0.3),
    "mapped_per_row_jsd_T1_k5_fp32": _case(
        "mapped_soft_target_loss_per_row", 51,
        [["student_logits", [4, 7], "normal"], ["teacher_logits", [4, 14], "normal"]],
        scale=2.0, cache_row={"k": 5, "dtype": "float32", "mapping": "half"}, temperature=1.0, tail="bucket",
        divergence="jsd", beta=0.7),
    "mapped_per_row_bucket_T1_k4_fp32": _case(
        "mapped_soft_target_loss_per_row", 35,
        [["student_logits", [4, 7], "normal"], ["teacher_logits", [4, 14], "normal"]],
        scale=3.0, cache_row={"k": 4, "dtype": "float32", "mapping": "half"}, temperature=1.0, tail="bucket"),
    "uld_T1_k4_fp16": _case(
        "uld_loss", 36, [["student_logits", [5, 9], "normal"], ["teacher_logits", [5, 12], "normal"]],
        scale=2.0, cache_row={"k": 4, "dtype": "float16", "ids": False}, temperature=1.0),
    "uld_T2_kC_student_smaller_fp32": _case(
        "uld_loss", 37, [["student_logits", [4, 5], "normal"], ["teacher_logits", [4, 8], "normal"]],
        scale=2.0, cache_row={"k": 8, "dtype": "float32", "ids": False}, temperature=2.0),
    "uld_per_row_T1_k3_fp32": _case(
        "uld_loss_per_row", 38, [["student_logits", [4, 9], "normal"], ["teacher_logits", [4, 9], "normal"]],
        scale=2.0, cache_row={"k": 3, "dtype": "float32", "ids": False}, temperature=1.0),
}


def build_inputs(case):
    """Rebuild one case's keyword arguments (tensors) from its seed and shapes."""
    g = torch.Generator().manual_seed(case["seed"])
    out = {}
    for name, shape, kind in case["inputs"]:
        if kind.startswith("mask"):
            x = torch.rand(shape, generator=g) < 0.5
            if kind == "mask_empty":
                x = torch.zeros_like(x)
        else:
            x = torch.randn(shape, generator=g) * case["scale"]
            if kind == "normal_f16":
                x = x.half()
            if kind == "normal_dup01":  # rows 0 and 1 coincide: degenerate triples
                x[1] = x[0]
        out[name] = x
    if "cache_row" in case:  # what the label stage stores for one cache row
        z = out.pop("teacher_logits")  # (B, C) float32
        T = case["kwargs"]["temperature"]
        z_max = z.max(dim=1, keepdim=True).values
        vals, idx = z.topk(case["cache_row"]["k"], dim=1)  # sorted by descending logit
        out["topk_idx"] = idx.int()
        out["topk_logit"] = (vals - z_max).to(getattr(torch, case["cache_row"]["dtype"]))
        out["lse"] = ((z - z_max) / T).logsumexp(dim=1)
        if case["cache_row"].get("mapping") == "half":
            ids = out.pop("topk_idx").long()
            out["mapped_idx"] = torch.where(ids % 3 == 2, -1, ids // 2)
        if case["cache_row"].get("ids") is False:
            out.pop("topk_idx")
    if "sampled_row" in case:  # what the label stage stores with label.sampling: N
        out.update(sampled_row(out.pop("teacher_logits"), case["sampled_row"]["draws"],
                               case["kwargs"]["temperature"], g))
    return out


def sampled_row(z, draws, T, g):
    """(B, C) teacher logits -> sample_idx, sample_count (B, draws): the distinct classes of
    `draws` draws from softmax(z / T) in ascending order, padded with count 0; entropy (B,)."""
    log_p = torch.log_softmax(z / T, dim=1)
    drawn = torch.multinomial(log_p.exp(), draws, replacement=True, generator=g)
    idx = torch.zeros(len(z), draws, dtype=torch.int32)
    count = torch.zeros(len(z), draws, dtype=torch.int32)
    for b, row in enumerate(drawn):
        classes, counts = row.unique(return_counts=True)
        idx[b, :len(classes)], count[b, :len(classes)] = classes.int(), counts.int()
    return {"sample_idx": idx, "sample_count": count, "entropy": -(log_p.exp() * log_p).sum(1)}


# --------------------------------------------------------------------------------------------
# reference implementations: float64 NumPy, loops, straight from the definitions


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _kl(p, q):
    # sum p log(p/q) with 0 log 0 = 0
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_soft_target_loss(student_logits, teacher_logits, temperature):
    T = temperature
    rows = [_kl(_softmax(t / T), _softmax(s / T)) for s, t in zip(student_logits, teacher_logits)]
    return T**2 * np.mean(rows)


def _log_ratio(a, b, floor=0.0):
    return math.log(a / max(b, floor))


def _divergence(p, q, divergence="forward_kl", beta=None, alpha=None):
    # p: the teacher's probabilities, q: the student's, over the same classes (lists)
    if divergence == "jsd" and beta in (0.0, 1.0):  # GKD's (and TRL's) end points
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return _kl(p, q)
    if divergence == "reverse_kl":  # a teacher probability of 0 counts as 1e-30
        return sum(qi * _log_ratio(qi, pi, 1e-30) for pi, qi in zip(p, q) if qi > 0)
    if divergence == "jsd":
        b = 0.5 if beta is None else beta
        m = [b * pi + (1 - b) * qi for pi, qi in zip(p, q)]
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    a = 0.1 if alpha is None else alpha
    if divergence == "skew_kl":
        return _kl(p, [a * pi + (1 - a) * qi for pi, qi in zip(p, q)])
    if divergence == "skew_reverse_kl":
        return _kl(q, [a * qi + (1 - a) * pi for pi, qi in zip(p, q)])
    assert divergence == "tvd", divergence
    return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))


def ref_topk_soft_target_loss_per_row(student_logits, topk_idx, topk_logit, lse, temperature,
                                      tail="bucket", **divergence):
    T = temperature
    rows = []
    for s, idx, tl, row_lse in zip(student_logits, topk_idx, topk_logit, lse):
        idx = [int(i) for i in idx]
        q_all = _softmax(s / T)
        p = [math.exp(v / T - row_lse) for v in tl]  # exact teacher probs at the top-k classes
        q = [q_all[i] for i in idx]
        rest = [c for c in range(len(s)) if c not in idx]
        if tail == "renorm":
            p = [v / sum(p) for v in p]
            q = [v / sum(q) for v in q]
        elif rest:  # bucket: the tail is one more class on both sides
            p.append(max(0.0, 1.0 - sum(p)))
            q.append(sum(q_all[c] for c in rest))
        rows.append(_divergence(p, q, **divergence))
    return np.array(rows)


def ref_topk_soft_target_loss_from_hidden(hidden, weight, topk_idx, topk_logit, lse, temperature, bias=None,
                                          **divergence):
    logits = hidden @ weight.T + (0.0 if bias is None else bias)
    return ref_topk_soft_target_loss_per_row(logits, topk_idx, topk_logit, lse, temperature, "bucket", **divergence)


def ref_topk_soft_target_loss(student_logits, topk_idx, topk_logit, lse, temperature, tail, **divergence):
    rows = ref_topk_soft_target_loss_per_row(student_logits, topk_idx, topk_logit, lse,
                                             temperature, tail, **divergence)
    return temperature**2 * rows.mean()


def ref_sampled_soft_target_loss_per_row(student_logits, sample_idx, sample_count, entropy, temperature):
    # the cross-entropy against the empirical distribution of the draws, minus the teacher's entropy
    T = temperature
    rows = []
    for s, idx, count, h in zip(student_logits, sample_idx, sample_count, entropy):
        q = _softmax(s / T)
        n = sum(count)
        rows.append(sum(c * -math.log(q[int(i)]) for i, c in zip(idx, count) if c > 0) / n - h)
    return np.array(rows)


def ref_sampled_soft_target_loss(student_logits, sample_idx, sample_count, entropy, temperature):
    rows = ref_sampled_soft_target_loss_per_row(student_logits, sample_idx, sample_count, entropy, temperature)
    return temperature**2 * rows.mean()


def ref_mapped_soft_target_loss_per_row(student_logits, mapped_idx, topk_logit, lse, temperature, tail, **divergence):
    # the teacher's cached probabilities summed per student id; ids of -1 left out (the tail)
    T = temperature
    rows = []
    for s, ids, logit, norm in zip(student_logits, mapped_idx, topk_logit, lse):
        merged = {}
        for i, value in zip(ids, logit):
            if i >= 0:
                merged[int(i)] = merged.get(int(i), 0.0) + math.exp(value / T - norm)
        q = _softmax(s / T)
        p_kept = list(merged.values())
        q_kept = [q[i] for i in merged]
        if tail == "renorm":
            rows.append(_divergence([v / sum(p_kept) for v in p_kept], [v / sum(q_kept) for v in q_kept],
                                    **divergence))
        else:
            rows.append(_divergence(p_kept + [max(0.0, 1 - sum(p_kept))], q_kept + [1 - sum(q_kept)],
                                    **divergence))
    return np.array(rows)


def ref_mapped_soft_target_loss(student_logits, mapped_idx, topk_logit, lse, temperature, tail, **divergence):
    rows = ref_mapped_soft_target_loss_per_row(student_logits, mapped_idx, topk_logit, lse, temperature, tail,
                                               **divergence)
    return temperature**2 * rows.mean()


def ref_uld_loss_per_row(student_logits, topk_logit, lse, temperature):
    # Boizard et al.: sorted probabilities, L1; the k cached entries one by one, the rest by mass
    T = temperature
    rows = []
    for s, logit, norm in zip(student_logits, topk_logit, lse):
        p = sorted((math.exp(v / T - norm) for v in logit), reverse=True)
        q = sorted(_softmax(s / T), reverse=True)[:len(p)]
        q = list(q) + [0.0] * (len(p) - len(q))
        rows.append(sum(abs(a - b) for a, b in zip(p, q)) + abs(max(0.0, 1 - sum(p)) - max(0.0, 1 - sum(q))))
    return np.array(rows)


def ref_uld_loss(student_logits, topk_logit, lse, temperature):
    return ref_uld_loss_per_row(student_logits, topk_logit, lse, temperature).mean()


def ref_hint_loss(student_feature, teacher_feature):
    return np.mean((student_feature - teacher_feature) ** 2)


def ref_attention_map(feature, p):
    B, C = feature.shape[:2]
    spatial = feature.shape[2:]
    maps = []
    for b in range(B):
        a = np.zeros(spatial)
        for c in range(C):
            a += np.abs(feature[b, c]) ** p / C  # mean over channels of |A|^p
        a = a.reshape(-1)  # row-major
        maps.append(a / max(math.sqrt((a**2).sum()), 1e-12))
    return np.stack(maps)


def _adaptive_avg_pool(feature, size):
    # bins [floor(i*n/m), ceil((i+1)*n/m)) along each spatial axis, as in adaptive pooling
    def bins(n, m):
        return [(i * n // m, -(-(i + 1) * n // m)) for i in range(m)]

    if feature.ndim == 3:
        return np.stack([feature[:, :, a:b].mean(axis=2) for a, b in bins(feature.shape[2], size[0])],
                        axis=2)
    out = np.zeros(feature.shape[:2] + tuple(size))
    for i, (h0, h1) in enumerate(bins(feature.shape[2], size[0])):
        for j, (w0, w1) in enumerate(bins(feature.shape[3], size[1])):
            out[:, :, i, j] = feature[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def ref_attention_transfer_loss(student_feature, teacher_feature, p):
    size = tuple(min(a, b) for a, b in zip(student_feature.shape[2:], teacher_feature.shape[2:]))
    s = student_feature if student_feature.shape[2:] == size else _adaptive_avg_pool(student_feature, size)
    t = teacher_feature if teacher_feature.shape[2:] == size else _adaptive_avg_pool(teacher_feature, size)
    return np.mean((ref_attention_map(s, p) - ref_attention_map(t, p)) ** 2)


def ref_attention_map_loss(student_map, teacher_map):
    return np.mean((student_map - teacher_map) ** 2)


def _smooth_l1(x):  # beta = 1
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def _distances(e):
    B = len(e)
    d = np.array([[math.sqrt(((e[a] - e[b]) ** 2).sum()) for b in range(B)] for a in range(B)])
    return d / (d.sum() / (B * (B - 1)))  # mean of the off-diagonal entries (diagonal is 0)


def ref_rkd_distance_loss(student_emb, teacher_emb):
    s, t = _distances(student_emb), _distances(teacher_emb)
    return np.mean([_smooth_l1(x) for x in (s - t).reshape(-1)])


def _unit(v):
    n = math.sqrt((v**2).sum())
    return v / n if n > 0 else np.zeros_like(v)  # degenerate: the angle term is 0


def _angles(e):
    B = len(e)
    return np.array([[[_unit(e[b] - e[a]) @ _unit(e[c] - e[a]) for c in range(B)]
                      for b in range(B)] for a in range(B)])


def ref_rkd_angle_loss(student_emb, teacher_emb):
    diff = _angles(student_emb) - _angles(teacher_emb)
    return np.mean([_smooth_l1(x) for x in diff.reshape(-1)])


def ref_cosine_embedding_loss(student_hidden, teacher_hidden, mask=None):
    H = student_hidden.shape[-1]
    s, t = student_hidden.reshape(-1, H), teacher_hidden.reshape(-1, H)
    keep = np.ones(len(s), dtype=bool) if mask is None else mask.reshape(-1)
    terms = [1 - a @ b / (math.sqrt(a @ a) * math.sqrt(b @ b)) for a, b, k in zip(s, t, keep) if k]
    return float(np.mean(terms)) if terms else 0.0


REFERENCES = {
    "soft_target_loss": ref_soft_target_loss,
    "topk_soft_target_loss": ref_topk_soft_target_loss,
    "topk_soft_target_loss_per_row": ref_topk_soft_target_loss_per_row,
    "topk_soft_target_loss_from_hidden": ref_topk_soft_target_loss_from_hidden,
    "hint_loss": ref_hint_loss,
    "attention_map": ref_attention_map,
    "attention_transfer_loss": ref_attention_transfer_loss,
    "attention_map_loss": ref_attention_map_loss,
    "rkd_distance_loss": ref_rkd_distance_loss,
    "rkd_angle_loss": ref_rkd_angle_loss,
    "cosine_embedding_loss": ref_cosine_embedding_loss,
    "sampled_soft_target_loss": ref_sampled_soft_target_loss,
    "sampled_soft_target_loss_per_row": ref_sampled_soft_target_loss_per_row,
    "mapped_soft_target_loss": ref_mapped_soft_target_loss,
    "mapped_soft_target_loss_per_row": ref_mapped_soft_target_loss_per_row,
    "uld_loss": ref_uld_loss,
    "uld_loss_per_row": ref_uld_loss_per_row,
}


def _to_numpy(x):
    return x.numpy() if x.dtype == torch.bool else x.double().numpy()


def main():
    cases = {}
    for key, case in CASES.items():
        inputs = {name: _to_numpy(x) for name, x in build_inputs(case).items()}
        value = np.asarray(REFERENCES[case["fn"]](**inputs, **case["kwargs"]), dtype=np.float64)
        cases[key] = {**case, "expected": value.tolist()}
    about = ("Golden values for kd/losses.py; regenerate with "
             "`python tests/golden/make_golden.py`. Inputs: build_inputs() in that script.")
    # one line per case keeps diffs readable
    lines = [f"  {json.dumps(key)}: {json.dumps(case)}" for key, case in cases.items()]
    FIXTURE.write_text(
        f'{{\n "about": {json.dumps(about)},\n "torch_version": {json.dumps(torch.__version__)},\n'
        f' "cases": {{\n' + ",\n".join(lines) + "\n }\n}\n"
    )
    print(f"wrote {len(cases)} cases to {FIXTURE}")


if __name__ == "__main__":
    main()
