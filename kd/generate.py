"""Model-written responses (`kd generate`): the teacher, or any causal LM, answers the prompts of a prepared split.

The writer is the teacher (`--teacher`) or any causal LM directory of the prompts' tokenizer
(`--model`: a student kd distilled, for on-policy rounds; `role` "model"). Below, "the
teacher" is whichever wrote.

The prompts are those of a prepared instruction split (`generate.split`, the unlabeled one by
default): the tokens of each block before its first response token (its first `loss_mask`
True). The teacher answers them in batches, the prompts left-padded with an attention mask,
one token per step from a KV cache (`generate_batch`: the prefix is never run again), greedy
or sampled (`temperature`, `top_p`). A response ends at the teacher's eos, at
`max_new_tokens` or at the end of the block. Its draws come from one generator seeded by
(`seed`, the example's id, the sample index) alone (`row_seed`), so a response does not depend
on the batch it was drawn in, nor on how the run was cut into parts or interrupted.

`run` writes OUT, a prepared directory of the same format as IN:

    labeled.parquet, test.parquet, ...   the other splits of IN, copied byte for byte
    <split>.parquet                       one block per kept response: prompt + response (+ eos
                                          when the teacher wrote one), `loss_mask` on the
                                          response, `logprob` the writer's log-probability of
                                          each response token; its metadata adds `generated_by`
                                          (the writer's fingerprint), `generated_by_role` and
                                          `generation` (the settings)
    tokenizer files                       IN's, copied
    generation.json                       the manifest: the writer (`writer`: its role,
                                          directory and fingerprint; `teacher` too when the
                                          teacher wrote), the source, the settings,
                                          the parts with their sha256, what was kept and why,
                                          how many answers equal the responses the source
                                          split held (`same_as_source`: the truth, where it is
                                          known), and the writer's greedy exact match on test
                                          (per assistant turn, and on each block's first:
                                          `writer_exact_match...`, and `teacher_exact_match...`
                                          when the teacher wrote)
    parts/part-<n>.parquet                every response of prompts [n * part_size, ...): `id`
                                          (the prompt's block), `sample`, `response` (tokens),
                                          `logprob` (the mean log-probability of its tokens
                                          under the teacher, at temperature 1), `logprobs`
                                          (each token's), `finished`
                                          (ended with eos); parts/_key.json: what decides them

Resuming: the parts are written one by one (atomically) with the key that decides them; a run
killed at any point starts again at the first missing part, and the final files are built
aside and swapped in at the end (`files.replacing`), so OUT is either the previous complete
result or the new one. A complete OUT with the same key is left as is. `min_logprob` (keep a
response only if its mean token log-probability is at least this) is applied when the split is
assembled: changing it rewrites the split from the same parts, without generating again.

Sharded (`kd generate --shard I --num-shards N`, or RANK / WORLD_SIZE under torchrun): shard I
answers parts I, I + N, ...; the shard that finds every part written assembles OUT, which is
then byte for byte what one process writes.

With `samples` > 1 a prompt gets several blocks; their ids are then new: one past the largest
id of IN's splits, plus prompt index * samples + sample index (with 1 sample, a block keeps its
prompt's id).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kd import lm
from kd.cache import Teacher
from kd.config import SPLITS, GenerateConfig, as_dict
from kd.errors import ConfigError, InputError, MissingInputError
from kd.files import file_sha256, read_json, replacing, write_json
from kd.prepared import data_fingerprint, metadata, open_parquet, tokens, write_atomic
from kd.sources.text import example_blocks

SCHEMA_VERSION = 2  # 2: per-token log-probabilities (parts' `logprobs`, the split's `logprob`), `writer`
ROLES = ("teacher", "model")  # who writes: the teacher (`--teacher`) or any causal LM (`--model`)
MANIFEST = "generation.json"
PARTS = "parts"
KEY = f"{PARTS}/_key.json"  # (a leading _: readers of parts/ as one Parquet dataset skip it)
PART_SCHEMA = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("sample", pa.int32(), nullable=False),
                         pa.field("response", pa.list_(pa.int32()), nullable=False),
                         pa.field("logprob", pa.float64(), nullable=False),
                         pa.field("logprobs", pa.list_(pa.float32()), nullable=False),
                         pa.field("finished", pa.bool_(), nullable=False)])


@dataclass
class Response:
    """One answer: its tokens (the eos or stop token included when the teacher wrote it), the
    log-probability of each under the teacher at temperature 1, and whether it ended with eos
    (or its stop token)."""

    tokens: list[int]
    logprobs: list[float]
    finished: bool

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean_logprob(self) -> float:
        return self.logprob_sum / len(self.tokens) if self.tokens else float("-inf")


# --- prompts ----------------------------------------------------------------------------------


def prompts_and_responses(source: Path) -> tuple[np.ndarray, list[list[int]], list[list[int]]]:
    """ids, prompts (each block's tokens before its first response token) and responses (its
    response tokens) of an instruction split."""
    ids, blocks = tokens.read_blocks(source)
    predicted = tokens.predicted(source)
    if predicted is None:
        raise InputError(f"{source}: plain text (no loss_mask); kd generate answers the prompts of instruction or "
                         "chat data (prepare.prompt_column + response_column, or messages_column)")
    first = predicted.argmax(1) + 1  # every block has a response token (example_blocks drops the others)
    prompts = [block[:start].tolist() for block, start in zip(blocks, first)]
    responses = [block[1:][keep].tolist() for block, keep in zip(blocks, predicted)]
    return ids, prompts, responses


def row_seed(seed: int, example_id: int, sample: int) -> int:
    """The seed of one response's draws: the same whatever the batch, part or shard."""
    digest = hashlib.sha256(f"kd-generate/{seed}/{example_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --- decoding ---------------------------------------------------------------------------------


def choose(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float, top_p: float) -> torch.Tensor:
    """The next token of each row. logits: (B, V); uniforms: (B,) float64 in [0, 1), one per
    row and step (None: greedy, the argmax). Sampling: softmax(logits / temperature), cut to the
    smallest set of tokens (by descending probability) holding `top_p` of it, renormalised, and
    drawn by inverse CDF with the row's uniform. -> (B,) int64."""
    if uniforms is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, -1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(-1)
    keep = (cumulative - sorted_probs) < top_p  # the first token always stays
    sorted_probs = sorted_probs * keep
    cdf = sorted_probs.cumsum(-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)
    index = torch.minimum(index, keep.sum(-1, keepdim=True) - 1)  # never past the kept set (rounding)
    return order.gather(1, index).squeeze(1)


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) prompts padded on the left with `pad` and their attention mask (B, P)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def limits(prompts: list[list[int]], max_new_tokens: int, block_size: int) -> list[int]:
    """How many tokens each prompt's response may have: `max_new_tokens`, and no token past the block."""
    return [max(0, min(max_new_tokens, block_size - len(p))) for p in prompts]


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, block_size: int, pad: int,
                   eos: int, uniforms: torch.Tensor | None = None, temperature: float = 1.0,
                   top_p: float = 1.0, stops: list[int | None] | None = None) -> list[Response]:
    """Answer a batch of prompts with a causal LM and its KV cache: one forward over the
    left-padded prompts, then one token per step, each step feeding only the new tokens (the
    keys and values of the prefix are kept). `uniforms` (B, max_new_tokens) float64: the rows'
    draws, step by step (None: greedy). A row stops at eos, at its own stop token (`stops`, one
    per row or None: a chat turn's end-of-turn token) or at its limit (`limits`); the batch
    stops when every row has."""
    device = lm.device_of(model)
    allowed = torch.tensor(limits(prompts, max_new_tokens, block_size))
    stop = torch.tensor([eos if s is None else s for s in (stops or [None] * len(prompts))])  # (B,)
    ids, mask = left_padded(prompts, pad)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    done = allowed == 0
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    if done.all():
        return [Response([], [], False) for _ in prompts]
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True)
    position = positions[:, -1:] + 1
    for step in range(int(allowed.max())):
        logits = out.logits[:, -1].float().cpu()  # (B, V)
        chosen = choose(logits, None if uniforms is None else uniforms[:, step], temperature, top_p)
        logp = F.log_softmax(logits, -1).gather(1, chosen[:, None]).squeeze(1).double()
        live = ~done
        for row in torch.nonzero(live).flatten().tolist():
            tokens[row].append(int(chosen[row]))
            logprobs[row].append(float(logp[row]))
        ended = live & ((chosen == eos) | (chosen == stop))
        finished |= ended
        done = done | ended | (torch.tensor([len(t) for t in tokens]) >= allowed)
        if done.all():
            break
        chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        step_position = torch.where(done[:, None], torch.zeros_like(position), position)  # finished rows: any valid one
        out = model(input_ids=chosen[:, None].to(device), attention_mask=mask.to(device),
                    position_ids=step_position.to(device), cache=out.cache, use_cache=True)
        position = position + 1
    return [Response(t, lp, bool(f)) for t, lp, f in zip(tokens, logprobs, finished.tolist())]


