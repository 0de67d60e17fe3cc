"""The soft targets of a batch of teacher logits, and what they keep of the teacher.

`soft_targets` turns logits (R, C) into the cache's columns (top-k of the max-shifted logits,
logit_max, lse per temperature), `batch_columns` adds the encoding's stored form and the
draws of `label.sampling` (`sampling`), and sums the fidelity statistics of what a student
will read into a part's `Tally`; `finish` turns the parts' sums into the manifest's
`fidelity`. `part_schema` and `part_table` are a part's Parquet columns (`layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kd.cache import encoding as encodings
from kd.cache import sampling
from kd.cache.batch import Batch
from kd.cache.layout import lse_column, sample_columns, temperature_key
from kd.config import LabelConfig

FLOAT16_MIN = float(np.finfo(np.float16).min)


def soft_targets(logits: torch.Tensor, top_k: int, temperatures: list[float], dtype: str) -> dict[str, np.ndarray]:
    """The cache columns for a batch of logits (N, C): top-k of the max-shifted logits and lse per T
    (as the `topk` encoding stores them; `encoding.encode` turns them into another's)."""
    logits = logits.float()
    logit_max = logits.max(dim=1).values
    shifted = logits - logit_max[:, None]
    topk_logit, topk_idx = shifted.topk(top_k, dim=1, sorted=True)
    if dtype == "float16":
        topk_logit = topk_logit.clamp(min=FLOAT16_MIN)  # never -inf in float16
    columns = {
        "topk_idx": topk_idx.to(torch.int32).numpy(),
        "topk_logit": topk_logit.to(getattr(torch, dtype)).numpy(),
        "logit_max": logit_max.numpy(),
    }
    for t in temperatures:
        columns[lse_column(t)] = torch.logsumexp(shifted / float(t), dim=1).numpy()
    return columns


def fidelity_sums(logits: torch.Tensor, cols: dict[str, np.ndarray], temperatures: list[float]) -> dict[str, float]:
    """Per-row sums for the fidelity statistics of one batch (view-0 rows only).

    kept mass = sum of the cached top-k probabilities; KL(full || cached) compares the
    teacher's full softmax p with the cached top-k probabilities q plus the tail mass spread
    evenly over the other classes (the least-informative completion of what is kept). In
    closed form, without building q over the vocabulary: KL = sum p log p - sum_kept p log q -
    (1 - sum_kept p) log(tail / (C - k)), where sum p log p = sum p z / T - logsumexp(z / T).
    """
    z = logits.float()
    num_classes = z.shape[1]
    idx = torch.tensor(cols["topk_idx"], dtype=torch.long)
    kept_logit = torch.tensor(cols["topk_logit"], dtype=torch.float32)
    k = idx.shape[1]
    sums: dict[str, float] = {}
    for t in temperatures:
        lse = torch.tensor(cols[lse_column(t)])
        scaled = z / float(t)
        full_lse = torch.logsumexp(scaled, dim=1)
        p_full = scaled.sub_(full_lse[:, None]).exp_()  # the one (N, C) buffer: z / T, then p
        neg_entropy = torch.einsum("nc,nc->n", p_full, z) / float(t) - full_lse
        log_q = kept_logit / float(t) - lse[:, None]  # the cached top-k log-probabilities
        kept = torch.exp(log_q).sum(1)
        p_at_kept = p_full.gather(1, idx)
        kl = neg_entropy - (p_at_kept * log_q).sum(1)
        if k < num_classes:
            tail = ((1 - kept).clamp(min=0) / (num_classes - k)).clamp(min=1e-30)
            kl -= (1 - p_at_kept.sum(1)).clamp(min=0) * torch.log(tail)
        name = temperature_key(t)
        sums[f"kept_mass_{name}"] = float(kept.sum())
        sums[f"kl_{name}"] = float(kl.clamp(min=0).sum())
    return sums


@dataclass
class Tally:
    """A part's statistics, summed batch by batch in cache order (its entry in the manifest)."""

    sums: dict[str, float] = field(default_factory=dict)  # `fidelity_sums` (and the draws'), per temperature
    scored: int = 0  # rows the statistics count: view 0 / every predicted token
    labeled: int = 0  # scored rows whose truth is known
    correct: int = 0  # of those, the ones the teacher's top-1 gets right
    nll: float = 0.0  # the teacher's cross-entropy on the labeled rows
    error: float = 0.0  # the largest |decoded - computed| shifted logit written (compact)


def batch_columns(batch: Batch, cfg: LabelConfig, encoding: dict[str, Any], tally: Tally) -> dict[str, np.ndarray]:
    """The cache columns of one batch of rows (`part_table` takes them), its statistics added to `tally`."""
    logits = batch.logits
    computed = soft_targets(logits, cfg.top_k, cfg.temperatures,
                            cfg.logit_dtype if encoding["name"] == "topk" else "float32")
    stored = encodings.encode(computed, encoding)
    # What a student will read: every statistic below is of the decoded values.
    cols = dict(computed, **dict(zip(("topk_idx", "topk_logit"), encodings.decode(stored, encoding))))
    if encoding["name"] != "topk":
        tally.error = max(tally.error, largest_error(computed, cols))
    scored = batch.scored
    tally.scored += int(scored.sum())
    scored_logits = logits[torch.from_numpy(scored)]
    batch_sums = fidelity_sums(scored_logits, {k: v[scored] for k, v in cols.items()}, cfg.temperatures)
    if cfg.sampling:
        drawn = draw(logits, batch, cfg)
        cols |= drawn
        for t in cfg.temperatures:
            idx, count, entropy = sample_columns(t)
            # logsumexp(z / T) from the columns already computed: logit_max / T + lse
            normaliser = torch.from_numpy(cols["logit_max"][scored] / float(t) + cols[lse_column(t)][scored])
            batch_sums |= sampling.fidelity_sums(scored_logits, drawn[idx][scored], drawn[count][scored],
                                                 drawn[entropy][scored], t, temperature_key(t), normaliser)
    for name, value in batch_sums.items():
        tally.sums[name] = tally.sums.get(name, 0.0) + value
    truth = batch.truth[scored]
    if (truth >= 0).any():
        known = torch.from_numpy(truth >= 0)
        tally.labeled += int(known.sum())
        tally.correct += int((cols["topk_idx"][scored][:, 0] == truth)[truth >= 0].sum())
        tally.nll += float(torch.nn.functional.cross_entropy(
            scored_logits[known], torch.from_numpy(truth)[known].long(), reduction="sum"))
    return {**cols, **stored}


def draw(logits: torch.Tensor, batch: Batch, cfg: LabelConfig) -> dict[str, np.ndarray]:
    """The sampled columns of a batch (`label.sampling`), padded (R, N), per temperature."""
    cols = {}
    for t in cfg.temperatures:
        keys = sampling.row_keys(cfg.sampling_seed, batch.ids, batch.view, batch.position, t)
        idx, count, entropy = sample_columns(t)
        cols[idx], cols[count], cols[entropy] = sampling.draw(logits, cfg.sampling, t, keys)
    return cols


def largest_error(computed: dict[str, np.ndarray], decoded: dict[str, np.ndarray]) -> float:
    """The largest |decoded - computed| shifted logit of a batch (rows matched by class id)."""
    if not computed["topk_idx"].size:
        return 0.0
    order = np.argsort(decoded["topk_idx"], axis=1, kind="stable")
    wanted = np.argsort(computed["topk_idx"], axis=1, kind="stable")
    return float(np.abs(np.take_along_axis(decoded["topk_logit"], order, 1)
                        - np.take_along_axis(computed["topk_logit"].astype(np.float32), wanted, 1)).max())


def part_schema(cfg: LabelConfig, row_columns: tuple[str, ...] = (), num_classes: int | None = None) -> pa.Schema:
    """The soft-target columns, after the task's own int32 row columns (`ROW_COLUMNS`: a token
    row's `position`, a masked row's `input_token`); the top-k as `label.encoding` stores it
    (compact: its id type needs `num_classes`)."""
    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("view", pa.int32(), nullable=False),
        *[pa.field(name, pa.int32(), nullable=False) for name in row_columns],
        *encodings.fields(encodings.header(cfg.encoding), cfg.top_k, cfg.logit_dtype, num_classes),
        pa.field("logit_max", pa.float32(), nullable=False),
    ]
    fields += [pa.field(lse_column(t), pa.float32(), nullable=False) for t in cfg.temperatures]
    if cfg.sampling:
        fields += sampling.fields(cfg.temperatures, cfg.sampling, encodings.id_type(num_classes))
    return pa.schema(fields)


