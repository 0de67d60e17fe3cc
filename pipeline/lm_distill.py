"""Causal language-model students from a per-token cache (never the teacher).

A block of L tokens has L - 1 cache rows, one per predicted token, sample-major. `TokenRows`
wraps a Hugging Face causal LM so that the training loop sees what it sees for images: a
batch of blocks in, one row of logits per predicted token out, lined up with the cache rows
that `TokenSet` serves. So `training.fit` and the loss terms of `distill` (soft targets,
hard labels) run unchanged. The hard label of a row is the true next token: text is its own
label, on every split. The baseline twin is the same student trained on the same blocks with
the next-token loss alone and the same budget ("the text alone").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import lm, metrics, parallel, text
from pipeline.cache import Cache
from pipeline.cache.inputs import next_token_logits
from pipeline.config import EvalConfig, StudentConfig, as_dict
from pipeline.distill import Built, Shapes, student_terms
from pipeline.errors import ConfigError, StaleCacheError
from pipeline.files import staging_dir, swap_into_place, write_json
from pipeline.loader import needed_temperatures
from pipeline.models import count_params
from pipeline.training import fit, hard_label_loss, write_log

STUDENT_RECORD = "student.json"


class TokenRows(nn.Module):
    """A causal LM seen row by row: blocks (B, L) -> logits (B * (L - 1), V), the last position
    dropped (it predicts nothing inside the block)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return next_token_logits(self.model, tokens)


