"""What the teacher sees and what becomes a cache row, per kind of prepared data.

`ImageInputs`: one row per (sample, view); view 0 is the input as is, views 1..V are
augmented copies regenerated from (id, view, seed). `TokenInputs`: one row per predicted
token of a block of L tokens; a causal LM's position t predicts token t + 1, so a block gives
L - 1 rows, `position` 0..L-2. `MaskedTokenInputs`: one row per masked token; each view of a
block is one masking of M positions (BERT's 15%), and the rows record the masking (`position`
and `input_token`, what the model saw there), so a student sees the same masks. Either way a
sample has a fixed number of rows (`per_sample`), sample-major, so parts and Zarr chunks line
up the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import augment, features
from pipeline.prepared import images as data
from pipeline.config import LabelConfig
from pipeline.errors import ConfigError, InputError


@dataclass
class Batch:
    """One batch of cache rows from the teacher."""

    ids: np.ndarray  # (R,) int64
    view: np.ndarray  # (R,) int32
    position: np.ndarray | None  # (R,) int32 for token rows
    logits: torch.Tensor  # (R, C) float32
    features: dict[str, np.ndarray]  # layer -> (R, *shape) float16
    truth: np.ndarray  # (R,) int64: the true class / next token, -1 where unknown
    scored: np.ndarray  # (R,) bool: rows the fidelity statistics and teacher accuracy count
    input_token: np.ndarray | None = None  # (R,) int32 for masked rows: the token the model saw


class ImageInputs:
    modality = "image"

    def __init__(self, prepared: Path, splits: list[str], cfg: LabelConfig):
        self.infos = {s: data.split_info(prepared / f"{s}.parquet") for s in splits}
        self.input_shape = self.infos["labeled"]["input_shape"]
        self.per_sample = cfg.views + 1
        self.cfg = cfg

    def samples(self, split: str) -> int:
        return self.infos[split]["rows"]

    def header(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape}

    def probe(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def read(self, source: Path, first: int, last: int) -> data.Split:
        rows = data.read_rows(source, first, last)
        if not np.isfinite(rows.x).all():
            bad = rows.ids[~np.isfinite(rows.x).all(1)][:5].tolist()
            raise InputError(f"{source}: NaN or Inf in inputs (ids {bad})")
        return rows

    def batch(self, model: nn.Module, rows: data.Split, start: int, stop: int,
              specs: dict[str, dict]) -> Batch:
        views, cfg = self.per_sample, self.cfg
        ids = np.repeat(rows.ids[start:stop], views)
        view = np.tile(np.arange(views, dtype=np.int32), stop - start)
        x = torch.tensor(rows.x[start:stop]).repeat_interleave(views, dim=0)
        x = augment.apply_views(x, ids, view, self.input_shape, cfg.view_seed, cfg.view_shift)
        with torch.no_grad(), features.tap(model, list(specs)) as captured:
            logits = model(x.reshape(len(x), *self.input_shape)).float()
            feats = {name: features.reduce(captured[name], s["mode"]).to(torch.float16).numpy()
                     for name, s in specs.items()}
        return Batch(ids, view, None, logits, feats, np.repeat(rows.y[start:stop], views), view == 0)


class TokenInputs:
    """Blocks of tokens for a causal language model (a Hugging Face `...ForCausalLM`)."""

    modality = "text"

    def __init__(self, prepared: Path, splits: list[str], cfg: LabelConfig):
        from pipeline.prepared import tokens as text

        if cfg.views:
            raise ConfigError(f"label.views: {cfg.views}; augmented views are for images, text has none (set 0)")
        self.text = text
        self.infos = {s: text.split_info(prepared / f"{s}.parquet") for s in splits}
        self.block_size = self.infos["labeled"]["block_size"]
        self.input_shape = [self.block_size]
        self.per_sample = self.block_size - 1
        self.cfg = cfg

    def samples(self, split: str) -> int:
        return self.infos[split]["rows"]

    def header(self) -> dict[str, Any]:
        info = self.infos["labeled"]
        return {"input_shape": self.input_shape,
                "text": {"objective": "causal", "block_size": self.block_size, "positions": self.per_sample,
                         "vocab_size": info["vocab_size"], "tokenizer_sha256": info["tokenizer_sha256"]}}

    def probe(self) -> torch.Tensor:
        return torch.zeros(1, self.block_size, dtype=torch.long)

    def logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return next_token_logits(model, tokens)

    def read(self, source: Path, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """ids and tokens of blocks [first, last), reading only the row groups that hold them."""
        return self.text.read_rows(source, first, last)

    def batch(self, model: nn.Module, rows: tuple[np.ndarray, np.ndarray], start: int, stop: int,
              specs: dict[str, dict]) -> Batch:
        ids, tokens = rows[0][start:stop], torch.from_numpy(rows[1][start:stop])
        n, positions = len(ids), self.per_sample
        with torch.no_grad(), features.tap(model, list(specs)) as captured:
            logits = self.logits(model, tokens).float()
            feats = {name: _token_rows(captured[name]).to(torch.float16).numpy() for name in specs}
        truth = tokens[:, 1:].reshape(-1).numpy()
        return Batch(np.repeat(ids, positions), np.zeros(n * positions, dtype=np.int32),
                     np.tile(np.arange(positions, dtype=np.int32), n), logits, feats, truth,
                     np.ones(n * positions, dtype=bool))


class MaskedTokenInputs(TokenInputs):
    """Blocks of tokens for a masked language model (a Hugging Face `...ForMaskedLM`): per block,
    `label.views` + 1 maskings of M positions, one cache row per masked position."""

    def __init__(self, prepared: Path, splits: list[str], cfg: LabelConfig):
        from pipeline import lm

        super().__init__(prepared, splits, dataclass_replace(cfg, views=0))
        self.cfg, self.lm = cfg, lm
        self.masked = lm.mask_count(self.block_size)
        self.per_sample = (cfg.views + 1) * self.masked
        self.special = self.text.load_tokenizer(prepared)[1]

    def header(self) -> dict[str, Any]:
        header = super().header()
        header["text"] |= {"objective": "masked", "positions": self.masked,
                           "mask_recipe": {"name": "bert", "mask": self.lm.MASK_AS_MASK,
                                           "random": self.lm.MASK_AS_RANDOM, "seed": self.cfg.view_seed}}
        return header

    def logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[:, 0]

    def batch(self, model: nn.Module, rows: tuple[np.ndarray, np.ndarray], start: int, stop: int,
              specs: dict[str, dict]) -> Batch:
        views, m = self.cfg.views + 1, self.masked
        ids = np.repeat(rows[0][start:stop], views)
        view = np.tile(np.arange(views, dtype=np.int32), stop - start)
        blocks = torch.from_numpy(rows[1][start:stop]).repeat_interleave(views, dim=0)
        positions, seen = self.lm.fixed_masks(blocks, ids, view, m, self.special, self.infos["labeled"]["vocab_size"],
                                              self.cfg.view_seed)
        inputs = self.lm.apply_masks(blocks, positions, seen)
        at = (torch.arange(len(blocks))[:, None], positions)  # (B, M) index: the masked rows
        with torch.no_grad(), features.tap(model, list(specs)) as captured:
            logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits[at].float()
            feats = {name: _hidden(captured[name])[at].reshape(len(blocks) * m, -1).to(torch.float16).numpy()
                     for name in specs}
        return Batch(np.repeat(ids, m), np.repeat(view, m), positions.reshape(-1).numpy().astype(np.int32),
                     logits.reshape(len(blocks) * m, -1), feats, blocks.gather(1, positions).reshape(-1).numpy(),
                     np.repeat(view == 0, m), input_token=seen.reshape(-1).numpy().astype(np.int32))


def next_token_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits for blocks (B, L) as cache rows (B * (L - 1), V): every position
    but the last, which predicts nothing inside the block."""
    return _token_rows(model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits)  # full blocks


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """A layer's hidden states (B, L, H) from its output (a tensor, or a tuple starting with it)."""
    return output[0] if isinstance(output, tuple) else output


def _token_rows(output: torch.Tensor | tuple) -> torch.Tensor:
    # a layer's output (B, L, H) -> (B * (L - 1), H): one row per predicted token
    hidden = _hidden(output)
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


def inputs_for(prepared: Path, splits: list[str], cfg: LabelConfig, objective: str | None = None):
    """ImageInputs, TokenInputs or MaskedTokenInputs, from what `kd prepare` wrote and the
    teacher's objective ("causal" or "masked", for text)."""
    from pipeline.prepared import tokens as text

    if text.modality(prepared / "labeled.parquet") == "text":
        return MaskedTokenInputs(prepared, splits, cfg) if objective == "masked" else TokenInputs(prepared, splits, cfg)
    return ImageInputs(prepared, splits, cfg)
