"""Language-model students from a per-token cache (never the teacher directory).

A block of L tokens has L - 1 cache rows, one per predicted token, sample-major. `TokenRows`
wraps a Hugging Face causal LM so that the training loop sees what it sees for images: a
batch of blocks in, one row of logits per predicted token out, lined up with the cache rows
that `TokenSet` serves. So `training.fit` and the loss terms of `distill` (soft targets,
hard labels) run unchanged. The hard label of a row is the true next token: text is its own
label, on every split. The baseline twin is the same student trained on the same blocks with
the next-token loss alone and the same budget ("the text alone").

Masked (DistilBERT): `MaskedRows` wraps a BERT so that a batch of masked blocks gives one row
of logits per masked token, lined up with the cache rows that `MaskedSet` serves, each block
masked as the teacher saw it (the cache records the masks; `views: true` draws among the
cached maskings every epoch). Its `hidden.N` layers are hidden state N at the masked
positions, for the `cosine` term against a cached teacher layer. With `init: teacher` the
student starts from the teacher's embeddings, head and one layer in every N_t / N_s (the
copy `label.keep_teacher` put in the cache). The triple loss is `soft` + `hard` + `cosine`;
the twin is the same student, same start and same masks, with the masked-LM loss alone.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import lm, metrics, parallel
from pipeline.prepared import tokens as text
from pipeline.cache import Cache
from pipeline.cache.reader import SoftTargets
from pipeline.cache.inputs import next_token_logits
from pipeline.config import EvalConfig, StudentConfig, as_dict
from pipeline.distill import Built, Shapes, student_layers, student_terms
from pipeline.errors import CacheError, ConfigError, StaleCacheError
from pipeline.files import staging_dir, swap_into_place, write_json
from pipeline.loader import needed_temperatures
from pipeline.metrics import SEEDS_DIR
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
                "label": _labels(cfg, torch.from_numpy(blocks[:, 1:].reshape(-1)).long(), soft.topk_idx)}
        if cfg.loss.soft is not None:
            part["lse"] = torch.tensor(soft.lse[float(cfg.loss.soft.temperature)])
        tokens.append(torch.from_numpy(blocks))
        for name, value in part.items():
            targets.setdefault(name, []).append(value)
    return TokenSet(torch.cat(tokens), {name: torch.cat(parts) for name, parts in targets.items()})


def _labels(cfg: StudentConfig, truth: torch.Tensor, topk_idx: np.ndarray) -> torch.Tensor:
    """Per row: the true token (`hard.labels`; `truth`, the next or the masked one), the
    teacher's argmax (`hard.pseudo`), or -1."""
    hard = cfg.loss.hard
    if hard is not None and hard.labels:
        return truth
    if hard is not None and hard.pseudo:
        return torch.from_numpy(topk_idx[:, 0].astype(np.int64))
    return torch.full((len(topk_idx),), -1, dtype=torch.long)


class MaskedRows(nn.Module):
    """A masked LM seen row by row: x (B, L + M), the masked blocks and their M masked positions
    -> logits (B * M, V), one row per masked token in cache order. The MLM head runs on the
    masked positions only. `hidden.N` pass hidden state N (0 = the embeddings) at the masked
    positions, (B * M, H), for terms that tap a student layer."""

    def __init__(self, model: nn.Module, block_size: int, layers: list[int] = ()):
        super().__init__()
        self.model, self.block_size = model, block_size
        self.hidden = nn.ModuleDict({str(n): nn.Identity() for n in layers})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, positions = x[:, :self.block_size], x[:, self.block_size:]
        at = (torch.arange(len(x))[:, None], positions)
        out = self.model.base_model(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                                    output_hidden_states=len(self.hidden) > 0)
        for n, identity in self.hidden.items():
            identity(out.hidden_states[int(n)][at].flatten(0, 1))
        return self.model.cls(out.last_hidden_state[at].flatten(0, 1))


