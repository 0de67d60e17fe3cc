"""Sampled targets (`label.sampling: N`): tokens drawn from the teacher's full distribution.

Per cache row and per cached temperature T, N classes are drawn with replacement from
softmax(z / T) over ALL classes (inverse CDF in float64). The row keeps its distinct classes
in ascending order with how often each was drawn, and the teacher's exact entropy at T:

    sample_idx_t<T>    list<uint8|uint16|uint32>   the distinct classes drawn, ascending
    sample_count_t<T>  list<uint8|uint16>          how often each was drawn (sums to N)
    entropy_t<T>       float32                     H(softmax(z / T)), in nats

so that (1/N) sum_j count_j * -log q_T(idx_j) - entropy is an unbiased estimate of
KL(teacher_T || student_T) (`losses.sampled_soft_target_loss`, RS-KD). The draws of a row
depend only on (label.sampling_seed, id, view, position, T): a resumed or sharded `kd label`
writes the same ones, whatever the batch.

The fidelity statistics of the draws (`kd cache info`) decode a row as the distribution it
estimates: the classes never drawn share Good-Turing's estimate of their mass, (classes
drawn once) / (N + 1) and at least 1 / (N + 1), evenly, and each drawn class gets count / N of
the rest (finite where the empirical distribution alone would give an infinite KL).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from kd.cache.layout import sample_columns

SCHEMA_VERSION = 3  # a cache with sampled columns (an older kd, which would not read them, refuses it)
ROWS_PER_CHUNK = 1024  # rows of (rows, C) float64 buffers at a time
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a bijection of uint64 whose outputs look independent
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def row_keys(seed: int, ids: np.ndarray, view: np.ndarray, position: np.ndarray | None,
             temperature: float) -> np.ndarray:
    """(R,) uint64: one key per row, from the seed, the row's identity and the temperature."""
    key = _mix(np.full(len(ids), np.uint64(seed) ^ np.array(temperature, np.float64).view(np.uint64)))
    with np.errstate(over="ignore"):
        for part in (ids, view, np.zeros(len(ids), np.int64) if position is None else position):
            key = _mix((key + _GOLDEN) ^ np.asarray(part).astype(np.int64).view(np.uint64))
    return key


def uniforms(keys: np.ndarray, draws: int) -> np.ndarray:
    """(R, draws) float64 in [0, 1): draw j of row r from its key alone."""
    with np.errstate(over="ignore"):
        bits = _mix(keys[:, None] + _GOLDEN * np.arange(1, draws + 1, dtype=np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw(logits: torch.Tensor, draws: int, temperature: float, keys: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's draws at one temperature: (sample_idx (R, draws) int64 and sample_count (R, draws)
    int64, the distinct classes ascending, padded with count 0; entropy (R,) float32)."""
    drawn, entropy = draws_in_order(logits, draws, temperature, keys)
    return (*distinct(drawn), entropy)


def draws_in_order(logits: torch.Tensor, draws: int, temperature: float, keys: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """((R, draws) int64, the classes in the order drawn; (R,) float32 entropy). Draw j of a row
    does not depend on the number of draws: the first n of N draws are the draws of n."""
    rows, classes = logits.shape
    idx = np.zeros((rows, draws), np.int64)
    entropy = np.zeros(rows, np.float32)
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = slice(start, min(start + ROWS_PER_CHUNK, rows))
        log_p = torch.log_softmax(logits[chunk].double() / float(temperature), dim=1)
        p = log_p.exp()
        entropy[chunk] = (-(p * log_p).nan_to_num().sum(1)).numpy()  # 0 log 0 = 0
        cdf = p.cumsum_(dim=1)
        target = torch.from_numpy(uniforms(keys[chunk], draws)) * cdf[:, -1:]
        # the first class whose cdf passes the target: a class of probability 0 is never drawn
        idx[chunk] = torch.searchsorted(cdf, target, right=True).clamp_(max=classes - 1).numpy()
    return idx, entropy


def distinct(drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, N) draws -> (classes, counts) (R, N): each row's distinct classes ascending with their
    counts, padded with class 0, count 0."""
    rows, n = drawn.shape
    ordered = np.sort(drawn, axis=1)
    first = np.ones_like(ordered, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = np.cumsum(first, axis=1) - 1  # each draw's place among its row's distinct classes
    classes = np.zeros((rows, n), np.int64)
    counts = np.zeros((rows, n), np.int64)
    r = np.repeat(np.arange(rows), n).reshape(rows, n)
    classes[r[first], slot[first]] = ordered[first]
    np.add.at(counts, (r.ravel(), slot.ravel()), 1)
    return classes, counts


def counts_type(draws: int) -> pa.DataType:
    return pa.uint8() if draws <= 255 else pa.uint16() if draws <= 65535 else pa.uint32()


def fields(temperatures: list[float], draws: int, id_type: pa.DataType) -> list[pa.Field]:
    """The sampled columns' Parquet fields, three per temperature."""
    out = []
    for t in temperatures:
        idx, count, entropy = sample_columns(t)
        out += [pa.field(idx, pa.list_(id_type), nullable=False),
                pa.field(count, pa.list_(counts_type(draws)), nullable=False),
                pa.field(entropy, pa.float32(), nullable=False)]
    return out


def to_arrow(classes: np.ndarray, counts: np.ndarray, id_type: pa.DataType, count_type: pa.DataType
             ) -> tuple[pa.Array, pa.Array]:
    """Padded (R, N) classes and counts -> two list arrays holding each row's non-zero counts."""
    kept = counts > 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(kept.sum(1))]).astype(np.int32))
    return (pa.ListArray.from_arrays(offsets, pa.array(classes[kept], id_type)),
            pa.ListArray.from_arrays(offsets, pa.array(counts[kept], count_type)))


