"""Training and scoring a language model on token blocks, and `kd teacher` on text.

What depends on the objective is one entry of `OBJECTIVES`: the inputs and labels of a batch
(causal: each position predicts the next token; masked: BERT's masking, `kd.masking`), the
logits of the predicted positions, the score (perplexity; masked-token accuracy) and what a
teacher's metrics.json adds. `fit` trains a model on blocks (AdamW, one-cycle schedule, batches a
pure function of (seed, epoch), as `training.fit`); `evaluate` gives its loss and its score;
`train_teacher` is `kd teacher` on text data: a model of either objective, written as a Hugging
Face directory (`lm.save`) with `training.json` and `metrics.json`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from kd import lm, masking
from kd.config import TeacherConfig, as_dict
from kd.errors import ConfigError, InputError
from kd.files import write_json
from kd.prepared import tokens
from kd.prepared.tokens import SpecialIds
from kd.speed import count_params
from kd.training import autocast

CLIP_NORM = 1.0  # gradient-norm clipping, as Hugging Face's Trainer does by default


@dataclass(frozen=True)
class Objective:
    """What training and scoring a language model asks of its objective."""

    # (blocks (B, L), special ids, vocab_size, generator) -> (inputs (B, L), labels (B, L), -100 where not predicted)
    inputs: Callable[[torch.Tensor, SpecialIds, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    # (model, inputs (B, L), keep (B, L) bool: the predicted positions) -> logits (P, V)
    logits: Callable[[PreTrainedModel, torch.Tensor, torch.Tensor], torch.Tensor]
    # (mean loss, accuracy) per predicted token -> the score `evaluate` adds
    score: Callable[[float, float], dict[str, float]]
    # (scores, labeled blocks, test blocks, vocab_size, their predicted positions) -> a teacher's metrics
    teacher_scores: Callable[..., dict[str, float]]


# --- causal: each position predicts the next token ------------------------------------------


def next_token_labels(tokens: torch.Tensor, special: SpecialIds, vocab_size: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (B, L) -> (inputs (B, L), labels (B, L)): position t predicts token t + 1, the
    last predicts nothing (-100)."""
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    return tokens, labels


def position_logits(model: PreTrainedModel, inputs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits (P, V) of the predicted positions (`keep`, (B, L))."""
    return model(input_ids=inputs).logits[keep]


def perplexity(loss: float, accuracy: float) -> dict[str, float]:
    return {"perplexity": math.exp(loss)}


def causal_teacher_scores(scores: dict[str, float], train: np.ndarray, test: np.ndarray, vocab_size: int,
                          train_predicted: torch.Tensor | None = None, test_predicted: torch.Tensor | None = None
                          ) -> dict[str, float]:
    """What a causal teacher's metrics.json adds: its test perplexity and a unigram model's."""
    return {"perplexity": scores["perplexity"],
            "unigram_perplexity": unigram_perplexity(train, test, vocab_size, train_predicted, test_predicted)}


def unigram_perplexity(train: np.ndarray, test: np.ndarray, vocab_size: int,
                       train_predicted: torch.Tensor | None = None, test_predicted: torch.Tensor | None = None
                       ) -> float:
    """Perplexity on the tokens a causal LM predicts in test (test[:, 1:], or its predicted
    response tokens) of the frequencies of those of the labeled split, add-one smoothed: the
    bar a model that ignores context would reach."""
    seen = train.reshape(-1) if train_predicted is None else train[:, 1:][train_predicted.numpy()]
    counts = np.bincount(seen, minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    scored = test[:, 1:].reshape(-1) if test_predicted is None else test[:, 1:][test_predicted.numpy()]
    return float(np.exp(-log_p[scored].mean()))


# --- masked: BERT's masking -------------------------------------------------------------------


def masked_logits(model: PreTrainedModel, inputs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits (P, V) of the masked positions (`keep`, (B, L)); a BERT's head runs on those only,
    a fraction of its cost, which dominates at a small width and a large vocabulary."""
    if not hasattr(model, "cls"):  # another masked LM: the whole head
        return model(input_ids=inputs).logits[keep]
    states = model.base_model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).last_hidden_state
    return model.cls(states[keep])


def masked_accuracy(loss: float, accuracy: float) -> dict[str, float]:
    return {"masked_accuracy": accuracy}


def masked_teacher_scores(scores: dict[str, float], train: np.ndarray, test: np.ndarray, vocab_size: int,
                          *predicted: Any) -> dict[str, float]:
    """What a masked teacher's metrics.json adds: its masked-token accuracy on the test split."""
    return {"masked_accuracy": scores["masked_accuracy"]}


# Objective (`lm.objective`: causal or masked) -> how a model of it learns and is scored.
OBJECTIVES: dict[str, Objective] = {
    "causal": Objective(next_token_labels, position_logits, perplexity, causal_teacher_scores),
    "masked": Objective(masking.mask_tokens, masked_logits, masked_accuracy, masked_teacher_scores),
}


# --- training and evaluation ------------------------------------------------------------------


