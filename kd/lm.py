"""Language models for text data: any transformers model_type with a causal or masked LM head.

`build` makes a model from a model_type (`AutoConfig.for_model`), its config keywords (the
Hugging Face config's own names: n_layer/n_head/n_embd for gpt2; num_hidden_layers/
hidden_size/num_attention_heads/intermediate_size for bert, llama, qwen2, gpt_neox ...) and the
prepared tokenizer's size and special ids, through the Auto class of its objective (`HEADS`).
`init_from_teacher` starts a shallower student from a teacher's layers. `fit` trains a model on
token blocks (AdamW, one-cycle schedule, batches a pure function of (seed, epoch), as
`training.fit`); `evaluate` gives its loss and its task's score; `train_teacher` is
`kd teacher` on text data. What depends on the objective (the inputs and labels of a batch,
the head, the score, the Auto class) is asked of the model's task (`kd.tasks.causal_lm`
/ `masked_lm`). A model is kept as a Hugging Face directory: `model.safetensors` (or shards
listed in `model.safetensors.index.json`), `config.json` (+ `generation_config.json`) and the
tokenizer files it reads, loaded with `from_pretrained(local_files_only=True,
use_safetensors=True)` and never `trust_remote_code`, so any local HF causal/masked LM
directory loads the same way and no file can run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from kd.prepared import tokens as text
from kd.config import TEACHER_DEVICES, TeacherConfig, as_dict
from kd.errors import ConfigError, InputError, MissingInputError
from kd.files import file_sha256
from kd.speed import count_params
from kd.prepared.tokens import TOKENIZER_FILE, SpecialIds, tokenizer_files

WEIGHTS, CONFIG = "model.safetensors", "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint: shard names in its weight_map
# label.dtype -> what from_pretrained is given ("auto": the dtype the config names)
DTYPES: dict[str, Any] = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                          "float16": torch.float16}
DEVICES = TEACHER_DEVICES
# objective -> (the Auto class that builds a model with that head, transformers' model_type -> class name)
HEADS: dict[str, tuple[Any, dict[str, str]]] = {
    "causal": (AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "masked": (AutoModelForMaskedLM, MODEL_FOR_MASKED_LM_MAPPING_NAMES),
}
EXAMPLES = {"causal": "gpt2, llama, qwen2, gpt_neox", "masked": "bert, roberta"}  # for messages
# BERT's masking: 15% of the (non-special) tokens are predicted; of those 80% become [MASK],
# 10% a random token and 10% stay as they are.
MASK_PROB, MASK_AS_MASK, MASK_AS_RANDOM = 0.15, 0.8, 0.1
CLIP_NORM = 1.0  # gradient-norm clipping, as Hugging Face's Trainer does by default
SET_BY_DATA = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def arch_objective(arch: str) -> str:
    """The objective `kd teacher` trains a model_type for: masked when transformers has a
    masked-LM head for it (bert, roberta, ...), causal otherwise (gpt2, llama, ...)."""
    return "masked" if arch in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "causal"


def check_arch(arch: str, objective: str, where: str) -> None:
    """`arch` must be a transformers model_type with the objective's LM head; one line otherwise."""
    auto, heads = HEADS[objective]
    if arch not in heads:
        try:
            AutoConfig.for_model(arch)
            what = f"a transformers model_type without a {objective} LM head ({auto.__name__})"
        except ValueError:
            what = "not a transformers model_type"
        raise ConfigError(f"{where}.arch: {arch!r} is {what}; a student of a {objective} LM cache must be "
                          f"{EXAMPLES[objective]} or another model_type with a {objective} LM head")


