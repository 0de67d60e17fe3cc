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


# Rows of logits read at a time: a chunk's few float32 temporaries (the shifted logits, their
# exponentials) stay in the CPU's cache instead of being (R, C) buffers in memory; on a GPU one
# chunk is usually the whole batch.
CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 512 << 20}


@dataclass
class Scan:
    """What one pass over a batch of logits (R, C) keeps of each row (on the logits' device)."""

    logit_max: torch.Tensor  # (R,) float32
    topk_logit: torch.Tensor  # (R, k) float32: the top-k of the max-shifted logits, descending
    topk_idx: torch.Tensor  # (R, k) int64
    lse: dict[float, torch.Tensor]  # T -> (R,) logsumexp((z - max) / T)
    # T -> (R,) sum_c p_T(c) (z_c - max): the expected shifted logit under the teacher at T
    # (with `moments`; the fidelity statistics' entropy term)
    mean_shifted: dict[float, torch.Tensor]


def scan(logits: torch.Tensor, top_k: int, temperatures: list[float], moments: bool = False) -> Scan:
    """Top-k, logit max and lse per temperature of logits (R, C) (any float dtype, any device),
    read in chunks of rows (`CHUNK_BYTES`): no (R, C) temporary. Each row's values are those of
    the whole-batch form (`z - z.max()`, then `topk` and `logsumexp` of it / T) bit for bit:
    a row's reductions do not depend on the rows beside it. One pass of exp per temperature."""
    rows, classes = logits.shape
    temps = [float(t) for t in temperatures]
    device = logits.device
    out = Scan(torch.empty(rows, device=device), torch.empty(rows, top_k, device=device),
               torch.empty(rows, top_k, dtype=torch.long, device=device),
               {t: torch.empty(rows, device=device) for t in temps},
               {t: torch.empty(rows, device=device) for t in temps} if moments else {})
    step = max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"]) // (4 * max(classes, 1)))
    for start in range(0, rows, step):
        at = slice(start, min(start + step, rows))
        z = logits[at]
        out.logit_max[at] = z.amax(dim=1).float()
        # z - max in float32: a new chunk, or in place in the chunk's float32 copy of other dtypes
        shifted = z - out.logit_max[at, None] if z.dtype == torch.float32 else z.float().sub_(out.logit_max[at, None])
        if top_k:
            torch.topk(shifted, top_k, dim=1, sorted=True, out=(out.topk_logit[at], out.topk_idx[at]))
        for t in temps:
            # logsumexp's own steps: its max of (z - max) / T is 0 in every row, so exp, sum and log
            # of the same values give the same bits
            e = torch.exp(shifted if t == 1.0 else shifted / t)
            total = e.sum(dim=1)
            out.lse[t][at] = total.log()
            if moments:
                out.mean_shifted[t][at] = e.mul_(shifted).sum(dim=1) / total
    return out


def columns(rows: Scan, temperatures: list[float], dtype: str) -> dict[str, np.ndarray]:
    """The cache columns of a `Scan` as the `topk` encoding stores them (`topk_logit` in `dtype`,
    clamped to float16's range in float16: never -inf)."""
    topk_logit = rows.topk_logit
    if dtype == "float16":
        topk_logit = topk_logit.clamp(min=FLOAT16_MIN)
    cols = {
        "topk_idx": rows.topk_idx.to(torch.int32).cpu().numpy(),
        "topk_logit": topk_logit.to(getattr(torch, dtype)).cpu().numpy(),
        "logit_max": rows.logit_max.cpu().numpy(),
    }
    for t in temperatures:
        cols[lse_column(t)] = rows.lse[float(t)].cpu().numpy()
    return cols


def soft_targets(logits: torch.Tensor, top_k: int, temperatures: list[float], dtype: str) -> dict[str, np.ndarray]:
    """The cache columns for a batch of logits (N, C): top-k of the max-shifted logits and lse per T
    (as the `topk` encoding stores them; `encoding.encode` turns them into another's)."""
    return columns(scan(logits, top_k, temperatures), temperatures, dtype)


