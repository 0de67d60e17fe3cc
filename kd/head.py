"""A text student's loss terms computed from its last hidden state and output layer, chunk by
chunk of rows, so that its (rows x vocabulary) logits never exist whole in training.

Every term of KIND "logits" or "labels" (`kd.methods`) is a mean over some of the batch's rows
(`training.RowMean`: all rows for soft targets, the labeled rows for hard labels, the aligned
rows for a student of another tokenizer). So its value is the sum, over chunks of rows, of the
term on the chunk times the chunk's share of those rows, and each term stays the function of
logits it is. `from_hidden` evaluates every such term that way (`_FromHidden`): the forward
projects a chunk (hidden_chunk @ weight.T + bias), scores it with each term and drops it; the
backward projects each chunk again with grad enabled, backpropagates the weighted terms into the
chunk's logits, and from there into the hidden state and the output layer (its gradient summed
over chunks). Values and gradients are those of the terms on the whole logits, to float rounding
(tests/test_head.py). A tied output layer (the input embedding's weight) takes its gradient the
same way: autograd adds it to the embedding's.

Precision: the projection runs in `compute_dtype` (bfloat16 under `precision: bf16-mixed`, as
autocast would run the output layer), its result is cast to float32 before any term sees it, and
the output layer's gradient is summed in its own (master) dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Logits held at a time: 2^25 (128 MB in float32), 220 rows at a 151,936-token vocabulary. Fewer
# rows per chunk would read the (V, H) output layer more often (once per chunk and pass).
CHUNK_ELEMENTS = 2**25

Batch = dict[str, torch.Tensor]
LogitsTerm = Callable[[Batch, dict[str, torch.Tensor]], torch.Tensor]  # term(batch, {"logits": (r, V)})
Rows = Callable[[Batch], "torch.Tensor | None"]  # batch -> (N,) bool: the rows a term averages over (None: all)


def from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch: Batch,
                terms: dict[str, tuple[LogitsTerm, Rows]], compute_dtype: torch.dtype | None = None,
                chunk_elements: int = CHUNK_ELEMENTS, loss_weights: list[float] | None = None
                ) -> dict[str, torch.Tensor]:
    """Each term's value (a scalar, differentiable in hidden, weight and bias) on the logits
    hidden @ weight.T + bias, without holding those logits.

    hidden: (N, H), one row per batch row; weight: (V, H); bias: (V,) or None; batch: the per-row
    targets (every key but "x" has N rows); terms: name -> (term, rows), the term a mean over the
    rows `rows(batch)` selects.

    loss_weights (one per term, the weights the caller's loss gives the values, as
    `training.update` does): the forward then also computes the gradient of that weighted sum,
    chunk by chunk while each chunk's logits exist, so the backward need not project them again
    (one product with the output layer fewer per step, as Liger's fused losses do). A backward
    whose incoming gradient is not proportional to them falls back to projecting again."""
    names = list(terms)
    rows = len(hidden)
    step = max(1, chunk_elements // max(len(weight), 1))
    chunks = [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
    targets = {k: v for k, v in batch.items() if k != "x"}
    shares = [_shares(terms[name][1](targets), rows, chunks, hidden.device) for name in names]
    eager = None
    if loss_weights is not None and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        # as the caller's float32 weight vector holds them, so that its gradient is exactly 1 x these
        eager = torch.tensor(loss_weights, dtype=torch.float32).tolist()
    values = _FromHidden.apply(hidden, weight, bias, targets, [terms[name][0] for name in names], shares, chunks,
                               compute_dtype or weight.dtype, eager)
    return dict(zip(names, values.unbind()))


def _shares(selected: torch.Tensor | None, rows: int, chunks: list[slice], device) -> list[float]:
    """Each chunk's share of the selected rows (0: the term skips the chunk; all 0 when none is selected)."""
    if selected is None:
        return [(c.stop - c.start) / rows for c in chunks]
    ends = torch.tensor([c.stop for c in chunks], device=selected.device) - 1
    counts = selected.long().cumsum(0)[ends].diff(prepend=torch.zeros(1, dtype=torch.long, device=selected.device))
    total = int(counts.sum())  # one sync per term and step
    return [0.0 if total == 0 else n / total for n in counts.tolist()]


class _FromHidden(torch.autograd.Function):
    """(K,) term values from hidden (N, H) and the output layer, one chunk of logits at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, terms, shares, chunks, dtype, eager):
        wide = torch.promote_types(dtype, torch.float32)  # what the terms see: float32 (float64 in tests)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        values = torch.zeros(len(terms), dtype=wide, device=hidden.device)
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad) if eager is not None else None
        for i, chunk in enumerate(chunks):
            if not any(share[i] for share in shares):
                continue
            h = hidden[chunk].to(dtype)
            logits = F.linear(h, w, b).to(wide)  # (r, V), dropped after the chunk
            rows = {k: v[chunk] for k, v in targets.items()}
            if grads is None:
                with torch.no_grad():
                    for j, term in enumerate(terms):
                        if shares[j][i]:
                            values[j] += term(rows, {"logits": logits}).to(wide) * shares[j][i]
                continue
            logits.requires_grad_()
            with torch.enable_grad():
                parts = [term(rows, {"logits": logits}).to(wide) if shares[j][i] else None
                         for j, term in enumerate(terms)]
            for j, part in enumerate(parts):
                if part is not None:
                    values[j] += part.detach() * shares[j][i]
            grads.add(chunk, h, w, logits, [(part, eager[j] * shares[j][i]) for j, part in enumerate(parts)])
        ctx.save_for_backward(hidden, weight, bias)
        ctx.targets, ctx.terms, ctx.shares, ctx.chunks, ctx.dtype = targets, terms, shares, chunks, dtype
        ctx.eager, ctx.grads = eager, grads
        return values

    @staticmethod
    def backward(ctx, grad_values):
        hidden, weight, bias = ctx.saved_tensors
        dtype, wide = ctx.dtype, torch.promote_types(ctx.dtype, torch.float32)
        if ctx.grads is not None:
            factor = _factor(grad_values.to(wide).tolist(), ctx.eager)
            if factor is not None:  # the gradient the forward computed, scaled: no projection again
                grads, ctx.grads = ctx.grads, None
                return (*grads.scaled(factor), None, None, None, None, None, None)
            ctx.grads = None
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad)
        scale = grad_values.to(wide).tolist()
        for i, chunk in enumerate(ctx.chunks):
            weights = [s * share[i] for s, share in zip(scale, ctx.shares)]
            if not any(weights):
                continue
            h = hidden[chunk].to(dtype)
            logits = F.linear(h, w, b).to(wide).requires_grad_()  # (r, V), projected again
            rows = {k: v[chunk] for k, v in ctx.targets.items()}
            with torch.enable_grad():
                parts = [term(rows, {"logits": logits}).to(wide) if weight_ else None
                         for term, weight_ in zip(ctx.terms, weights)]
            grads.add(chunk, h, w, logits, list(zip(parts, weights)))
        return grads.hidden, grads.weight, grads.bias, None, None, None, None, None, None


def _project_back(grad_logits, h, w, chunk, grad_hidden, grad_weight, grad_bias) -> None:
    """A chunk's logits gradient into the hidden rows' gradient and the output layer's sums.
    The (V, H) weight gradient accumulates in place (`addmm_`): a product and a sum of that size
    per chunk would cost a (V, H) temporary and a pass over it (545 MB at Qwen2-0.5B's head)."""
    if grad_hidden is not None:
        grad_hidden[chunk] = grad_logits @ w
    if grad_weight is not None:
        if grad_weight.dtype == h.dtype:
            grad_weight.addmm_(grad_logits.T, h)
        else:  # bf16-mixed: the product in bfloat16, summed into the float32 gradient
            grad_weight += (grad_logits.T @ h).to(grad_weight.dtype)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


def _factor(incoming: list[float], weights: list[float]) -> float | None:
    """c where the incoming gradient is c x the weights the forward's gradient assumed; else None."""
    ratios = {g / w for g, w in zip(incoming, weights) if w}
    if len(ratios) != 1 or any(g for g, w in zip(incoming, weights) if not w):
        return None
    return ratios.pop()


class _Grads:
    """The gradients of the loss-weighted terms in hidden, weight and bias, summed chunk by chunk
    while each chunk's logits exist: in `_FromHidden.forward` (the eager gradient) or in its
    backward (each chunk projected again)."""

    def __init__(self, hidden, weight, bias, needed):
        self.hidden = torch.zeros_like(hidden) if needed[0] else None
        self.weight = torch.zeros_like(weight) if needed[1] else None
        self.bias = torch.zeros_like(bias) if bias is not None and needed[2] else None

    def add(self, chunk, h, w, logits, weighted):
        with torch.enable_grad():
            total = sum(part * weight_ for part, weight_ in weighted if part is not None and weight_)
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            return
        (grad_logits,) = torch.autograd.grad(total, logits)
        _project_back(grad_logits.to(w.dtype), h, w, chunk, self.hidden, self.weight, self.bias)

    def scaled(self, factor):
        grads = (self.hidden, self.weight, self.bias)
        if factor == 1.0:  # what `training.update`'s loss sends
            return grads
        return tuple(None if g is None else g * factor for g in grads)