def build(arch: str, arch_kwargs: dict[str, Any], vocab_size: int, block_size: int, special: SpecialIds,
          where: str = "teacher", objective: str | None = None) -> PreTrainedModel:
    """A freshly initialised `objective` LM (seed torch first): `AutoConfig.for_model(arch,
    **arch_kwargs)` with the vocabulary and special ids of the tokenizer, through the Auto class
    of the objective (`HEADS`; None: `arch_objective`). The context length defaults to block_size."""
    if objective is None:
        if not any(arch in heads for _, heads in HEADS.values()):
            raise ConfigError(f"{where}.arch: {arch!r} is not a transformers model_type with a language-model "
                              "head; text data needs one (e.g. gpt2, bert, llama, qwen2, gpt_neox)")
        objective = arch_objective(arch)
    check_arch(arch, objective, where)
    defaults = AutoConfig.for_model(arch)
    for key in arch_kwargs:
        if key in SET_BY_DATA:
            raise ConfigError(f"{where}.arch_kwargs.{key}: set from the prepared tokenizer, not by hand")
        if not hasattr(defaults, key):
            raise ConfigError(f"{where}.arch_kwargs.{key}: not a {type(defaults).__name__} field")
    positions = type(defaults).attribute_map.get("max_position_embeddings", "max_position_embeddings")
    given = {positions, "max_position_embeddings"} & set(arch_kwargs)
    sized = {} if given or not hasattr(defaults, positions) else {positions: block_size}
    try:
        config = AutoConfig.for_model(arch, **{**sized, **arch_kwargs}, vocab_size=vocab_size,
                                      bos_token_id=special.eos if special.bos is None else special.bos,
                                      eos_token_id=special.eos, pad_token_id=special.pad)
        model = HEADS[objective][0].from_config(config)
    except (ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(f"{where}.arch_kwargs: {arch_kwargs} do not make a {arch} ({exc})") from None
    if hasattr(config, positions) and getattr(config, positions) < block_size:
        raise ConfigError(f"{where}.arch_kwargs.{positions}: {getattr(config, positions)} is shorter than "
                          f"the blocks ({block_size} tokens)")
    return model


def init_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel, where: str = "init") -> list[int]:
    """DistilBERT's start, for any transformers LM: the student takes the teacher's embeddings,
    head and one layer in every N_teacher / N_student (every other layer for half the depth).
    Returns the teacher layers taken. The two must share everything but the number of layers;
    the layers are the one ModuleList of num_hidden_layers blocks (`layer_stack`)."""
    s, t = student.config, teacher.config
    if type(student) is not type(teacher):
        raise ConfigError(f"{where}: a {type(student).__name__} cannot start from a {type(teacher).__name__}")
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size", "max_position_embeddings"):
        if getattr(s, key, None) != getattr(t, key, None):
            raise ConfigError(f"{where}: the student's {key} is {getattr(s, key)}, the teacher's {getattr(t, key)}; "
                              "a student that starts from the teacher's layers must match it but for depth")
    if s.num_hidden_layers > t.num_hidden_layers:
        raise ConfigError(f"{where}: the student has {s.num_hidden_layers} layers, the teacher only "
                          f"{t.num_hidden_layers}")
    taken = [i * t.num_hidden_layers // s.num_hidden_layers for i in range(s.num_hidden_layers)]
    stack = layer_stack(teacher) + "."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(stack):
            index, rest = key[len(stack):].split(".", 1)
            if int(index) not in taken:
                continue
            key = f"{stack}{taken.index(int(index))}.{rest}"
        state[key] = value
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ConfigError(f"{where}: the student's weights do not match the teacher's but for depth ({first})") from None
    return taken


def layer_stack(model: PreTrainedModel) -> str:
    """The name of a model's stack of layers: its one ModuleList of num_hidden_layers modules
    (`bert.encoder.layer`, `model.layers`, `transformer.h`, `gpt_neox.layers`, ...)."""
    depth = model.config.num_hidden_layers
    found = [name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)
             and len(module) == depth and name]
    if len(found) != 1:
        raise ConfigError(f"{type(model).__name__}: cannot tell its stack of {depth} layers "
                          f"({', '.join(found) or 'no ModuleList of that length'})")
    return found[0]


def objective(model: PreTrainedModel | PretrainedConfig) -> str:
    """"causal" or "masked", from the model class the config names."""
    config = model if isinstance(model, PretrainedConfig) else model.config
    names = config.architectures or [type(model).__name__]
    if any(n.endswith("ForMaskedLM") for n in names):
        return "masked"
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return "causal"
    raise InputError(f"model class {names}: neither a causal LM (...ForCausalLM, ...LMHeadModel) nor a masked "
                     "LM (...ForMaskedLM)")


# --- losses -----------------------------------------------------------------------------------


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


def _task(model: PreTrainedModel | PretrainedConfig) -> Any:
    """The task module of a model's objective (`kd.tasks`): what it predicts and how it is scored."""
    from kd import tasks  # (the tasks import this module)

    return tasks.get(tasks.OBJECTIVES[objective(model)])