def rows_at(rows: Scan, index: torch.Tensor) -> Scan:
    """The `Scan` of some rows (`index`: a bool mask or row numbers)."""
    index = index.to(rows.logit_max.device)
    return Scan(rows.logit_max[index], rows.topk_logit[index], rows.topk_idx[index],
                {t: v[index] for t, v in rows.lse.items()}, {t: v[index] for t, v in rows.mean_shifted.items()})


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(R,) bool on the CPU: the rows of logits (R, C) without NaN or Inf. A row's sum is finite
    when all its values are, so only the rows whose sum is not (or overflows) are read again."""
    finite = torch.isfinite(logits.sum(dim=1, dtype=torch.float32))
    for row in torch.nonzero(~finite).flatten().tolist():
        finite[row] = bool(torch.isfinite(logits[row]).all())
    return finite.cpu()


def fidelity_sums(logits: torch.Tensor, cols: dict[str, np.ndarray], temperatures: list[float],
                  rows: Scan | None = None) -> dict[str, float]:
    """Per-row sums for the fidelity statistics of one batch (view-0 rows only).

    kept mass = sum of the cached top-k probabilities; KL(full || cached) compares the
    teacher's full softmax p with the cached top-k probabilities q plus the tail mass spread
    evenly over the other classes (the least-informative completion of what is kept). In
    closed form, without building p or q over the vocabulary: KL = sum p log p - sum_kept p log q
    - (1 - sum_kept p) log(tail / (C - k)), where sum p log p = E_p[z - max] / T - lse (`Scan`'s
    `mean_shifted` and `lse`, from the one pass over the logits; `rows`: the scan of these
    logits with `moments` when the caller has it) and p at the kept classes needs only their
    logits.
    """
    if rows is None:
        rows = scan(logits, 0, temperatures, moments=True)
    num_classes = logits.shape[1]
    idx = torch.tensor(cols["topk_idx"], dtype=torch.long)
    kept_logit = torch.tensor(cols["topk_logit"], dtype=torch.float32)
    k = idx.shape[1]
    logit_max = rows.logit_max.cpu()
    z_kept = logits.gather(1, idx.to(logits.device)).float().cpu() - logit_max[:, None]  # (N, k) shifted
    sums: dict[str, float] = {}
    for t in temperatures:
        lse = torch.tensor(cols[lse_column(t)])
        full_lse = rows.lse[float(t)].cpu()
        neg_entropy = rows.mean_shifted[float(t)].cpu() / float(t) - full_lse
        log_q = kept_logit / float(t) - lse[:, None]  # the cached top-k log-probabilities
        kept = torch.exp(log_q).sum(1)
        p_at_kept = torch.exp(z_kept / float(t) - full_lse[:, None])
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
    """The cache columns of one batch of rows (`part_table` takes them), its statistics added to `tally`.

    One `scan` of the logits gives the columns and everything the statistics need (the teacher's
    loss takes lse at T = 1, scanned too when no cached temperature is 1); the rest reads only
    (R, k) values."""
    logits = batch.logits
    temps = [float(t) for t in cfg.temperatures]
    rows = scan(logits, cfg.top_k, temps + ([] if 1.0 in temps else [1.0]), moments=True)
    computed = columns(rows, cfg.temperatures, cfg.logit_dtype if encoding["name"] == "topk" else "float32")
    stored = encodings.encode(computed, encoding)
    # What a student will read: every statistic below is of the decoded values.
    cols = dict(computed, **dict(zip(("topk_idx", "topk_logit"), encodings.decode(stored, encoding))))
    if encoding["name"] != "topk":
        tally.error = max(tally.error, largest_error(computed, cols))
    scored = batch.scored
    tally.scored += int(scored.sum())
    at = torch.from_numpy(np.flatnonzero(scored))
    scored_logits = logits if len(at) == len(scored) else logits[at.to(logits.device)]
    scored_rows = rows if len(at) == len(scored) else rows_at(rows, at)
    batch_sums = fidelity_sums(scored_logits, {k: v[scored] for k, v in cols.items()}, cfg.temperatures, scored_rows)
    if cfg.sampling:
        cpu_logits = logits.float().cpu()  # the draws run on the CPU
        drawn = draw(cpu_logits, batch, cfg)
        cols |= drawn
        for t in cfg.temperatures:
            idx, count, entropy = sample_columns(t)
            # logsumexp(z / T) from the columns already computed: logit_max / T + lse
            normaliser = torch.from_numpy(cols["logit_max"][scored] / float(t) + cols[lse_column(t)][scored])
            batch_sums |= sampling.fidelity_sums(cpu_logits[at], drawn[idx][scored], drawn[count][scored],
                                                 drawn[entropy][scored], t, temperature_key(t), normaliser)
    for name, value in batch_sums.items():
        tally.sums[name] = tally.sums.get(name, 0.0) + value
    truth = batch.truth[scored]
    if (truth >= 0).any():
        known = np.flatnonzero(truth >= 0)
        tally.labeled += len(known)
        tally.correct += int((cols["topk_idx"][scored][known, 0] == truth[known]).sum())
        # the cross-entropy of the known rows: logsumexp(z) - z[truth] = logit_max + lse at T = 1 - z[truth]
        row = at[known]
        z_truth = logits[row.to(logits.device), torch.from_numpy(truth[known]).to(logits.device)].float().cpu()
        normaliser = rows.logit_max[row.to(logits.device)].cpu() + rows.lse[1.0][row.to(logits.device)].cpu()
        tally.nll += float((normaliser - z_truth).sum())
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
