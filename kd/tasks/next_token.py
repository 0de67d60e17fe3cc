"""Next-token rows: a block of L tokens seen as L - 1 rows, one per predicted token.

A causal LM's logits (`next_token_logits`) and a layer's states (`token_rows`) as cache rows;
`TokenRows`, a causal LM that gives those rows, only the response positions' for instruction
data (its input then carries the loss mask, `model_input`); the student's sample set of blocks
(`block_set`); and a prepared split's blocks with each row's true next token
(`blocks_and_targets`). The causal task and the student of its own tokenizer
(`cross_tokenizer`) both read their blocks this way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd import lm, loader
from kd.prepared import tokens


def next_token_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits for blocks (B, L) as cache rows (B * (L - 1), V): every position
    but the last, which predicts nothing inside the block."""
    return token_rows(model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits)  # full blocks


def token_rows(output: torch.Tensor | tuple) -> torch.Tensor:
    """A layer's output (B, L, H) -> (B * (L - 1), H): one row per predicted token."""
    states = lm.hidden(output)
    return states[:, :-1].reshape(-1, states.shape[-1])


class TokenRows(nn.Module):
    """A causal LM seen row by row: blocks (B, L) -> logits (B * (L - 1), V), the last position
    dropped (it predicts nothing inside the block); or blocks with their loss masks (B, 2, L)
    -> the rows of the response positions only (position t where token t + 1 is masked in),
    in cache order. Right padding needs no attention mask: a causal LM's position t never sees
    the tokens after it.

    In training it is a `training.HiddenRows`: `hidden_rows(x)` gives the same rows' last hidden
    state (N, H) and `output_layer()` the layer that makes them logits, so the loss never holds
    the (N, V) logits (`kd.head`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._plain_head: bool | None = None  # decided on first use (`output_layer`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return next_token_logits(self.model, x)
        logits = self.model(input_ids=x[:, 0], attention_mask=torch.ones_like(x[:, 0])).logits
        return logits[:, :-1][x[:, 1, 1:].bool()]

    def hidden_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden state (N, H) of the rows `forward` gives logits for."""
        tokens = x if x.dim() == 2 else x[:, 0]
        states = self.model.base_model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).last_hidden_state
        if x.dim() == 2:
            return states[:, :-1].reshape(-1, states.shape[-1])
        return states[:, :-1][x[:, 1, 1:].bool()]

    def output_layer(self) -> nn.Linear | None:
        """The model's output embeddings if its logits are exactly that layer on `hidden_rows`
        (checked once, on a short block in eval mode); None for a model whose logits are more
        (soft-capped, scaled: Gemma 2, Cohere), which then trains on its logits."""
        layer = self.model.get_output_embeddings()
        if self._plain_head is None:
            self._plain_head = isinstance(layer, nn.Linear) and _logits_are_head(self.model, layer)
        return layer if self._plain_head else None


def _logits_are_head(model: nn.Module, layer: nn.Linear) -> bool:
    """Whether `model`'s logits equal `layer` on its base model's last hidden state (a short probe
    block, eval mode, no grad, the model's train mode restored)."""
    training = model.training
    probe = torch.arange(min(8, layer.out_features), device=layer.weight.device)[None]  # (1, 8) token ids
    try:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=probe, attention_mask=torch.ones_like(probe)).logits
            states = model.base_model(input_ids=probe, attention_mask=torch.ones_like(probe)).last_hidden_state
            return logits.shape == (1, probe.shape[1], layer.out_features) and torch.allclose(
                layer(states).float(), logits.float(), rtol=1e-4, atol=1e-4)
    finally:
        model.train(training)


def model_input(tokens: torch.Tensor, predicted: torch.Tensor | None) -> torch.Tensor:
    """What `TokenRows` takes: the blocks (N, L), or with `predicted` (N, L - 1) the blocks and
    their loss masks (N, 2, L)."""
    if predicted is None:
        return tokens
    mask = torch.zeros_like(tokens)
    mask[:, 1:] = predicted.to(tokens.dtype)
    return torch.stack([tokens, mask], 1)


def block_set(tokens: torch.Tensor, ids: np.ndarray, targets: dict[str, torch.Tensor],
              predicted: torch.Tensor | None = None) -> loader.SampleSet:
    """Blocks (N, L) with their rows, one per predicted token (N * (L - 1), or with `predicted`
    (N, L - 1) one per predicted response token); a block is its own input (no views)."""
    if predicted is None:
        return loader.SampleSet({"tokens": tokens}, ids, targets, lambda inputs, ids, view: inputs["tokens"],
                                per_view=tokens.shape[1] - 1)
    return loader.SampleSet({"tokens": model_input(tokens, predicted)}, ids, targets,
                            lambda inputs, ids, view: inputs["tokens"], counts=predicted.sum(1))


def blocks_and_targets(source: Path, first: int | None = None, last: int | None = None
                ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """ids, blocks, predicted positions (None: all) and each row's true next token, of blocks
    [first, last) of a prepared split (all by default)."""
    if first is None:
        ids, blocks = tokens.read_blocks(source)
        predicted = tokens.predicted(source)
    else:
        ids, blocks = tokens.read_rows(source, first, last)
        predicted = tokens.predicted(source, first, last)
    torch_blocks = torch.from_numpy(blocks)
    keep = None if predicted is None else torch.from_numpy(predicted)
    truth = torch_blocks[:, 1:].reshape(-1) if keep is None else torch_blocks[:, 1:][keep]
    return ids, torch_blocks, keep, truth.long()