def from_arrow(idx: pa.Array | pa.ChunkedArray, count: pa.Array | pa.ChunkedArray, draws: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Two list columns -> padded (R, draws) int32 classes and counts (padding: class 0, count 0)."""
    idx = idx.combine_chunks() if isinstance(idx, pa.ChunkedArray) else idx
    count = count.combine_chunks() if isinstance(count, pa.ChunkedArray) else count
    lengths = idx.value_lengths().to_numpy(zero_copy_only=False)
    rows = len(lengths)
    row = np.repeat(np.arange(rows), lengths)
    slot = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    classes = np.zeros((rows, draws), np.int32)
    counts = np.zeros((rows, draws), np.int32)
    classes[row, slot] = idx.flatten().to_numpy(zero_copy_only=False)
    counts[row, slot] = count.flatten().to_numpy(zero_copy_only=False)
    return classes, counts


def fidelity_sums(logits: torch.Tensor, classes: np.ndarray, counts: np.ndarray, entropy: np.ndarray,
                  temperature: float, name: str, log_normaliser: torch.Tensor | None = None) -> dict[str, float]:
    """Per-row sums of one temperature's draws' fidelity (see the module docstring): the
    teacher's mass on the drawn classes, and KL(full || decoded draws) = -H - sum_drawn p log q
    - (mass not drawn) log(unseen mass / classes not drawn). `log_normaliser`: each row's
    logsumexp(z / T) when the caller has it (the writer: logit_max / T + lse), else computed."""
    if not len(counts):
        return {f"sampled_mass_{name}": 0.0, f"kl_sampled_{name}": 0.0}
    T = float(temperature)
    if log_normaliser is None:
        log_normaliser = torch.logsumexp(logits.float() / T, dim=1)
    drawn = logits.gather(1, torch.from_numpy(classes).long()).float() / T
    log_p = (drawn - log_normaliser.float()[:, None]).double()  # (R, N): no pass over the classes
    kept = torch.from_numpy(counts > 0)
    c = torch.from_numpy(counts).double()
    n = c.sum(1)
    p_drawn = log_p.exp() * kept
    unseen = logits.shape[1] - kept.sum(1)  # classes never drawn
    singletons = torch.from_numpy((counts == 1).sum(1))
    tail = torch.where(unseen > 0, singletons.clamp(min=1) / (n + 1), 0.0)
    log_q = torch.log(c / n[:, None] * (1 - tail)[:, None]).where(kept, 0.0)
    p_outside = (1 - p_drawn.sum(1)).clamp(min=0)
    kl = -torch.from_numpy(entropy).double() - (p_drawn * log_q).sum(1)
    kl -= torch.where(unseen > 0, p_outside * torch.log(tail / unseen.clamp(min=1)), 0.0)
    return {f"sampled_mass_{name}": float(p_drawn.sum()), f"kl_sampled_{name}": float(kl.clamp(min=0).sum())}