def part_table(schema: pa.Schema, batch: Batch, cols: dict[str, np.ndarray]) -> pa.Table:
    """A batch's rows as a part holds them (`part_schema`), from `batch_columns`'s columns."""
    k = cols["topk_idx"].shape[1]
    arrays = [pa.array(batch.ids, pa.int64()), pa.array(batch.view, pa.int32())]
    if batch.position is not None:
        arrays.append(pa.array(batch.position, pa.int32()))
    if batch.input_token is not None:
        arrays.append(pa.array(batch.input_token, pa.int32()))
    arrays += [pa.FixedSizeListArray.from_arrays(pa.array(cols[f.name].reshape(-1), f.type.value_type), k)
               for f in schema if f.name.startswith("topk_")]
    arrays.append(pa.array(cols["logit_max"], pa.float32()))
    arrays += [pa.array(cols[f.name], pa.float32()) for f in schema if f.name.startswith("lse_")]
    for f in schema:
        if f.name.startswith("sample_idx_"):
            count = schema.field(f.name.replace("sample_idx_", "sample_count_"))
            arrays += sampling.to_arrow(cols[f.name], cols[count.name], f.type.value_type, count.type.value_type)
        elif f.name.startswith("entropy_"):
            arrays.append(pa.array(cols[f.name], pa.float32()))
    return pa.Table.from_arrays(arrays, schema=schema)


