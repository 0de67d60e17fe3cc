"""Language models for text data: any transformers model_type with a causal or masked LM head.

`build` makes a model from a model_type (`AutoConfig.for_model`), its config keywords (the
Hugging Face config's own names: n_layer/n_head/n_embd for gpt2; num_hidden_layers/
hidden_size/num_attention_heads/intermediate_size for bert, llama, qwen2, gpt_neox ...) and the
prepared tokenizer's size and special ids, through the Auto class of its objective (`HEADS`).
`init_from_teacher` starts a shallower student from a teacher's layers. A model is kept as a
Hugging Face directory: `model.safetensors` (or shards listed in
`model.safetensors.index.json`), `config.json` (+ `generation_config.json`) and the tokenizer
files it reads, loaded with `from_pretrained(local_files_only=True, use_safetensors=True)` and
never `trust_remote_code`, so any local HF causal/masked LM directory loads the same way and no
file can run code. `load_teacher` loads one as `kd label`'s teacher, and `check_teacher` refuses
one that would read prepared data cut with another tokenizer. Training one is `kd.lm_training`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from kd.cache import Teacher
from kd.config import TEACHER_DEVICES
from kd.errors import ConfigError, InputError, MissingInputError
from kd.files import file_sha256, read_json
from kd.prepared import tokens
from kd.prepared.tokens import TOKENIZER_FILE, SpecialIds, tokenizer_files
from kd.speed import count_params

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
        raise ConfigError(f"{where}: the student's weights do not match the teacher's but for depth "
                          f"({first})") from None
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


def checkpointing(model: PreTrainedModel, on: bool) -> PreTrainedModel:
    """`model` with Hugging Face's gradient checkpointing (non-reentrant) when `on`: its layers'
    activations recomputed in the backward, not kept. Only in train mode; the weights alike."""
    if on:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it (transformers)")
        # transformers 5 renamed it (the old name warns until v6)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


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


def device_of(model: nn.Module) -> torch.device:
    """Where a model's weights are (the teacher's `label.device`)."""
    return next(model.parameters()).device


def hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """A layer's hidden states (B, L, H) from its output (a tensor, or a tuple starting with it)."""
    return output[0] if isinstance(output, tuple) else output


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
        model = HEADS[objective(config)][0].from_pretrained(directory, local_files_only=True, use_safetensors=True,
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


# --- a text teacher ---------------------------------------------------------------------------


def load_teacher(directory: Path, arch: str | None = None, arch_kwargs: dict | None = None, *,
                 dtype: str = "auto", device: str = "auto") -> Teacher:
    """A Hugging Face language model directory (causal or masked; `dtype` a `DTYPES` name,
    `device` auto|cpu|cuda), with the fingerprint that identifies it, its tokenizer's (which
    the prepared data must have been cut with) and its provenance and test scores when
    `kd teacher` made it."""
    tokenizer = tokens.read_tokenizer(directory, "teacher's tokenizer")
    model = load(directory, dtype=dtype, device=resolve_device(device))
    config = {"arch": model.config.model_type, "objective": objective(model), "params": count_params(model),
              "vocab_size": model.config.vocab_size, "hf_config": model.config.to_dict(),
              "tokenizer": {"sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    for name in ("training", "metrics"):
        if (directory / f"{name}.json").is_file():
            config[name] = read_json(directory / f"{name}.json")
    files = tuple(path.name for path in weight_files(directory)) + (CONFIG,)
    return Teacher(model, fingerprint(directory), config, directory, files)


def check_teacher(teacher: Teacher, prepared: Path, infos: dict[str, dict[str, Any]], who: str = "teacher") -> None:
    """Refuse a teacher (or another model that reads them: `who` names it in messages) that would
    read the ids of these prepared splits (`tokens.split_info` by name) as other tokens: data
    prepared with another tokenizer (whatever the two vocabulary sizes), or an id past its vocabulary."""
    tokenizer = teacher.config.get("tokenizer")
    if tokenizer is None:
        raise InputError(f"{teacher.directory}: not a language model (no tokenizer beside it); the text in "
                         f"{prepared} needs one")
    for split, info in infos.items():
        if info["tokenizer_sha256"] != tokenizer["sha256"]:
            raise InputError(f"{prepared / f'{split}.parquet'}: prepared with another tokenizer than the "
                             f"{who}'s: {prepared_tokenizer_name(info)} vs the {who}'s "
                             f"{teacher.directory} (sha256 {tokenizer['sha256'][:12]}, vocabulary "
                             f"{tokenizer['vocab_size']}); run `kd prepare` with prepare.tokenizer: "
                             f"{teacher.directory}")
    vocab = teacher.config["vocab_size"]
    for split in infos:
        largest = tokens.max_token(prepared / f"{split}.parquet")
        if largest >= vocab:
            raise InputError(f"{prepared / f'{split}.parquet'}: token id {largest} is outside the {who}'s "
                             f"vocabulary of {vocab} ids ({teacher.directory})")


def prepared_tokenizer_name(info: dict[str, Any]) -> str:
    """For messages: the tokenizer a prepared split was cut with (`tokens.split_info`)."""
    source = info["tokenizer_source"] or "the BPE `kd prepare` trained"
    return f"{source} (sha256 {info['tokenizer_sha256'][:12]}, vocabulary {info['vocab_size']})"