@dataclass
class TokenSet:
    """Blocks in memory with their cache rows: tokens (N, L); targets hold one row per
    predicted token, N * (L - 1) rows."""

    tokens: torch.Tensor
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.tokens)

    def batches(self, epoch: int, batch_size: int, seed: int, views: str = "none",
                shard: tuple[int, int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled batches of whole blocks, seeded by (seed, epoch), with all their rows."""
        if shard is not None:
            raise ConfigError("text students train in one process (torchrun is for image students so far)")
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        positions = self.tokens.shape[1] - 1
        for blocks in torch.randperm(len(self.tokens), generator=g).split(batch_size):
            rows = (blocks[:, None] * positions + torch.arange(positions)).reshape(-1)
            yield {"x": self.tokens[blocks], **{name: t[rows] for name, t in self.targets.items()}}


def token_set(cache: Cache, prepared: Path, cfg: StudentConfig) -> TokenSet:
    """The student's transfer blocks with the cached top-k, lse and next tokens per row."""
    tokens, targets = [], {}
    temperatures = needed_temperatures(cfg)
    for split in cfg.transfer:
        ids, blocks = text.read_blocks(prepared / f"{split}.parquet")
        soft = cache.soft_targets(split, temperatures)
        if not np.array_equal(soft.ids[::cache.views], ids):
            raise StaleCacheError(f"{cache.root}: ids of split {split} differ from {prepared / split}.parquet; "
                                  "run `kd label` again")
        part = {"topk_idx": torch.tensor(soft.topk_idx, dtype=torch.long),
                "topk_logit": torch.tensor(soft.topk_logit, dtype=torch.float32),
                "label": torch.from_numpy(_labels(cfg, blocks, soft.topk_idx))}
        if cfg.loss.soft is not None:
            part["lse"] = torch.tensor(soft.lse[float(cfg.loss.soft.temperature)])
        tokens.append(torch.from_numpy(blocks))
        for name, value in part.items():
            targets.setdefault(name, []).append(value)
    return TokenSet(torch.cat(tokens), {name: torch.cat(parts) for name, parts in targets.items()})


def _labels(cfg: StudentConfig, blocks: np.ndarray, topk_idx: np.ndarray) -> np.ndarray:
    """Per row: the true next token (`hard.labels`), the teacher's argmax (`hard.pseudo`), or -1."""
    hard = cfg.loss.hard
    if hard is not None and hard.labels:
        return np.ascontiguousarray(blocks[:, 1:].reshape(-1))
    if hard is not None and hard.pseudo:
        return topk_idx[:, 0].astype(np.int64)
    return np.full(len(topk_idx), -1, dtype=np.int64)


def train_text_student(cfg: StudentConfig, cache: Cache, prepared: Path, out: Path, *,
                       progress: bool = True) -> dict[str, Any]:
    """Train causal student `cfg.name` and its twin into `out` (HF directories: the student at
    the top, the twin in `baseline/`). Returns a summary."""
    _refuse(cfg, cache)
    cache.require(temperatures=needed_temperatures(cfg), who=f"student {cfg.name!r}")
    cache.check(prepared, cfg.transfer)
    dataset = token_set(cache, prepared, cfg)
    info = cache.manifest["text"]
    _, special = text.load_tokenizer(prepared)
    built = student_terms(cfg, Shapes({}, {}))
    student, log = _train(cfg, dataset, built, info, special, f"distill {cfg.name}", progress)
    twin_set = dataclasses.replace(dataset, targets={"label": torch.from_numpy(
        np.ascontiguousarray(dataset.tokens[:, 1:].reshape(-1).numpy()))})
    twin, twin_log = _train(cfg, twin_set, Built({"hard": (1.0, hard_label_loss)}), info, special,
                            f"baseline {cfg.name}", progress)
    record = {"student": as_dict(cfg), "teacher_fingerprint": cache.manifest["teacher"]["fingerprint"],
              "cache": str(cache.root), "objective": "causal"}
    staging = staging_dir(out)
    for directory, model, train_log, what in ((staging, student, log, record),
                                              (staging / "baseline", twin, twin_log, {**record, "student": None,
                                                                                      "baseline_of": as_dict(cfg)})):
        lm.save(directory, model, prepared / text.TOKENIZER_FILE)
        write_json(directory / STUDENT_RECORD, what)
        write_log(directory / "train_log.csv", train_log)
    swap_into_place(staging, out)
    return {"final": log[-1], "baseline_final": twin_log[-1], "epochs": len(log)}


def _refuse(cfg: StudentConfig, cache: Cache) -> None:
    """What a text student cannot do yet, said up front."""
    if cache.manifest["text"]["objective"] != "causal":
        raise ConfigError(f"{cfg.where}: the cache is not a causal LM's; text students are causal for now")
    if lm.ARCHITECTURES.get(cfg.arch, (None, None))[1] is not lm.ARCHITECTURES["gpt2"][1]:
        raise ConfigError(f"{cfg.where}.arch: {cfg.arch!r}; a student of a causal LM cache must be gpt2")
    extra = [f.name for f in dataclasses.fields(cfg.loss) if f.name not in ("soft", "hard")
             and getattr(cfg.loss, f.name) is not None]
    if extra:
        raise ConfigError(f"{cfg.where}.loss: {', '.join(extra)} not supported for text students yet (soft, hard)")
    for key, value in (("repeats", cfg.repeats != 1), ("views", cfg.views), ("assistant", cfg.assistant)):
        if value:
            raise ConfigError(f"{cfg.where}.{key}: not supported for text students yet")
    if parallel.world()[1] > 1:
        raise ConfigError("text students train in one process (torchrun is for image students so far)")


def _train(cfg: StudentConfig, dataset: TokenSet, built: Built, info: dict[str, Any], special: text.SpecialIds,
           desc: str, progress: bool) -> tuple[nn.Module, list[dict[str, float]]]:
    torch.manual_seed(cfg.seed)  # the student and its twin start from the same weights
    model = lm.build(cfg.arch, cfg.arch_kwargs, info["vocab_size"], info["block_size"], special, where=cfg.where)
    log = fit(TokenRows(model), dataset, built.terms, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, desc=desc, progress=progress)
    return model, log


# --- evaluation -------------------------------------------------------------------------------


def evaluate_text(student_dir: Path, cache: Cache, prepared: Path, cfg: EvalConfig) -> dict[str, Any]:
    """Test perplexity of the student and its twin, and against the cached teacher: top-1
    agreement, KL at T=1 (top-k plus a tail bucket: a lower bound when k < V), speed and size.
    Returns the metrics and, under "plots", the per-position table (mean loss of the student
    and its twin at each position of a block: how each uses its context)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    student, twin = TokenRows(lm.load(student_dir)), TokenRows(lm.load(student_dir / "baseline"))
    _, blocks = text.read_blocks(prepared / "test.parquet")
    tokens = torch.from_numpy(blocks)
    targets = tokens[:, 1:].reshape(-1)
    logits = _logits(student, tokens, cfg.batch_size)
    losses = {"student": F.cross_entropy(logits, targets, reduction="none"),
              "baseline": F.cross_entropy(_logits(twin, tokens, cfg.batch_size), targets, reduction="none")}
    soft = cache.soft_targets("test", [1.0])
    kl, exact = metrics.kl_to_teacher(logits, torch.tensor(soft.topk_idx, dtype=torch.long),
                                      torch.tensor(soft.topk_logit, dtype=torch.float32), torch.tensor(soft.lse[1.0]))
    teacher = cache.manifest["teacher"]["config"]
    models = [student]
    if "hf_config" in teacher:  # a random-weight copy of the teacher: weights do not change its speed
        models.append(TokenRows(AutoModelForCausalLM.from_config(AutoConfig.for_model(**teacher["hf_config"]))))
    with metrics.torch_threads(cfg.threads):
        blocks_per_s = metrics.throughputs(models, tokens[:cfg.batch_size], cfg.throughput_runs)
    perplexity, twin_perplexity = (math.exp(float(losses[k].mean())) for k in ("student", "baseline"))
    per_position = {k: v.reshape(len(tokens), -1).mean(0).tolist() for k, v in losses.items()}
    return {
        "objective": "causal",
        "perplexity": perplexity, "baseline_perplexity": twin_perplexity,
        "teacher_perplexity": teacher.get("metrics", {}).get("perplexity"),
        "perplexity_gain": twin_perplexity - perplexity,
        "perplexity_reduction": 1 - perplexity / twin_perplexity,
        "agreement": metrics.agreement(logits.argmax(1).numpy(), soft.topk_idx[:, 0]),
        "kl_to_teacher": kl, "kl_exact": exact,
        "kept_mass_t1": cache.manifest["fidelity"]["test"].get("t1", {}).get("kept_mass"),
        "top_k": cache.manifest["top_k"],
        "params": count_params(student), "teacher_params": teacher.get("params"),
        "size_bytes": (student_dir / lm.WEIGHTS).stat().st_size,
        "throughput_tokens_per_s": blocks_per_s[0] * tokens.shape[1],
        "speedup_vs_teacher": blocks_per_s[0] / blocks_per_s[1] if len(blocks_per_s) > 1 else None,
        "test_tokens": len(targets),
        "plots": {"per_position.csv": (["position", "student", "baseline"],
                                       [{"position": i + 1, "student": a, "baseline": b}
                                        for i, (a, b) in enumerate(zip(per_position["student"],
                                                                       per_position["baseline"]))])},
    }


def _logits(rows: TokenRows, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """One row of logits per predicted token of every block, in batches of blocks."""
    rows.eval()
    with torch.no_grad():
        return torch.cat([rows(chunk) for chunk in tokens.split(batch_size)])
