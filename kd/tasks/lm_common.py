"""What the two language-model tasks (`causal_lm`, `masked_lm`) share.

Their refusals (the prepared data's tokenizer must be the cache's, `check_tokenizer`; a
student's architecture, start, loss methods and tokenizer, `check_token_student`), whether a
student reads the teacher's tokens or its own (`student_tokenizer`), its start (at random, from
the teacher's copy in the cache, or from a pretrained directory: `build_model`), how it is saved
(a Hugging Face directory plus `student.json`) and what is measured of every token student
against the cached teacher (`evaluate_rows`, `against_teacher`).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from kd import evaluation, lm, metrics, speed
from kd.cache import Cache
from kd.cache.reader import SoftTargets
from kd.config import EvalConfig, StudentConfig
from kd.errors import CacheError, ConfigError, InputError, MissingInputError
from kd.files import read_json, write_json
from kd.methods import chosen
from kd.prepared import retokenized, tokens
from kd.speed import count_params

STUDENT_RECORD = "student.json"


# --- checks -----------------------------------------------------------------------------------


def student_tokenizer(cfg: StudentConfig, cache: Cache, prepared: Path) -> retokenized.Pair | None:
    """The student's own tokenizer (`tokenizer`, else its `init` directory's) with the
    teacher's, when it is not the teacher's; None when the student reads the teacher's tokens."""
    if cfg.tokenizer is not None:
        directory = Path(cfg.tokenizer)
    elif cfg.init not in (None, "teacher"):
        directory = Path(cfg.init)
    else:
        return None
    found = tokens.read_tokenizer(directory, f"{cfg.where}.tokenizer")
    if found.fingerprint == cache.manifest["text"]["tokenizer_sha256"]:
        return None
    return retokenized.pair(Path(prepared).resolve(), directory.resolve())


def check_tokenizer(cache: Cache, prepared: Path, splits: list[str]) -> None:
    """Refuse prepared splits cut with another tokenizer than the cache's (the teacher's), whatever
    the two vocabulary sizes: one line naming both."""
    ours = cache.manifest["text"]
    for split in splits:
        info = tokens.split_info(prepared / f"{split}.parquet")
        if info["tokenizer_sha256"] != ours["tokenizer_sha256"]:
            raise InputError(f"{prepared / f'{split}.parquet'}: prepared with another tokenizer than the cache's "
                             f"teacher: {lm.prepared_tokenizer_name(info)} vs the cache {cache.root}'s (sha256 "
                             f"{ours['tokenizer_sha256'][:12]}, vocabulary {ours['vocab_size']}); prepare the data "
                             "with the teacher's tokenizer (prepare.tokenizer)")


def check_token_student(cfg: StudentConfig, cache: Cache, prepared: Path, objective: str, allowed: tuple[str, ...],
                        unsupported: list[tuple[str, Any]]) -> None:
    """A token task's refusals: its architecture (a transformers model_type with the objective's
    head), its start (`check_init`), its loss methods, the keys it cannot use."""
    if cfg.section == "assistants":
        raise ConfigError(f"{cfg.where}: teacher assistants are for image students so far")
    if cfg.init in (None, "teacher"):
        lm.check_arch(cfg.arch, objective, cfg.where)
    check_init(cfg, cache, objective)
    if student_tokenizer(cfg, cache, prepared) is None:
        check_student_tokenizer(cfg, cache, prepared)
    elif objective != "causal":
        raise ConfigError(f"{cfg.where}.tokenizer: a student with another tokenizer than the teacher's is for "
                          f"causal LM students so far (this is a {objective} LM cache)")
    extra = [name for name in chosen(cfg.loss) if name not in allowed]
    if extra:
        raise ConfigError(f"{cfg.where}.loss: {', '.join(extra)} not supported for {objective} LM students yet "
                          f"({', '.join(allowed)})")
    for key, value in unsupported:
        if value:
            raise ConfigError(f"{cfg.where}.{key}: not supported for {objective} LM students yet")