def answers(model: nn.Module, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, block_size: int,
            pad: int, eos: int, stops: list[int | None] | None = None) -> list[Response]:
    """Greedy answers to every prompt, in batches (what `exact_match` scores); `stops`: each
    prompt's own stop token besides eos (None: eos alone)."""
    found: list[Response] = []
    for start in range(0, len(prompts), batch_size):
        found += generate_batch(model, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                block_size=block_size, pad=pad, eos=eos,
                                stops=None if stops is None else stops[start:start + batch_size])
    return found


def exact_match(found: list[Response], truths: list[list[int]]) -> float:
    """The share of answers whose tokens are exactly the true response's (its eos included)."""
    return float(np.mean([r.tokens == t for r, t in zip(found, truths)])) if truths else float("nan")


def turn_scores(model: nn.Module, source: Path, *, batch_size: int, max_new_tokens: int, pad: int, eos: int
                ) -> dict[str, float]:
    """Exact match per assistant turn of an instruction split (`tokens.turns`): each turn's
    prompt answered greedily until eos or the turn's end token, against its truth (its content
    and end token), over all turns (`exact_match`) and over each block's first
    (`exact_match_first_turn`; a prompt/response pair is one turn, so the two are equal)."""
    turns = tokens.turns(source)
    found = answers(model, [t.prompt for t in turns], batch_size=batch_size, max_new_tokens=max_new_tokens,
                    block_size=tokens.split_info(source)["block_size"], pad=pad, eos=eos,
                    stops=[t.stop for t in turns])
    first = [(r, t) for r, t in zip(found, turns) if t.index == 0]
    return {"exact_match": exact_match(found, [t.truth for t in turns]),
            "exact_match_first_turn": exact_match([r for r, _ in first], [t.truth for _, t in first])}