def token_losses(model: PreTrainedModel, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per predicted token: (cross-entropy (P,), the model's argmax (P,), the target (P,)).

    The task gives the logits of the predicted positions (a BERT's head runs on the masked ones
    only: the same numbers, a fraction of the head's cost)."""
    keep = labels != -100
    logits = _task(model).token_logits(model, inputs, keep)  # (P, V)
    targets = labels[keep]
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1), targets


# --- training and evaluation ------------------------------------------------------------------


def fit(model: PreTrainedModel, tokens: torch.Tensor, special: SpecialIds, *, epochs: int, batch_size: int,
        lr: float, weight_decay: float, seed: int, desc: str = "lm", progress: bool = True,
        predicted: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Train on blocks (N, L) in place; the per-epoch log (mean loss per predicted token).
    `predicted` (N, L - 1) bool: the only positions taught (instruction data's responses)."""
    task = _task(model)
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
            inputs, labels = task.lm_inputs(tokens[rows], special, model.config.vocab_size, g)
            losses, _, _ = token_losses(model, inputs, only(labels, None if predicted is None else predicted[rows]))
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
    """The loss per predicted token and the task's score of it (causal: perplexity; masked:
    accuracy on the masked tokens, the masks drawn from `seed`: the same masks every run);
    `predicted` as in `fit`."""
    task = _task(model)
    # every mask drawn at once: the same masks whatever the batch size
    inputs, labels = task.lm_inputs(tokens, special, model.config.vocab_size, torch.Generator().manual_seed(seed))
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
    return {"loss": loss, **task.lm_score(loss, correct / count)}


def train_teacher(cfg: TeacherConfig, prepared: Path, *,
                  progress: bool = True) -> tuple[PreTrainedModel, dict[str, Any], dict[str, Any]]:
    """The teacher on the labeled blocks: (model, provenance to save beside it, test metrics).

    `cfg.shift` (an image augmentation) does not apply to text.
    """
    _, train = text.read_blocks(prepared / "labeled.parquet")
    _, test = text.read_blocks(prepared / "test.parquet")
    info = text.split_info(prepared / "labeled.parquet")
    _, special = text.load_tokenizer(prepared)
    torch.manual_seed(cfg.seed)
    model = build(cfg.arch, cfg.arch_kwargs, info["vocab_size"], info["block_size"], special)
    if info["response_only"] and objective(model) != "causal":
        raise ConfigError(f"teacher.arch: {cfg.arch} is a masked LM; instruction data ({prepared}: responses only) "
                          "is for causal LMs")
    masks = {split: text.predicted(prepared / f"{split}.parquet") for split in ("labeled", "test")}
    masks = {split: None if m is None else torch.from_numpy(m) for split, m in masks.items()}
    log = fit(model, torch.from_numpy(train), special, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, desc="teacher", progress=progress,
              predicted=masks["labeled"])
    scores = evaluate(model, torch.from_numpy(test), special, cfg.batch_size, seed=cfg.seed, predicted=masks["test"])
    kind = objective(model)
    metrics = {"objective": kind, "test_loss": scores["loss"], "train_loss": log[-1]["loss"], "epochs": len(log),
               "params": count_params(model), "train_tokens": int(train.size), "test_tokens": int(test.size)}
    metrics |= _task(model).teacher_scores(scores, train, test, info["vocab_size"], masks["labeled"], masks["test"])
    provenance = {"arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "objective": kind, "training": as_dict(cfg),
                  "data": {k: info[k] for k in ("dataset", "block_size", "vocab_size", "tokenizer_sha256")}}
    return model, provenance, metrics


# --- saving and loading -----------------------------------------------------------------------


def save(directory: Path, model: PreTrainedModel, tokenizer: Path) -> None:
    """The Hugging Face directory: safetensors weights, config.json and a copy of the tokenizer
    files of the directory `tokenizer` (or of the one file `tokenizer`, kd's own BPE)."""
    transformers.utils.logging.disable_progress_bar()  # (a "writing shards" bar on every save otherwise)
    model.save_pretrained(directory)
    for source in ([tokenizer] if Path(tokenizer).is_file() else tokenizer_files(tokenizer)):
        shutil.copyfile(source, Path(directory) / Path(source).name)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors weights of a model directory: model.safetensors, or the index of a
    sharded checkpoint followed by every shard it names (sorted)."""
    directory = Path(directory)
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    index = directory / WEIGHTS_INDEX
    if not index.is_file():
        raise MissingInputError(f"{directory / WEIGHTS}: not found, nor a sharded {WEIGHTS_INDEX} (expected a "
                                "Hugging Face model directory saved with safetensors)")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{index}: not a safetensors index (expected a weight_map of tensor -> shard file)") from None
    for shard in shards:
        if Path(shard).name != shard or not (directory / shard).is_file():
            raise MissingInputError(f"{directory / shard}: a shard that {WEIGHTS_INDEX} names is missing")
    return [index, *(directory / shard for shard in shards)]


def resolve_device(device: str, where: str = "label.device") -> str:
    """"auto" -> cuda when torch sees a GPU, else cpu; "cuda" without one is refused."""
    if device not in DEVICES:
        raise ConfigError(f"{where}: {device!r} must be one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{where}: cuda, but torch sees no GPU here (use auto or cpu)")
    return device


def load(directory: Path, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """A local HF causal or masked LM (ours or a user's, single or sharded safetensors), in eval
    mode, in `dtype` (a DTYPES name) on `device`; never downloads, never runs the directory's code."""
    directory = Path(directory)
    transformers.utils.logging.set_verbosity_error()  # no per-load progress bars or advice on stderr
    transformers.utils.logging.disable_progress_bar()
    if not (directory / CONFIG).is_file():
        raise MissingInputError(f"{directory / CONFIG}: not found (expected a Hugging Face model directory)")
    weight_files(directory)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        model = _task(config).AUTO_MODEL.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                         trust_remote_code=False, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise InputError(f"{directory}: cannot load the model ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model.to(device)


def fingerprint(directory: Path) -> str:
    """sha256 over the weights (every shard, and the index), the config and the tokenizer files:
    what identifies a text teacher (the file digests in that order, the tokenizer's in
    TOKENIZER_FILES order)."""
    digest = hashlib.sha256()
    tokenizers = tokenizer_files(directory)
    if not tokenizers:
        raise MissingInputError(f"{Path(directory) / TOKENIZER_FILE}: not found (a text teacher keeps its tokenizer "
                                "beside its weights)")
    for path in [*weight_files(directory), Path(directory) / CONFIG, *tokenizers]:
        if not path.is_file():
            raise MissingInputError(f"{path}: not found (expected a Hugging Face model directory)")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()