def check_init(cfg: StudentConfig, cache: Cache, objective: str) -> None:
    """`init: teacher` needs the teacher's copy in the cache (`label.keep_teacher`); `init: DIR`
    a local pretrained LM of this objective, cut with the cache's tokenizer, whose model_type
    `arch` names (its config.json sets the rest: no `arch_kwargs`)."""
    if cfg.init is None:
        return
    if cfg.init == "teacher":
        if "teacher_files" not in cache.manifest:
            raise ConfigError(f"{cfg.where}.init: 'teacher' needs the teacher's weights in the cache; set "
                              "label.keep_teacher: true and run `kd label` again")
        return
    directory = Path(cfg.init)
    if not (directory / lm.CONFIG).is_file():
        raise MissingInputError(f"{cfg.where}.init: {directory / lm.CONFIG} not found (init is 'teacher', null or "
                                "a local pretrained model directory)")
    tokenizer = tokens.read_tokenizer(directory, "init directory's tokenizer")
    own = tokens.read_tokenizer(Path(cfg.tokenizer), f"{cfg.where}.tokenizer") if cfg.tokenizer else tokenizer
    if tokenizer.fingerprint != own.fingerprint:
        raise InputError(f"{cfg.where}.init: {tokenizer.describe()} has another tokenizer than the student's "
                         f"{own.describe()}; a student starts from a model of its own tokenizer (leave "
                         f"{cfg.where}.tokenizer empty to take the init directory's)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{directory}: cannot read its config ({str(exc).splitlines()[0]})") from None
    if config.model_type != cfg.arch:
        raise ConfigError(f"{cfg.where}.arch: {cfg.arch!r}, but init {directory} holds a {config.model_type!r}; "
                          "name its model_type")
    if cfg.arch_kwargs:
        raise ConfigError(f"{cfg.where}.arch_kwargs: set by {directory / lm.CONFIG} (a student started from a "
                          "pretrained directory keeps its architecture); leave it empty")
    if lm.objective(config) != objective:
        raise ConfigError(f"{cfg.where}.init: {directory} is a {lm.objective(config)} LM; a student of a "
                          f"{objective} LM cache must be one too")


def check_student_tokenizer(cfg: StudentConfig, cache: Cache, prepared: Path) -> None:
    """The student's directory must read back as the tokenizer its data was cut with. AutoTokenizer
    picks its class from the directory's model_type too: in transformers 5 a qwen2 directory
    always gets Qwen2Tokenizer, which rebuilds the pre-tokenizer from the vocabulary and adds a
    pad token. So the prepared tokenizer files are put beside the student's config and read
    back. (kd's own BPE has no tokenizer_config.json; transformers reads it as its model_type's
    class, as it always did.)"""
    if not (prepared / tokens.HF_TOKENIZER_CONFIG).is_file():
        return
    config, found = read_back(cfg, prepared)
    ours = cache.manifest["text"]
    if found.fingerprint != ours["tokenizer_sha256"]:
        raise ConfigError(f"{cfg.where}.arch: in a {config.model_type} directory transformers reads the teacher's "
                          f"tokenizer as {type(found.hf).__name__} (sha256 {found.fingerprint[:12]}, vocabulary "
                          f"{found.vocab_size}), another tokenizer than the cache {cache.root}'s (sha256 "
                          f"{ours['tokenizer_sha256'][:12]}, vocabulary {ours['vocab_size']}): the student would "
                          "not read its own text as it learned it; choose another model_type (the teacher's "
                          f"{cache.manifest['teacher']['config'].get('arch')} keeps it)")


def read_back(cfg: StudentConfig, tokenizer_dir: Path) -> tuple[Any, tokens.TokenizerDir]:
    """The student's config and the tokenizer of `tokenizer_dir` as AutoTokenizer reads it
    beside that config (`check_student_tokenizer`)."""
    if cfg.init in (None, "teacher"):
        config = AutoConfig.for_model(cfg.arch)
    else:
        config = AutoConfig.from_pretrained(cfg.init, local_files_only=True, trust_remote_code=False)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        for source in tokens.tokenizer_files(tokenizer_dir):
            shutil.copyfile(source, Path(tmp) / source.name)
        return config, tokens.read_tokenizer(Path(tmp), "student's tokenizer")


# --- building, saving -----------------------------------------------------------------------


def init_identity(cfg: StudentConfig, cache: Cache) -> Any:
    """What a student's start is, for its twin's key: the teacher copy's digests, the pretrained
    directory's fingerprint, or None (random)."""
    if cfg.init is None:
        return None
    return cache.manifest.get("teacher_files") if cfg.init == "teacher" else lm.fingerprint(Path(cfg.init))


def build_model(cfg: StudentConfig, cache: Cache, prepared: Path, objective: str) -> nn.Module:
    """A token task's student (seed torch first): `init: DIR` loaded from the directory (float32,
    on the CPU); otherwise `arch`/`arch_kwargs` built at random with the tokenizer's special ids
    and a vocabulary covering the tokenizer's and the teacher's ids, then with `init: teacher`
    started from the teacher's layers (the copy `label.keep_teacher` put in the cache)."""
    info = cache.manifest["text"]
    classes = max(info["vocab_size"], cache.manifest["num_classes"])
    if cfg.init not in (None, "teacher"):
        model = lm.load(Path(cfg.init))
        for key, least in (("vocab_size", classes), ("max_position_embeddings", info["block_size"])):
            if getattr(model.config, key, least) < least:
                raise ConfigError(f"{cfg.where}.init: {cfg.init} has {key} {getattr(model.config, key)}, fewer "
                                  f"than the cache needs ({least})")
        return model
    _, special = tokens.load_tokenizer(prepared)
    model = lm.build(cfg.arch, cfg.arch_kwargs, classes, info["block_size"], special, where=cfg.where,
                     objective=objective)
    if cfg.init == "teacher":
        with torch.random.fork_rng():  # loading the teacher's copy leaves the student's random stream alone
            start = teacher_start(cache)
        lm.init_from_teacher(model, start, where=f"{cfg.where}.init")
    return model


