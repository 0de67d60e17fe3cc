"""Masked language modelling (DistilBERT): a student predicts the masked tokens of a block.

Inputs: per block, `label.views` + 1 maskings of M positions (BERT's 15%), one cache row per
masked position; the rows record the masking (`position`, and `input_token`: what the
teacher saw there), so a student sees the same masks. `MaskedRows` wraps a BERT so that a
batch of masked blocks gives one row of logits per masked token, lined up with the cache rows
of its `masked_set` (`views: true` draws among the cached maskings every epoch). Its
`hidden.N` layers are hidden state N at the masked positions, for the `cosine` method against a
cached teacher layer. The student is any transformers model_type with a masked LM head; with
`init: teacher` it starts from the teacher's embeddings, head and one layer in every N_t / N_s
(the copy `label.keep_teacher` put in the cache), with `init: DIR` from a pretrained one. The
true label of a row is the original token; the twin is the same student, same start and same
masks, with the masked-LM loss alone. Scored by masked-token accuracy on the test maskings.
"""

from __future__ import annotations

import functools
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd import features, lm, lm_training, loader, masking
from kd.cache import Cache
from kd.cache.batch import Batch
from kd.config import EvalConfig, LabelConfig, StudentConfig
from kd.errors import ConfigError
from kd.methods import student_layers, supported
from kd.prepared import data_fingerprint, tokens
from kd.tasks import causal_lm, lm_common
from kd.tasks.lm_common import (
    build_model,
    check_token_student,
    check_tokenizer,
    evaluate_rows,
    init_identity,
    token_summary,
)

NAME, OBJECTIVE = "masked_lm", "masked"
TWIN_LOSS = "masked-LM"  # what the baseline twin learns from, for messages

# Members of the task that both token tasks share: a student is a Hugging Face directory plus
# student.json (`lm_common.save`; `load`: not an assistant so far); the teacher, of either
# objective, is trained by `lm_training` and loaded by `lm`.
load, save = lm_common.load, lm_common.save
train_teacher, load_teacher = lm_training.train_teacher, lm.load_teacher


# Cache columns between `view` and the soft targets: the masked position and the token the
# teacher saw there ([MASK], a random token or itself).
ROW_COLUMNS: tuple[str, ...] = ("position", "input_token")


class Inputs(causal_lm.Inputs):
    """Blocks of tokens for a masked language model (a Hugging Face `...ForMaskedLM`): per block,
    `label.views` + 1 maskings of M positions, one cache row per masked position."""

    row_columns = ROW_COLUMNS

    def __init__(self, prepared: Path, splits: list[str], cfg: LabelConfig):
        super().__init__(prepared, splits, dataclass_replace(cfg, views=0))
        if self.response_only:
            raise ConfigError(f"{prepared}: instruction data (responses only) is for causal LMs; the teacher is a "
                              "masked LM")
        self.cfg = cfg
        self.masked_count = masking.mask_count(self.block_size)
        self.per_sample = (cfg.views + 1) * self.masked_count
        self.special = tokens.load_tokenizer(prepared)[1]
        masking.mask_id(self.special, str(prepared))

    def header(self) -> dict[str, Any]:
        header = super().header()
        header["text"] |= {"objective": OBJECTIVE, "positions": self.masked_count,
                           "mask_recipe": {"name": "bert", "mask": masking.MASK_AS_MASK,
                                           "random": masking.MASK_AS_RANDOM, "seed": self.cfg.view_seed}}
        return header

    def teacher_scores(self, model: nn.Module) -> dict[str, float]:
        return {}  # a masked LM answers no prompts

    def logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(lm.device_of(model))
        return model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[:, 0]

    def batch(self, model: nn.Module, rows: tuple[np.ndarray, np.ndarray], start: int, stop: int,
              specs: dict[str, dict]) -> Batch:
        views, m = self.cfg.views + 1, self.masked_count
        ids = np.repeat(rows[0][start:stop], views)
        view = np.tile(np.arange(views, dtype=np.int32), stop - start)
        blocks = torch.from_numpy(rows[1][start:stop]).repeat_interleave(views, dim=0)
        positions, seen = masking.fixed_masks(blocks, ids, view, m, self.special, self.infos["labeled"]["vocab_size"],
                                              self.cfg.view_seed)
        device = lm.device_of(model)
        inputs = masking.apply_masks(blocks, positions, seen).to(device)
        at = (torch.arange(len(blocks), device=device)[:, None], positions.to(device))  # (B, M): the masked rows
        with torch.no_grad(), features.tap(model, list(specs)) as captured:
            logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits[at].float().cpu()
            feats = {name: lm.hidden(captured[name])[at].reshape(len(blocks) * m, -1).to(torch.float16).cpu().numpy()
                     for name in specs}
        return Batch(np.repeat(ids, m), np.repeat(view, m), positions.reshape(-1).numpy().astype(np.int32),
                     logits.reshape(len(blocks) * m, -1), feats, blocks.gather(1, positions).reshape(-1).numpy(),
                     np.repeat(view == 0, m), input_token=seen.reshape(-1).numpy().astype(np.int32))