def special_of(prepared: Path) -> tuple[int, int]:
    """(pad, eos) of a prepared directory's tokenizer: the pad id `kd prepare` padded with (eos
    when the tokenizer has none) and the eos that ends a response."""
    special = tokens.prepared_tokenizer(prepared).special
    return (special.pad if special.pad is not None else special.eos), special.eos


# --- the stage --------------------------------------------------------------------------------


def generation_key(teacher: Teacher, source: Path, cfg: GenerateConfig) -> dict[str, Any]:
    """What decides the parts: the writer, the source split, every setting but the filter and
    the parts' format."""
    settings = {k: v for k, v in as_dict(cfg).items() if k != "min_logprob"}
    return {"writer": teacher.fingerprint, "data": data_fingerprint(source), "generate": settings,
            "torch": torch.__version__.split("+")[0], "schema_version": SCHEMA_VERSION}


def run(teacher: Teacher, prepared: Path, out: Path, cfg: GenerateConfig, *, progress: bool = True,
        shard: int = 0, num_shards: int = 1, role: str = "teacher") -> dict[str, Any] | None:
    """`kd generate`: answer the prompts of `cfg.split` of `prepared` into `out` (see the module's
    docstring) with `teacher`, the writer (`role`: one of ROLES); resumes part by part. Returns
    the manifest.

    With `num_shards` > 1, only parts shard, shard + N, ... are answered; the shard that finds
    every part written assembles `out` (exactly what one process writes), the others return None.
    Shards take turns (a lock file beside `out`) to claim `out` and to assemble it."""
    if role not in ROLES:
        raise ConfigError(f"role: {role!r} must be one of {', '.join(ROLES)}")
    who = "teacher" if role == "teacher" else "writing model"
    if not 0 <= shard < num_shards:
        raise ConfigError(f"--shard {shard} must be in [0, {num_shards}) for --num-shards {num_shards}")
    prepared, out = Path(prepared), Path(out)
    if prepared.resolve() == out.resolve():
        raise ConfigError(f"--out: {out} is the prepared directory itself; write the {who}'s responses to "
                          "another directory")
    splits = [s for s in SPLITS if (prepared / f"{s}.parquet").is_file()]
    for required in ("labeled", "test", cfg.split):
        if required not in splits:
            raise MissingInputError(f"{prepared / f'{required}.parquet'}: not found (run `kd prepare`)")
    infos = {s: tokens.split_info(prepared / f"{s}.parquet") for s in splits}
    if teacher.config.get("objective") != "causal":
        raise ConfigError(f"{teacher.directory}: a {teacher.config.get('objective')} LM; kd generate needs a causal "
                          f"LM {who} (one that writes text left to right)")
    lm.check_teacher(teacher, prepared, infos, who)
    source = prepared / f"{cfg.split}.parquet"
    ids, prompts, given = prompts_and_responses(source)
    key = generation_key(teacher, source, cfg)
    done = _up_to_date(out, key, cfg)
    if done is not None:
        return done
    with _locked(out):
        _claim(out, key)
    pad, eos = special_of(prepared)
    block_size = infos[cfg.split]["block_size"]
    model = teacher.model.eval()
    counts = [min(cfg.part_size, len(ids) - start) for start in range(0, len(ids), cfg.part_size)]
    mine = list(range(len(counts)))[shard::num_shards]
    missing = [i for i in mine if not (out / _part(i)).is_file()]
    total = sum(counts[i] for i in mine)
    bar = tqdm(total=total * cfg.samples, initial=(total - sum(counts[i] for i in missing)) * cfg.samples,
               unit="resp", desc=f"kd generate (shard {shard} of {num_shards})" if num_shards > 1 else "kd generate",
               disable=not progress)
    started, generated = time.perf_counter(), 0
    for index in missing:
        first = index * cfg.part_size
        table, token_count = _answer_part(model, ids[first:first + counts[index]], prompts[first:first + counts[index]],
                                     cfg, block_size, pad, eos, bar)
        write_atomic(table, out / _part(index))
        generated += token_count
        bar.set_postfix_str(f"{generated / max(time.perf_counter() - started, 1e-9):.0f} tok/s")
    bar.close()
    if not all((out / _part(i)).is_file() for i in range(len(counts))):
        return None  # other shards are still answering: the last one to finish assembles
    with _locked(out):
        done = _up_to_date(out, key, cfg)  # another shard assembled while this one waited
        if done is not None:
            return done
        scores = turn_scores(model, prepared / "test.parquet", batch_size=cfg.batch_size,
                             max_new_tokens=cfg.max_new_tokens, pad=pad, eos=eos)
        return _assemble(teacher, role, prepared, out, cfg, key, splits, ids, prompts, given, counts, pad, scores)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Take turns with the other shards (a blocking lock on `.<out>.lock` beside `out`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _answer_part(model: nn.Module, ids: np.ndarray, prompts: list[list[int]], cfg: GenerateConfig, block_size: int,
                 pad: int, eos: int, bar: tqdm) -> tuple[pa.Table, int]:
    """Every response of one part's prompts (prompt-major, then sample) as a part table, and
    how many tokens were generated."""
    rows = [(int(i), s, p) for i, p in zip(ids, prompts) for s in range(cfg.samples)]
    found: list[Response] = []
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start:start + cfg.batch_size]
        uniforms = None
        if cfg.do_sample:
            uniforms = torch.stack([torch.rand(cfg.max_new_tokens, dtype=torch.float64,
                                               generator=torch.Generator().manual_seed(row_seed(cfg.seed, i, s)))
                                    for i, s, _ in batch])
        found += generate_batch(model, [p for _, _, p in batch], max_new_tokens=cfg.max_new_tokens,
                                block_size=block_size, pad=pad, eos=eos, uniforms=uniforms,
                                temperature=cfg.temperature, top_p=cfg.top_p)
        bar.update(len(batch))
    table = pa.table({"id": pa.array([i for i, _, _ in rows], pa.int64()),
                      "sample": pa.array([s for _, s, _ in rows], pa.int32()),
                      "response": pa.array([r.tokens for r in found], pa.list_(pa.int32())),
                      "logprob": pa.array([r.mean_logprob if r.tokens else -math.inf for r in found], pa.float64()),
                      "logprobs": pa.array([r.logprobs for r in found], pa.list_(pa.float32())),
                      "finished": pa.array([r.finished for r in found], pa.bool_())}, schema=PART_SCHEMA)
    return table, sum(len(r.tokens) for r in found)