def teacher_start(cache: Cache) -> nn.Module:
    """The teacher's copy in the cache (`label.keep_teacher`), checked against the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        for rel, digest in cache.manifest["teacher_files"].items():
            blob = cache.store.read_bytes(cache.store.safe(rel))
            if hashlib.sha256(blob).hexdigest() != digest:
                raise CacheError(f"{cache.store.show(rel)}: sha256 differs from the manifest; run "
                                 f"`kd cache verify {cache.root}`")
            (Path(tmp) / Path(rel).name).write_bytes(blob)
        return lm.load(Path(tmp))


def save(directory: Path, model: nn.Module, cfg: StudentConfig, cache: Cache, record: dict[str, Any],
         prepared: Path) -> None:
    """A Hugging Face directory (weights, config, tokenizer: the student's own, or the prepared
    data's) plus `student.json`, the record."""
    own = student_tokenizer(cfg, cache, prepared)
    lm.save(directory, model.model, prepared if own is None else own.student.directory)
    write_json(directory / STUDENT_RECORD, {**record, "objective": cache.manifest["text"]["objective"]})


def load(directory: Path, spec: StudentConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A saved student as the teacher of `kd assistants`: for image students so far (`check`
    refuses a token student as an assistant before it is trained)."""
    raise ConfigError(f"{directory}: teacher assistants are for image students so far")


# --- evaluation -------------------------------------------------------------------------------


def evaluate_rows(student_dir: Path, cache: Cache, cfg: EvalConfig, wrap: Callable[[nn.Module], nn.Module],
                  x: torch.Tensor, truth: torch.Tensor, position: torch.Tensor,
                  score: Callable[[torch.Tensor, torch.Tensor], float], keys: Callable[..., dict[str, Any]],
                  seeds_as: tuple[str, str, Callable[[float, float], float]],
                  compare: Callable[[torch.Tensor, SoftTargets], tuple[torch.Tensor, SoftTargets]] | None = None,
                  teacher_x: torch.Tensor | None = None) -> tuple[dict[str, Any],
                                                                  dict[str, tuple[list[str], list[dict[str, Any]]]]]:
    """What every token task measures on the test rows: the student (wrapped by `wrap`) and its
    twin on the inputs `x`, one logits row per cache row with its `truth` and block `position`;
    `score(logits, truth)` for them and every further seed; the task's `keys(student score, twin
    score, per-row losses, the cache's test rows)`; `ece` and `baseline_ece` (the top-1 token's
    probability against whether it is the truth), with their mean and std over seeds
    (`ece_mean`, `ece_change_mean`: student minus twin, ...); `against_teacher`; the seed summary
    (`seeds_as`: the key, the change's key, the change). Plots: the mean loss of the student and
    its twin at each block position (how each uses its context), and one row per seed.
    `compare(logits, test rows)`: the student's rows and the teacher's they are measured against
    (a student of its own tokenizer: the rows that line up); by default row for row. `teacher_x`:
    the teacher's input for its speed, when it is not `x` (the same blocks in its own tokens)."""
    student = wrap(lm.load(student_dir))
    logits = predict(student, x, cfg.batch_size)
    twin_logits = predict(wrap(lm.load(student_dir / "baseline")), x, cfg.batch_size)
    losses = {"student": F.cross_entropy(logits, truth, reduction="none"),
              "baseline": F.cross_entropy(twin_logits, truth, reduction="none")}
    first, twin = score(logits, truth), score(twin_logits, truth)

    def ece(logits: torch.Tensor) -> float:  # calibration of the predicted token
        confidence, predicted = logits.softmax(1).max(1)
        return metrics.ece(confidence.numpy(), (predicted == truth).numpy(), cfg.ece_bins)

    seeds = [{"seed": read_json(student_dir / STUDENT_RECORD)["student"]["seed"], "student": first,
              "baseline": twin}]
    eces = [{"ece": ece(logits), "baseline_ece": ece(twin_logits)}]
    for seed, directory in evaluation.seed_dirs(student_dir, read_json(student_dir / STUDENT_RECORD)):
        seeds.append({"seed": seed})
        eces.append({})
        for who, path in (("student", directory), ("baseline", directory / "baseline")):
            seed_logits = predict(wrap(lm.load(path)), x, cfg.batch_size)
            seeds[-1][who] = score(seed_logits, truth)
            eces[-1]["ece" if who == "student" else "baseline_ece"] = ece(seed_logits)
    soft = cache.soft_targets("test", [1.0])
    key, change, paired = seeds_as
    compared, teacher_rows = (logits, soft) if compare is None else compare(logits, soft)
    record = {"objective": cache.manifest["text"]["objective"], **keys(first, twin, losses, soft), **eces[0],
              **metrics.seed_summary(eces, "ece", "ece_change", lambda s, b: s - b),
              **against_teacher(student, compared, x, teacher_rows, student_dir, cache, cfg,
                                teacher_copy(cache, wrap), teacher_x),
              **metrics.seed_summary([{key: r["student"], f"baseline_{key}": r["baseline"]} for r in seeds],
                                     key, change, paired)}
    flat = position.numpy()
    counts = np.bincount(flat)
    sums = {k: np.bincount(flat, v.double().numpy()) for k, v in losses.items()}
    return record, {"per_position.csv": (["position", "student", "baseline"],
                                         [{"position": int(p), **{k: float(sums[k][p] / counts[p]) for k in sums}}
                                          for p in np.flatnonzero(counts)]),
                    "seeds.csv": (["seed", "student", "baseline"], seeds)}


def token_summary(name: str, m: dict[str, Any], line: str, over: str) -> str:
    return (f"student {name}: {line}" + (f"; over {m['seeds']} seeds: {over}" if m["seeds"] > 1 else "")
            + f", agreement {m['agreement']:.4f}, KL {m['kl_to_teacher']:.4f}, {m['params']:,} params")


def teacher_copy(cache: Cache, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module | None:
    """A random-weight copy of the teacher's architecture (weights do not change its speed),
    seen row by row as `wrap` sees the student; None without the teacher's HF config."""
    teacher = cache.manifest["teacher"]["config"]
    if "hf_config" not in teacher:
        return None
    auto, _ = lm.HEADS[cache.manifest["text"]["objective"]]
    return wrap(auto.from_config(AutoConfig.for_model(**teacher["hf_config"])))


def against_teacher(student: nn.Module, logits: torch.Tensor, x: torch.Tensor, soft: SoftTargets,
                    student_dir: Path, cache: Cache, cfg: EvalConfig, teacher: nn.Module | None,
                    teacher_x: torch.Tensor | None = None) -> dict[str, Any]:
    """What every text student reports beside its own score: top-1 agreement with the cached
    teacher and KL at T=1 (top-k plus a tail bucket: a lower bound when k < V) against the test
    rows `soft` (with lse at T=1), one per row of `logits`; size; and tokens/s against the
    teacher's copy (`teacher_copy`), on the student's input `x` (the teacher on `teacher_x`, the
    same blocks in its tokens, when given)."""
    kl, exact = metrics.kl_to_teacher(logits, torch.tensor(soft.topk_idx, dtype=torch.long),
                                      torch.tensor(soft.topk_logit, dtype=torch.float32), torch.tensor(soft.lse[1.0]))
    with speed.torch_threads(cfg.threads):
        inputs = [x[:cfg.batch_size], (x if teacher_x is None else teacher_x)[:cfg.batch_size]]
        blocks_per_s = speed.throughputs([student] + ([teacher] if teacher is not None else []),
                                           inputs[:1 + (teacher is not None)], cfg.throughput_runs)
    return {
        "agreement": metrics.agreement(logits.argmax(1).numpy(), soft.topk_idx[:, 0]),
        "kl_to_teacher": kl, "kl_exact": exact,
        "kept_mass_t1": cache.manifest["fidelity"]["test"].get("t1", {}).get("kept_mass"),
        "top_k": cache.manifest["top_k"],
        "params": count_params(student), "teacher_params": cache.manifest["teacher"]["config"].get("params"),
        "size_bytes": (student_dir / lm.WEIGHTS).stat().st_size,
        "throughput_tokens_per_s": blocks_per_s[0] * x.shape[-1],
        "speedup_vs_teacher": blocks_per_s[0] / blocks_per_s[1] if len(blocks_per_s) > 1 else None,
        "test_tokens": len(logits),
    }


def predict(rows: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """One row of logits per predicted token of every block, in batches of blocks."""
    rows.eval()
    with torch.no_grad():
        return torch.cat([rows(chunk) for chunk in x.split(batch_size)])