def finish(manifest: dict[str, Any]) -> None:
    """Aggregate the per-part sums into the manifest's fidelity statistics; mark complete."""
    fidelity = {}
    for split, info in manifest["splits"].items():
        totals: dict[str, float] = {}
        for part in info["parts"]:
            for name, value in part["fidelity_sums"].items():
                totals[name] = totals.get(name, 0.0) + value
        samples = sum(p["scored"] for p in info["parts"])  # rows scored: view 0 / every predicted token
        stats: dict[str, Any] = {}
        for t in manifest["temperatures"]:
            name = temperature_key(t)
            stats[name] = {"kept_mass": totals[f"kept_mass_{name}"] / samples,
                           "kl_full_to_cached": totals[f"kl_{name}"] / samples}
            if f"kl_sampled_{name}" in totals:  # label.sampling: the draws' own statistics
                stats[name] |= {"sampled_mass": totals[f"sampled_mass_{name}"] / samples,
                                "kl_full_to_sampled": totals[f"kl_sampled_{name}"] / samples}
        labeled = sum(p["labeled"] for p in info["parts"])
        stats["teacher_accuracy"] = sum(p["correct"] for p in info["parts"]) / labeled if labeled else None
        stats["teacher_loss"] = sum(p["nll"] for p in info["parts"]) / labeled if labeled else None
        fidelity[split] = stats
    manifest["fidelity"] = fidelity
    if encodings.of(manifest)["name"] != "topk":
        manifest["encoding"]["max_abs_error"] = max(p["max_abs_error"] for i in manifest["splits"].values()
                                                    for p in i["parts"])
    manifest["complete"] = True