def _part(index: int) -> str:
    return f"{PARTS}/part-{index:05d}.parquet"


def _up_to_date(out: Path, key: dict[str, Any], cfg: GenerateConfig) -> dict[str, Any] | None:
    """The manifest of a complete `out` built with this key and filter whose files are intact."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = read_json(out / MANIFEST)
    except InputError:
        return None
    if manifest.get("key") != key or manifest.get("settings", {}).get("min_logprob", 0) != cfg.min_logprob:
        return None
    for rel, digest in manifest.get("files", {}).items():
        if not (out / rel).is_file() or file_sha256(out / rel) != digest:
            return None
    return manifest


def _claim(out: Path, key: dict[str, Any]) -> None:
    """Make `out` ready to resume with this key: parts of another key are removed. A directory
    kd generate did not write is refused, not emptied."""
    if out.exists() and any(out.iterdir()) and not (out / KEY).is_file() and not (out / MANIFEST).is_file():
        found = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise ConfigError(f"--out: {out} holds files kd generate did not write ({found}); "
                          "choose another directory or remove it")
    if (out / KEY).is_file():
        try:
            same = read_json(out / KEY) == key
        except InputError:
            same = False
        if same:
            return
    shutil.rmtree(out / PARTS, ignore_errors=True)
    (out / PARTS).mkdir(parents=True)
    write_json(out / KEY, key)


def _assemble(teacher: Teacher, role: str, prepared: Path, out: Path, cfg: GenerateConfig, key: dict[str, Any],
              splits: list[str], ids: np.ndarray, prompts: list[list[int]], given: list[list[int]],
              counts: list[int], pad: int, scores: dict[str, float]) -> dict[str, Any]:
    """Build the finished directory aside from the parts and swap it in. `given`: the responses
    the source split held (the truth, for a split whose answers are known), to count how many
    answers equal them; `scores`: the writer's on test (`turn_scores`)."""
    tables = [pq.read_table(out / _part(i)) for i in range(len(counts))]
    parts = [{"index": i, "prompts": counts[i], "responses": t.num_rows, "sha256": file_sha256(out / _part(i))}
             for i, t in enumerate(tables)]
    table = pa.concat_tables(tables)
    responses = table.column("response").to_pylist()
    token_logprobs = table.column("logprobs").to_pylist()
    logprob = table.column("logprob").to_numpy()
    finished = table.column("finished").to_numpy(zero_copy_only=False)
    samples = table.column("sample").to_numpy()
    empty = np.array([not r for r in responses], bool)  # a prompt that filled its block: no room to answer
    kept = ~empty if cfg.min_logprob is None else ~empty & (logprob >= cfg.min_logprob)
    encoded = [(prompts[row // cfg.samples] + r, [False] * len(prompts[row // cfg.samples]) + [True] * len(r))
               for row, r in enumerate(responses) if kept[row]]
    info = tokens.split_info(prepared / f"{cfg.split}.parquet")
    blocks, mask, _ = example_blocks(encoded, info["block_size"], pad)  # every kept one has a response token
    written = np.zeros(blocks.shape, np.float32)  # (N, L): at each response token, the writer's log-probability
    for block, row in enumerate(np.flatnonzero(kept)):
        start = len(prompts[row // cfg.samples])
        values = token_logprobs[row][:max(0, info["block_size"] - start)]
        written[block, start:start + len(values)] = values
    rows = np.flatnonzero(kept)
    if cfg.samples == 1:
        new_ids = ids[rows]
    else:
        base = 1 + max(int(tokens.read_blocks(prepared / f"{s}.parquet")[0].max(initial=-1)) for s in splits)
        new_ids = base + rows  # rows are prompt index * samples + sample index
    settings = as_dict(cfg)
    source_meta = metadata(open_parquet(prepared / f"{cfg.split}.parquet").schema_arrow)
    dropped = {"no_room_to_answer": int(empty.sum())} if empty.any() else {}
    meta = {**source_meta, "documents": str(len(ids)), "examples_dropped": json.dumps(dropped),
            "responses_filtered": str(int((~kept & ~empty).sum())),
            "generated_by": teacher.fingerprint, "generated_by_role": role,
            "generation": json.dumps(settings, sort_keys=True)}
    summary = {"prompts": len(ids), "responses": len(responses), "kept": int(kept.sum()),
               "filtered": int((~kept & ~empty).sum()), "no_room": int(empty.sum()), "finished": int(finished.sum()),
               "tokens": int(sum(len(r) for r in responses)),
               "mean_logprob": float(np.mean(logprob[np.isfinite(logprob)])) if np.isfinite(logprob).any() else None,
               "kept_mean_logprob": float(np.mean(logprob[kept])) if kept.any() else None,
               "samples": int(samples.max(initial=-1) + 1)}
    same = np.array([r == given[row // cfg.samples] for row, r in enumerate(responses)], bool)
    summary |= {"same_as_source": float(same.mean()) if len(same) else None,  # the source split's responses
                "kept_same_as_source": float(same[kept].mean()) if kept.any() else None}
    with replacing(out) as tmp:
        for path in tokens.tokenizer_files(prepared):
            shutil.copyfile(path, tmp / path.name)
        shutil.copytree(out / PARTS, tmp / PARTS)
        for split in splits:
            if split != cfg.split:
                shutil.copyfile(prepared / f"{split}.parquet", tmp / f"{split}.parquet")
        tokens.write_blocks(tmp / f"{cfg.split}.parquet", np.asarray(new_ids, np.int64), blocks, meta, mask, written)
        files = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.parquet"))}
        writer = {"role": role, "fingerprint": teacher.fingerprint, "directory": str(teacher.directory),
                  "arch": teacher.config.get("arch"), "params": teacher.config.get("params")}
        # the writer's scores; under `teacher_` too when the teacher wrote (what `kd eval` reports as the teacher's)
        named = {f"{prefix}_{name}": value for name, value in scores.items()
                 for prefix in (("writer", "teacher") if role == "teacher" else ("writer",))}
        manifest = {"schema_version": SCHEMA_VERSION, "complete": True, "key": key, "writer": writer,
                    **({"teacher": writer} if role == "teacher" else {}),
                    "source": {"prepared": str(prepared), "split": cfg.split,
                               "sha256": key["data"]}, "settings": settings, "parts": parts,
                    "responses": summary, **named, "files": files}
        write_json(tmp / MANIFEST, manifest)
    return manifest
