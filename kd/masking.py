"""BERT's masking of token blocks, for masked language models.

During training (`mask_tokens`) 15% of a block's non-special tokens are drawn afresh each batch;
a masked-LM cache records a fixed number per block (`mask_count`, `fixed_masks`), each block's
draw a pure function of (seed, id, view) so that it can be drawn again to check a cache, and a
student sees the recorded masks (`apply_masks`).
"""

from __future__ import annotations

import numpy as np
import torch

from kd.errors import InputError
from kd.prepared.tokens import SpecialIds

# BERT's masking: 15% of the (non-special) tokens are predicted; of those 80% become [MASK],
# 10% a random token and 10% stay as they are.
MASK_PROB, MASK_AS_MASK, MASK_AS_RANDOM = 0.15, 0.8, 0.1


def special_tokens(tokens: torch.Tensor, special: SpecialIds) -> torch.Tensor:
    """(B, L) bool: the tokens BERT's masking spares (pad, eos, mask and bos, those the tokenizer has)."""
    ids = [i for i in (special.pad, special.eos, special.mask, special.bos) if i is not None]
    return torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype))


def mask_id(special: SpecialIds, where: str) -> int:
    """The mask token a masked LM needs; a tokenizer without one is refused."""
    if special.mask is None:
        raise InputError(f"{where}: the tokenizer has no mask token; a masked LM needs one")
    return special.mask


def mask_tokens(tokens: torch.Tensor, special: SpecialIds, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of tokens (B, L) -> (inputs (B, L), labels (B, L), -100 where not predicted)."""
    protected = special_tokens(tokens, special)
    chosen = (torch.rand(tokens.shape, generator=generator) < MASK_PROB) & ~protected
    labels = torch.where(chosen, tokens, -100)
    how = torch.rand(tokens.shape, generator=generator)
    random_tokens = torch.randint(vocab_size, tokens.shape, generator=generator)
    inputs = torch.where(chosen & (how < MASK_AS_MASK), special.mask, tokens)
    swap = chosen & (how >= MASK_AS_MASK) & (how < MASK_AS_MASK + MASK_AS_RANDOM)
    return torch.where(swap, random_tokens, inputs), labels


def mask_count(block_size: int) -> int:
    """Positions a masked-LM cache records per block and view: BERT's 15%, rounded."""
    return max(1, round(MASK_PROB * block_size))


def fixed_masks(tokens: torch.Tensor, ids: np.ndarray, views: np.ndarray, count: int, special: SpecialIds,
                vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking with a fixed number of positions per block, the same rows for every block:
    blocks (B, L) -> (positions (B, count), ascending; the token the model sees there (B, count)).

    Each block's draw is a pure function of (seed, id, view), whatever the batch it falls in, so
    a cache's masks can be checked by drawing them again. Special tokens are masked only when a
    block has fewer than `count` others. Of the chosen, 80% become [MASK], 10% a random token
    and 10% stay as they are.
    """
    protected = special_tokens(tokens, special).float()
    positions, seen = [], []
    for row, (block_id, view) in enumerate(zip(ids.tolist(), views.tolist())):
        g = torch.Generator().manual_seed((seed * 1_000_003 + block_id) * 1_009 + view)
        keys = torch.rand(tokens.shape[1], generator=g) + protected[row]  # specials sort last
        chosen = keys.topk(count, largest=False).indices.sort().values
        how = torch.rand(count, generator=g)
        random_tokens = torch.randint(vocab_size, (count,), generator=g)
        original = tokens[row, chosen]
        seen.append(torch.where(how < MASK_AS_MASK, special.mask,
                                torch.where(how < MASK_AS_MASK + MASK_AS_RANDOM, random_tokens, original)))
        positions.append(chosen)
    return torch.stack(positions), torch.stack(seen).to(tokens.dtype)


def apply_masks(tokens: torch.Tensor, positions: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Blocks (B, L) with the recorded tokens put at the recorded positions (B, M)."""
    return tokens.scatter(1, positions.long(), seen.to(tokens.dtype))