@dataclass
class MaskedSet:
    """Blocks with their cached maskings: tokens (N, L); positions and seen (N, V, M), the masked
    positions of each of V maskings and the token the teacher saw there; targets and truth
    (the original tokens) hold one row per masked token, N * V * M rows in cache order."""

    tokens: torch.Tensor
    positions: torch.Tensor
    seen: torch.Tensor
    targets: dict[str, torch.Tensor]
    truth: torch.Tensor

    def __len__(self) -> int:
        return len(self.tokens)

    def inputs(self, blocks: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """MaskedRows' input for these blocks, each masked as in the given view."""
        positions = self.positions[blocks, view]
        return torch.cat([lm.apply_masks(self.tokens[blocks], positions, self.seen[blocks, view]), positions], 1)

    def batches(self, epoch: int, batch_size: int, seed: int, views: str = "none",
                shard: tuple[int, int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled batches of whole blocks, seeded by (seed, epoch): masking 0, or with
        views="cached" one drawn per block, with the rows of that masking."""
        if shard is not None:
            raise ConfigError("text students train in one process (torchrun is for image students so far)")
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _, maskings, masked = self.positions.shape
        for blocks in torch.randperm(len(self.tokens), generator=g).split(batch_size):
            view = (torch.randint(maskings, (len(blocks),), generator=g) if views == "cached"
                    else torch.zeros(len(blocks), dtype=torch.long))
            rows = (((blocks * maskings + view) * masked)[:, None] + torch.arange(masked)).reshape(-1)
            yield {"x": self.inputs(blocks, view), **{name: t[rows] for name, t in self.targets.items()}}


def masked_set(cache: Cache, prepared: Path, cfg: StudentConfig, layers: list[str]) -> MaskedSet:
    """The student's transfer blocks with their cached maskings, top-k, lse, true tokens and the
    teacher layers the loss needs."""
    maskings = cache.manifest["views"]["count"] + 1
    masked = cache.manifest["text"]["positions"]
    temperatures = needed_temperatures(cfg)
    tokens, parts = [], {}
    for split in cfg.transfer:
        ids, blocks = text.read_blocks(prepared / f"{split}.parquet")
        soft = cache.soft_targets(split, temperatures)
        if not np.array_equal(soft.ids[::maskings * masked], ids):
            raise StaleCacheError(f"{cache.root}: ids of split {split} differ from {prepared / split}.parquet; "
                                  "run `kd label` again")
        position, seen = cache.masks(split)
        block_tensor = torch.from_numpy(blocks).long()
        position = torch.tensor(position, dtype=torch.long).reshape(len(ids), maskings, masked)
        truth = block_tensor.gather(1, position.reshape(len(ids), -1)).reshape(-1)
        part = {"positions": position, "seen": torch.tensor(seen, dtype=torch.long).reshape(len(ids), maskings, masked),
                "truth": truth, "topk_idx": torch.tensor(soft.topk_idx, dtype=torch.long),
                "topk_logit": torch.tensor(soft.topk_logit, dtype=torch.float32)}
        part["label"] = _labels(cfg, truth, soft.topk_idx)
        if cfg.loss.soft is not None:
            part["lse"] = torch.tensor(soft.lse[float(cfg.loss.soft.temperature)])
        for layer in layers:
            part[f"teacher.{layer}"] = torch.from_numpy(cache.feature(split, layer)[:])
        tokens.append(block_tensor)
        for name, value in part.items():
            parts.setdefault(name, []).append(value)
    joined = {name: torch.cat(values) for name, values in parts.items()}
    positions, seen, truth = joined.pop("positions"), joined.pop("seen"), joined.pop("truth")
    return MaskedSet(torch.cat(tokens), positions, seen, joined, truth)


def train_text_student(cfg: StudentConfig, cache: Cache, prepared: Path, out: Path, *,
                       progress: bool = True) -> dict[str, Any]:
    """Train causal or masked student `cfg.name` and its twin into `out` (HF directories: the
    student at the top, the twin in `baseline/`). Returns a summary."""
    info = cache.manifest["text"]
    masked = info["objective"] == "masked"
    _refuse(cfg, cache)
    layers = cfg.loss.teacher_layers(cfg.where)
    cache.require(temperatures=needed_temperatures(cfg), features=layers, who=f"student {cfg.name!r}")
    cache.check(prepared, cfg.transfer, list(layers))
    _, special = text.load_tokenizer(prepared)
    if masked:
        dataset = masked_set(cache, prepared, cfg, list(layers))
        start = _teacher_start(cache) if cfg.init == "teacher" else None
        make = functools.partial(_masked_student, cfg, info, special, start)
        width = lm.ARCHITECTURES[cfg.arch][0](**cfg.arch_kwargs).hidden_size
        built = student_terms(cfg, Shapes({layer: [width] for layer in student_layers(cfg)},
                                          {layer: cache.feature_spec(layer) for layer in layers}))
        twin_set = dataclasses.replace(dataset, targets={"label": dataset.truth})
    else:
        dataset = token_set(cache, prepared, cfg)
        make = functools.partial(_causal_student, cfg, info, special)
        built = student_terms(cfg, Shapes({}, {}))
        twin_set = dataclasses.replace(dataset, targets={"label": torch.from_numpy(
            np.ascontiguousarray(dataset.tokens[:, 1:].reshape(-1).numpy()))})
    views = "cached" if cfg.views else "none"
    staging = staging_dir(out)
    (staging / SEEDS_DIR).mkdir()  # always there (empty for one seed): a DVC output
    seeds = [cfg.seed + i for i in range(cfg.repeats)]
    for seed in seeds:  # the first seed at the top of `out`, further ones under seeds/<seed>/
        seed_cfg = dataclasses.replace(cfg, seed=seed)
        student, log = _train(seed_cfg, make, dataset, built, views, f"distill {cfg.name} seed {seed}", progress)
        twin, twin_log = _train(seed_cfg, make, twin_set, Built({"hard": (1.0, hard_label_loss)}), views,
                                f"baseline {cfg.name} seed {seed}", progress)
        record = {"student": as_dict(seed_cfg), "teacher_fingerprint": cache.manifest["teacher"]["fingerprint"],
                  "cache": str(cache.root), "objective": info["objective"]}
        root = staging if seed == cfg.seed else staging / SEEDS_DIR / str(seed)
        for directory, model, train_log, what in (
                (root, student, log, record),
                (root / "baseline", twin, twin_log, {**record, "student": None, "baseline_of": as_dict(seed_cfg)})):
            lm.save(directory, model, prepared / text.TOKENIZER_FILE)
            write_json(directory / STUDENT_RECORD, what)
            write_log(directory / "train_log.csv", train_log)
        if seed == cfg.seed:
            summary = {"final": log[-1], "baseline_final": twin_log[-1], "epochs": len(log)}
    swap_into_place(staging, out)
    return {**summary, "seeds": seeds, "objective": info["objective"]}


def _refuse(cfg: StudentConfig, cache: Cache) -> None:
    """What a text student cannot do yet, said up front."""
    objective = cache.manifest["text"]["objective"]
    arch = {"causal": "gpt2", "masked": "bert"}[objective]
    if lm.ARCHITECTURES.get(cfg.arch, (None, None))[1] is not lm.ARCHITECTURES[arch][1]:
        raise ConfigError(f"{cfg.where}.arch: {cfg.arch!r}; a student of a {objective} LM cache must be {arch}")
    allowed = ("soft", "hard", "cosine") if objective == "masked" else ("soft", "hard")
    extra = [f.name for f in dataclasses.fields(cfg.loss) if f.name not in allowed
             and getattr(cfg.loss, f.name) is not None]
    if extra:
        raise ConfigError(f"{cfg.where}.loss: {', '.join(extra)} not supported for {objective} LM students yet "
                          f"({', '.join(allowed)})")
    unsupported = [("assistant", cfg.assistant)]
    if objective == "causal":
        unsupported += [("views", cfg.views), ("init", cfg.init)]
    for key, value in unsupported:
        if value:
            raise ConfigError(f"{cfg.where}.{key}: not supported for {objective} LM students yet")
    if cfg.views and cache.manifest["views"]["count"] == 0:
        raise ConfigError(f"{cfg.where}.views: the cache holds one masking per block; set label.views (e.g. 4) "
                          "and run `kd label` again")
    if cfg.init == "teacher" and "teacher_files" not in cache.manifest:
        raise ConfigError(f"{cfg.where}.init: 'teacher' needs the teacher's weights in the cache; set "
                          "label.keep_teacher: true and run `kd label` again")
    for layer in student_layers(cfg):
        if not (layer.startswith("hidden.") and layer.removeprefix("hidden.").isdigit()):
            raise ConfigError(f"{cfg.where}.loss: student_layer {layer!r}; a masked LM student's layers are "
                              "hidden.N (hidden state N at the masked positions, 0 = the embeddings)")
    if parallel.world()[1] > 1:
        raise ConfigError("text students train in one process (torchrun is for image students so far)")


def _train(cfg: StudentConfig, make: Any, dataset: Any, built: Built, views: str, desc: str,
           progress: bool) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a fresh student from `make()` (same seed, so the student and its twin start alike)."""
    torch.manual_seed(cfg.seed)
    rows = make()
    for module in built.modules:
        module.train()
    log = fit(rows, dataset, built.terms, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, views=views, taps=built.taps,
              extra_modules=built.modules, desc=desc, progress=progress)
    return rows.model, log


def _causal_student(cfg: StudentConfig, info: dict[str, Any], special: text.SpecialIds) -> TokenRows:
    return TokenRows(lm.build(cfg.arch, cfg.arch_kwargs, info["vocab_size"], info["block_size"], special,
                              where=cfg.where))


def _masked_student(cfg: StudentConfig, info: dict[str, Any], special: text.SpecialIds,
                    start: nn.Module | None) -> MaskedRows:
    model = lm.build(cfg.arch, cfg.arch_kwargs, info["vocab_size"], info["block_size"], special, where=cfg.where)
    if start is not None:
        lm.init_from_teacher(model, start, where=f"{cfg.where}.init")
    layers = [int(layer.removeprefix("hidden.")) for layer in student_layers(cfg)]
    for n in layers:
        if n > model.config.num_hidden_layers:
            raise ConfigError(f"{cfg.where}.loss: student_layer hidden.{n}; the student has "
                              f"{model.config.num_hidden_layers} layers (hidden.0 .. hidden.{model.config.num_hidden_layers})")
    return MaskedRows(model, info["block_size"], layers)


def _teacher_start(cache: Cache) -> nn.Module:
    """The teacher's copy in the cache (`label.keep_teacher`), checked against the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        for rel, digest in cache.manifest["teacher_files"].items():
            data = cache.store.read_bytes(cache.store.safe(rel))
            if hashlib.sha256(data).hexdigest() != digest:
                raise CacheError(f"{cache.store.show(rel)}: sha256 differs from the manifest; run "
                                 f"`kd cache verify {cache.root}`")
            (Path(tmp) / Path(rel).name).write_bytes(data)
        return lm.load(Path(tmp))


# --- evaluation -------------------------------------------------------------------------------


def evaluate_text(student_dir: Path, cache: Cache, prepared: Path, cfg: EvalConfig) -> dict[str, Any]:
    """Test perplexity of the student and its twin, and against the cached teacher (`_against_teacher`).
    "plots" holds the mean loss of the student and its twin at each position of a block: how
    each uses its context."""
    student, twin = TokenRows(lm.load(student_dir)), TokenRows(lm.load(student_dir / "baseline"))
    _, blocks = text.read_blocks(prepared / "test.parquet")
    tokens = torch.from_numpy(blocks)
    targets = tokens[:, 1:].reshape(-1)
    logits = _logits(student, tokens, cfg.batch_size)
    losses = {"student": F.cross_entropy(logits, targets, reduction="none"),
              "baseline": F.cross_entropy(_logits(twin, tokens, cfg.batch_size), targets, reduction="none")}
    perplexity, twin_perplexity = (math.exp(float(losses[k].mean())) for k in ("student", "baseline"))
    per_position = {k: v.reshape(len(tokens), -1).mean(0).tolist() for k, v in losses.items()}
    teacher = cache.manifest["teacher"]["config"]

    def score(directory: Path) -> float:
        return math.exp(float(F.cross_entropy(_logits(TokenRows(lm.load(directory)), tokens, cfg.batch_size), targets)))

    seeds = _seeds(student_dir, perplexity, twin_perplexity, score)
    return {
        "objective": "causal",
        "perplexity": perplexity, "baseline_perplexity": twin_perplexity,
        "teacher_perplexity": teacher.get("metrics", {}).get("perplexity"),
        "perplexity_gain": twin_perplexity - perplexity,
        "perplexity_reduction": 1 - perplexity / twin_perplexity,
        **_against_teacher(student, logits, tokens, cache.soft_targets("test", [1.0]), student_dir, cache, cfg),
        **_seed_summary(seeds, "perplexity", "perplexity_reduction", lambda s, b: 1 - s / b),
        "plots": {"per_position.csv": (["position", "student", "baseline"],
                                       [{"position": i + 1, "student": a, "baseline": b}
                                        for i, (a, b) in enumerate(zip(per_position["student"],
                                                                       per_position["baseline"]))]),
                  "seeds.csv": (["seed", "student", "baseline"], seeds)},
    }


def evaluate_masked(student_dir: Path, cache: Cache, prepared: Path, cfg: EvalConfig) -> dict[str, Any]:
    """Masked-token accuracy of the student, its twin and the teacher on every cached masking of
    the test split (the teacher's from its cached top-1, on the very same masked tokens), and
    against the cached teacher (`_against_teacher`). "plots" holds the mean loss at each block
    position (over the masked tokens there)."""
    info = cache.manifest["text"]
    maskings, masked, block = cache.manifest["views"]["count"] + 1, info["positions"], info["block_size"]
    _, blocks = text.read_blocks(prepared / "test.parquet")
    position, seen = cache.masks("test")
    tokens = torch.from_numpy(blocks).long().repeat_interleave(maskings, 0)  # (N * maskings, L), cache order
    positions = torch.tensor(position, dtype=torch.long).reshape(len(tokens), masked)
    x = torch.cat([lm.apply_masks(tokens, positions, torch.tensor(seen).reshape(len(tokens), masked)), positions], 1)
    truth = tokens.gather(1, positions).reshape(-1)
    student = MaskedRows(lm.load(student_dir), block)
    logits = _logits(student, x, cfg.batch_size)
    twin_logits = _logits(MaskedRows(lm.load(student_dir / "baseline"), block), x, cfg.batch_size)
    losses = {"student": F.cross_entropy(logits, truth, reduction="none"),
              "baseline": F.cross_entropy(twin_logits, truth, reduction="none")}
    accuracy = float((logits.argmax(1) == truth).float().mean())
    twin_accuracy = float((twin_logits.argmax(1) == truth).float().mean())
    soft = cache.soft_targets("test", [1.0])

    def score(directory: Path) -> float:
        rows = MaskedRows(lm.load(directory), block)
        return float((_logits(rows, x, cfg.batch_size).argmax(1) == truth).float().mean())

    seeds = _seeds(student_dir, accuracy, twin_accuracy, score)
    flat = positions.reshape(-1).numpy()
    counts = np.bincount(flat, minlength=block)
    sums = {k: np.bincount(flat, v.numpy(), minlength=block) for k, v in losses.items()}
    return {
        "objective": "masked",
        "masked_accuracy": accuracy, "baseline_masked_accuracy": twin_accuracy,
        "teacher_masked_accuracy": float((soft.topk_idx[:, 0] == truth.numpy()).mean()),
        "accuracy_gain_points": 100 * (accuracy - twin_accuracy),
        "loss": float(losses["student"].mean()), "baseline_loss": float(losses["baseline"].mean()),
        **_against_teacher(student, logits, x, soft, student_dir, cache, cfg),
        **_seed_summary(seeds, "masked_accuracy", "accuracy_gain_points", lambda s, b: 100 * (s - b)),
        "plots": {"per_position.csv": (["position", "student", "baseline"],
                                       [{"position": int(p), **{k: float(sums[k][p] / counts[p]) for k in sums}}
                                        for p in np.flatnonzero(counts)]),
                  "seeds.csv": (["seed", "student", "baseline"], seeds)},
    }


def _seeds(student_dir: Path, student: float, baseline: float, score: Any) -> list[dict[str, float]]:
    """One row per trained seed: the first (the student at the top of `student_dir`, already
    scored) and each `seeds/<seed>/` with its own twin, scored by `score(directory)`."""
    first = json.loads((student_dir / STUDENT_RECORD).read_text())["student"]["seed"]
    rows = [{"seed": first, "student": student, "baseline": baseline}]
    root = student_dir / SEEDS_DIR
    for directory in sorted((p for p in (root.iterdir() if root.is_dir() else []) if p.name.isdigit()),
                            key=lambda p: int(p.name)):
        rows.append({"seed": int(directory.name), "student": score(directory),
                     "baseline": score(directory / "baseline")})
    return rows


def _seed_summary(rows: list[dict[str, float]], key: str, change: str, paired: Any) -> dict[str, Any]:
    """`metrics.seed_summary` of the (seed, student, baseline) rows, under KEY and CHANGE."""
    return metrics.seed_summary([{key: r["student"], f"baseline_{key}": r["baseline"]} for r in rows],
                                key, change, paired)


def _against_teacher(student: nn.Module, logits: torch.Tensor, x: torch.Tensor, soft: SoftTargets,
                     student_dir: Path, cache: Cache, cfg: EvalConfig) -> dict[str, Any]:
    """What every text student reports beside its own score: top-1 agreement with the cached
    teacher and KL at T=1 (top-k plus a tail bucket: a lower bound when k < V) against the test
    rows `soft` (with lse at T=1), one per row of `logits`; size; and tokens/s against a
    random-weight copy of the teacher's architecture (weights do not change its speed), on the
    student's input `x`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    kl, exact = metrics.kl_to_teacher(logits, torch.tensor(soft.topk_idx, dtype=torch.long),
                                      torch.tensor(soft.topk_logit, dtype=torch.float32), torch.tensor(soft.lse[1.0]))
    teacher = cache.manifest["teacher"]["config"]
    models = [student]
    if "hf_config" in teacher:
        masked = cache.manifest["text"]["objective"] == "masked"
        auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
        copy = auto.from_config(AutoConfig.for_model(**teacher["hf_config"]))
        models.append(MaskedRows(copy, cache.manifest["text"]["block_size"]) if masked else TokenRows(copy))
    with metrics.torch_threads(cfg.threads):
        blocks_per_s = metrics.throughputs(models, x[:cfg.batch_size], cfg.throughput_runs)
    return {
        "agreement": metrics.agreement(logits.argmax(1).numpy(), soft.topk_idx[:, 0]),
        "kl_to_teacher": kl, "kl_exact": exact,
        "kept_mass_t1": cache.manifest["fidelity"]["test"].get("t1", {}).get("kept_mass"),
        "top_k": cache.manifest["top_k"],
        "params": count_params(student), "teacher_params": teacher.get("params"),
        "size_bytes": (student_dir / lm.WEIGHTS).stat().st_size,
        "throughput_tokens_per_s": blocks_per_s[0] * cache.manifest["text"]["block_size"],
        "speedup_vs_teacher": blocks_per_s[0] / blocks_per_s[1] if len(blocks_per_s) > 1 else None,
        "test_tokens": len(logits),
    }


def _logits(rows: TokenRows, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """One row of logits per predicted token of every block, in batches of blocks."""
    rows.eval()
    with torch.no_grad():
        return torch.cat([rows(chunk) for chunk in tokens.split(batch_size)])