class MaskedRows(nn.Module):
    """A masked LM seen row by row: x (B, L + M), the masked blocks and their M masked positions
    -> logits (B * M, V), one row per masked token in cache order. The MLM head runs on the
    masked positions only. `hidden.N` pass hidden state N (0 = the embeddings) at the masked
    positions, (B * M, H), for methods that tap a student layer. In training a BERT is a
    `training.HiddenRows`, as `next_token.TokenRows` is."""

    def __init__(self, model: nn.Module, block_size: int, layers: list[int] = ()):
        super().__init__()
        self.model, self.block_size = model, block_size
        self.hidden = nn.ModuleDict({str(n): nn.Identity() for n in layers})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.cls(self._states(x))

    def hidden_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows' states (B * M, H) just before the head's output layer (BERT's
        `cls.predictions.transform`), so that the loss never holds the logits (`kd.head`)."""
        return self.model.cls.predictions.transform(self._states(x))

    def _states(self, x: torch.Tensor) -> torch.Tensor:
        # the last hidden state at the masked positions (B * M, H); the tapped layers' pass through
        tokens, positions = x[:, :self.block_size], x[:, self.block_size:]
        at = (torch.arange(len(x))[:, None], positions)
        out = self.model.base_model(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                                    output_hidden_states=len(self.hidden) > 0)
        for n, identity in self.hidden.items():
            identity(out.hidden_states[int(n)][at].flatten(0, 1))
        return out.last_hidden_state[at].flatten(0, 1)

    def output_layer(self) -> nn.Linear | None:
        """BERT's `cls.predictions.decoder` (`forward`'s logits are it on `hidden_rows`); None for
        a head of another shape, which then trains on its logits."""
        predictions = getattr(self.model.cls, "predictions", None)
        decoder = getattr(predictions, "decoder", None)
        return decoder if isinstance(decoder, nn.Linear) and hasattr(predictions, "transform") else None


def masked_set(tokens: torch.Tensor, ids: np.ndarray, positions: torch.Tensor, seen: torch.Tensor,
               targets: dict[str, torch.Tensor]) -> loader.SampleSet:
    """Blocks (N, L) with their cached maskings, positions and seen (N, V, M): the masked
    positions of each of V maskings and the token the teacher saw there; one row per masked
    token, N * V * M in cache order. A block seen in masking v is `MaskedRows`' input: the
    block masked as in v, then its masked positions."""

    def model_input(inputs: dict[str, torch.Tensor], ids: np.ndarray, view: torch.Tensor) -> torch.Tensor:
        at = torch.arange(len(view))
        positions = inputs["positions"][at, view]
        return torch.cat([masking.apply_masks(inputs["tokens"], positions, inputs["seen"][at, view]), positions], 1)

    return loader.SampleSet({"tokens": tokens, "positions": positions, "seen": seen}, ids, targets, model_input,
                            views=positions.shape[1], per_view=positions.shape[2])


# --- training ---------------------------------------------------------------------------------


def check(cfg: StudentConfig, cache: Cache, prepared: Path) -> None:
    """What a masked student cannot do yet, said up front."""
    check_tokenizer(cache, prepared, cfg.transfer)
    if cfg.views and cache.manifest["views"]["count"] == 0:
        raise ConfigError(f"{cfg.where}.views: the cache holds one masking per block; set label.views (e.g. 4) "
                          "and run `kd label` again")
    check_token_student(cfg, cache, prepared, OBJECTIVE, supported(NAME), [("assistant", cfg.assistant)])
    for layer in student_layers(cfg):
        if not (layer.startswith("hidden.") and layer.removeprefix("hidden.").isdigit()):
            raise ConfigError(f"{cfg.where}.loss: student_layer {layer!r}; a masked LM student's layers are "
                              "hidden.N (hidden state N at the masked positions, 0 = the embeddings)")


def rows(cache: Cache, prepared: Path, cfg: StudentConfig, memory_mb: float) -> loader.SampleSet | loader.StreamingSet:
    """The student's transfer blocks with their cached maskings, top-k, lse, true tokens and the
    teacher layers the loss needs: in memory if they fit `memory_mb`, else streamed."""
    maskings = cache.manifest["views"]["count"] + 1
    masked, block = cache.manifest["text"]["positions"], cache.manifest["text"]["block_size"]
    return loader.transfer_set(cache, cfg, functools.partial(_split_rows, cache, prepared, cfg),
                               8 * (block + 2 * maskings * masked), memory_mb)


def _split_rows(cache: Cache, prepared: Path, cfg: StudentConfig, split: str, row_offset: int,
                parts: list[int] | None = None, cached: bool = True) -> loader.SampleSet:
    """One split's blocks (or those of some cache parts) with their maskings and rows: the
    cached targets, or with `cached` False the original tokens alone (a twin's)."""
    source = prepared / f"{split}.parquet"
    ids, blocks = tokens.read_rows(source, *loader.sample_range(cache, split, parts))
    position, seen = cache.masks(split, parts)
    shape = (len(ids), cache.manifest["views"]["count"] + 1, cache.manifest["text"]["positions"])
    long_blocks = torch.from_numpy(blocks).long()
    positions = torch.tensor(position, dtype=torch.long).reshape(shape)
    truth = long_blocks.gather(1, positions.reshape(len(ids), -1)).reshape(-1)
    targets = (loader.read_rows(cache, cfg, split, source, ids, truth.numpy(), parts=parts,
                                row_offset=row_offset).targets(cfg) if cached else {"label": truth})
    return masked_set(long_blocks, ids, positions, torch.tensor(seen, dtype=torch.long).reshape(shape), targets)


def twin_rows(cache: Cache, prepared: Path, cfg: StudentConfig, transfer: Any) -> loader.SampleSet:
    """The same blocks and masks with their original tokens alone (in memory)."""
    return loader.concat([_split_rows(cache, prepared, cfg, split, 0, cached=False) for split in cfg.transfer])


def twin_decided_by(cfg: StudentConfig, cache: Cache, prepared: Path) -> dict[str, Any]:
    """What decides a masked twin besides its budget and seed: the task, the transfer blocks, the
    cached masks it sees (and whether it draws among them) and its start."""
    return {"task": NAME, "data": {s: data_fingerprint(prepared / f"{s}.parquet") for s in cfg.transfer},
            "masks": {"count": cache.manifest["views"]["count"], "recipe": cache.manifest["text"]["mask_recipe"],
                      "positions": cache.manifest["text"]["positions"]},
            "views": cfg.views, "init": init_identity(cfg, cache)}


def build(cfg: StudentConfig, cache: Cache, prepared: Path) -> MaskedRows:
    """A fresh student (seed torch first), from the teacher's layers with `init: teacher`."""
    info = cache.manifest["text"]
    model = build_model(cfg, cache, prepared, OBJECTIVE)
    layers = [int(layer.removeprefix("hidden.")) for layer in student_layers(cfg)]
    for n in layers:
        if n > model.config.num_hidden_layers:
            raise ConfigError(f"{cfg.where}.loss: student_layer hidden.{n}; the student has "
                              f"{model.config.num_hidden_layers} layers "
                              f"(hidden.0 .. hidden.{model.config.num_hidden_layers})")
    return MaskedRows(lm.checkpointing(model, cfg.gradient_checkpointing), info["block_size"], layers)


def student_shapes(model: MaskedRows, cfg: StudentConfig, layers: list[str], cache: Cache) -> dict[str, list[int]]:
    """Every `hidden.N` is one vector of the student's width per masked token."""
    return {layer: [model.model.config.hidden_size] for layer in layers}


# --- evaluation -------------------------------------------------------------------------------


def evaluate(student_dir: Path, cache: Cache, prepared: Path, cfg: EvalConfig, spec: StudentConfig
             ) -> tuple[dict[str, Any], dict[str, tuple[list[str], list[dict[str, Any]]]]]:
    """Masked-token accuracy of the student, its twin and the teacher on every cached masking of
    the test split (the teacher's from its cached top-1, on the very same masked tokens), and
    against the cached teacher (`evaluate_rows`)."""
    maskings, masked = cache.manifest["views"]["count"] + 1, cache.manifest["text"]["positions"]
    _, blocks = tokens.read_blocks(prepared / "test.parquet")
    position, seen = cache.masks("test")
    per_masking = torch.from_numpy(blocks).long().repeat_interleave(maskings, 0)  # (N * maskings, L), cache order
    positions = torch.tensor(position, dtype=torch.long).reshape(len(per_masking), masked)
    x = torch.cat([masking.apply_masks(per_masking, positions, torch.tensor(seen).reshape(len(per_masking), masked)),
                   positions], 1)
    truth = per_masking.gather(1, positions).reshape(-1)

    def accuracy(logits: torch.Tensor, truth: torch.Tensor) -> float:
        return float((logits.argmax(1) == truth).float().mean())

    def keys(student: float, twin: float, losses: dict[str, torch.Tensor], soft: Any) -> dict[str, Any]:
        return {"masked_accuracy": student, "baseline_masked_accuracy": twin,
                "teacher_masked_accuracy": float((soft.topk_idx[:, 0] == truth.numpy()).mean()),
                "accuracy_gain_points": 100 * (student - twin),
                "loss": float(losses["student"].mean()), "baseline_loss": float(losses["baseline"].mean())}

    block = cache.manifest["text"]["block_size"]
    return evaluate_rows(student_dir, cache, cfg, lambda model: MaskedRows(model, block), x, truth,
                         positions.reshape(-1), accuracy, keys,
                         ("masked_accuracy", "accuracy_gain_points", lambda s, b: 100 * (s - b)))


def check_rows(path: str, table: Any, manifest: dict[str, Any], views: int) -> list[str]:
    """`kd cache verify`: per block, each masking's rows together, its masked positions ascending
    inside the block."""
    per_view, problems = manifest["text"]["positions"], []
    view = table["view"].to_numpy().reshape(-1, per_view)
    position = table["position"].to_numpy().reshape(-1, per_view)
    if not np.array_equal(view[:, 0], np.tile(np.arange(views // per_view), len(view) // (views // per_view))) \
            or (view != view[:, :1]).any():
        problems.append(f"{path}: view column out of order (expected each view's masked rows together)")
    if position.size and ((np.diff(position, axis=1) <= 0).any() or position.min() < 0
                          or position.max() >= manifest["text"]["block_size"]):
        problems.append(f"{path}: masked positions not ascending inside the block")
    return problems


def rows_description(summary: dict[str, Any]) -> str:
    """`kd cache info`: what one cache row is."""
    t, maskings = summary["text"], (summary.get("views") or {}).get("count", 0) + 1
    return (f"one per masked token: masked LM, blocks of {t['block_size']} tokens, {t['positions']} masked per "
            f"masking, {maskings} masking(s) per block, vocabulary {t['vocab_size']}")


def summary(name: str, m: dict[str, Any]) -> str:
    teacher = f"{m['teacher_masked_accuracy']:.4f}" if m["teacher_masked_accuracy"] is not None else "unknown"
    line = (f"masked-token accuracy {m['masked_accuracy']:.4f} (baseline twin {m['baseline_masked_accuracy']:.4f}, "
            f"teacher {teacher})")
    over = (f"accuracy {m['masked_accuracy_mean']:.4f} +- {m['masked_accuracy_std']:.4f}, "
            f"{m['accuracy_gain_points_mean']:+.2f} +- {m['accuracy_gain_points_std']:.2f} points over the twins")
    return token_summary(name, m, line, over)