def token_losses(model: PreTrainedModel, inputs: torch.Tensor, labels: torch.Tensor,
                 precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per predicted token: (cross-entropy (P,), the model's argmax (P,), the target (P,)).

    The objective gives the logits of the predicted positions (a BERT's head runs on the masked
    ones only: the same numbers, a fraction of the head's cost), under bfloat16 autocast with
    `precision: bf16-mixed`; the cross-entropy is float32 whatever the precision."""
    keep = labels != -100
    with autocast(precision, lm.device_of(model)):
        logits = OBJECTIVES[lm.objective(model)].logits(model, inputs, keep)  # (P, V)
    logits = logits.float()  # a no-op in fp32
    targets = labels[keep]
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1), targets


def fit(model: PreTrainedModel, tokens: torch.Tensor, special: SpecialIds, *, epochs: int, batch_size: int,
        lr: float, weight_decay: float, seed: int, desc: str = "lm", progress: bool = True,
        predicted: torch.Tensor | None = None, precision: str = "fp32") -> list[dict[str, float]]:
    """Train on blocks (N, L) in place; the per-epoch log (mean loss per predicted token).
    `predicted` (N, L - 1) bool: the only positions taught (instruction data's responses);
    `precision` as `training.fit`'s."""
    objective = OBJECTIVES[lm.objective(model)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    steps = epochs * math.ceil(len(tokens) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    log: list[dict[str, float]] = []
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    for epoch in range(epochs):
        model.train()
        started = time.perf_counter()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # the order and the masks
        total, count = 0.0, 0
        for rows in torch.randperm(len(tokens), generator=g).split(batch_size):
            inputs, labels = objective.inputs(tokens[rows], special, model.config.vocab_size, g)
            losses, _, _ = token_losses(model, inputs, only(labels, None if predicted is None else predicted[rows]),
                                        precision)
            if not len(losses):  # a masked batch with nothing chosen
                continue
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(losses)
            count += len(losses)
            bar.update(1)
        log.append({"epoch": epoch + 1, "loss": total / max(count, 1), "lr": schedule.get_last_lr()[0],
                    "seconds": time.perf_counter() - started})
        bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
    bar.close()
    model.eval()
    return log


def only(labels: torch.Tensor, predicted: torch.Tensor | None) -> torch.Tensor:
    """Causal labels (B, L) kept where `predicted` (B, L - 1) says (all: None), -100 elsewhere."""
    if predicted is None:
        return labels
    labels = labels.clone()
    labels[:, :-1][~predicted] = -100
    return labels


def evaluate(model: PreTrainedModel, tokens: torch.Tensor, special: SpecialIds, batch_size: int,
             seed: int, predicted: torch.Tensor | None = None) -> dict[str, float]:
    """The loss per predicted token and the objective's score of it (causal: perplexity; masked:
    accuracy on the masked tokens, the masks drawn from `seed`: the same masks every run);
    `predicted` as in `fit`."""
    objective = OBJECTIVES[lm.objective(model)]
    # every mask drawn at once: the same masks whatever the batch size
    inputs, labels = objective.inputs(tokens, special, model.config.vocab_size, torch.Generator().manual_seed(seed))
    labels = only(labels, predicted)
    model.eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for rows in torch.arange(len(tokens)).split(batch_size):
            losses, predicted, targets = token_losses(model, inputs[rows], labels[rows])
            total += float(losses.sum())
            correct += int((predicted == targets).sum())
            count += len(losses)
    if count == 0:
        raise InputError("no token to evaluate on (an empty split?)")
    loss = total / count
    return {"loss": loss, **objective.score(loss, correct / count)}


def fit_teacher(cfg: TeacherConfig, prepared: Path, *,
                progress: bool = True) -> tuple[PreTrainedModel, dict[str, Any], dict[str, Any]]:
    """The teacher on the labeled blocks: (model, provenance to save beside it, test metrics).

    `cfg.shift` (an image augmentation) does not apply to text.
    """
    _, train = tokens.read_blocks(prepared / "labeled.parquet")
    _, test = tokens.read_blocks(prepared / "test.parquet")
    info = tokens.split_info(prepared / "labeled.parquet")
    _, special = tokens.load_tokenizer(prepared)
    torch.manual_seed(cfg.seed)
    model = lm.checkpointing(lm.build(cfg.arch, cfg.arch_kwargs, info["vocab_size"], info["block_size"], special),
                             cfg.gradient_checkpointing)
    if info["response_only"] and lm.objective(model) != "causal":
        raise ConfigError(f"teacher.arch: {cfg.arch} is a masked LM; instruction data ({prepared}: responses only) "
                          "is for causal LMs")
    masks = {split: tokens.predicted(prepared / f"{split}.parquet") for split in ("labeled", "test")}
    masks = {split: None if m is None else torch.from_numpy(m) for split, m in masks.items()}
    log = fit(model, torch.from_numpy(train), special, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, desc="teacher", progress=progress,
              predicted=masks["labeled"], precision=cfg.precision)
    scores = evaluate(model, torch.from_numpy(test), special, cfg.batch_size, seed=cfg.seed, predicted=masks["test"])
    kind = lm.objective(model)
    metrics = {"objective": kind, "test_loss": scores["loss"], "train_loss": log[-1]["loss"], "epochs": len(log),
               "params": count_params(model), "train_tokens": int(train.size), "test_tokens": int(test.size)}
    metrics |= OBJECTIVES[kind].teacher_scores(scores, train, test, info["vocab_size"], masks["labeled"], masks["test"])
    provenance = {"arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "objective": kind, "training": as_dict(cfg),
                  "data": {k: info[k] for k in ("dataset", "block_size", "vocab_size", "tokenizer_sha256")}}
    return model, provenance, metrics


def train_teacher(cfg: TeacherConfig, prepared: Path, out: Path, *, progress: bool = True) -> str:
    """`kd teacher` on text: a Hugging Face language model (`fit_teacher`) written into `out`
    with its tokenizer, `training.json` (where it came from) and `metrics.json`; its score."""
    model, provenance, scores = fit_teacher(cfg, prepared, progress=progress)
    lm.save(out, model, prepared)
    write_json(out / "training.json", provenance)
    write_json(out / "metrics.json", scores)
    return (f"test perplexity {scores['perplexity']:.2f} (unigram {scores['unigram_perplexity']:.1f})"
            if "perplexity" in scores else f"test masked-token accuracy {scores['masked_accuracy']:.4f}")
