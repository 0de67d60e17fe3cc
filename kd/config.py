"""Typed configs for every stage, read from one section of params.yaml each.

A stage reads only its own section (`students` entries are read one at a time, by name).
Unknown keys are an error that names the key with its dotted path; values are checked
where they are read, so a bad temperature fails before any work is done.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd import augment, methods
from kd.errors import ConfigError, MissingInputError

SECTIONS = ("paths", "prepare", "teacher", "generate", "label", "assistants", "students", "text_students",
            "mlm_students", "img_students", "gen_students", "eval", "on_policy")
# `text_students`, `mlm_students`, `img_students` and `gen_students` are `students` under other
# names, for params_text.yaml, params_mlm.yaml, params_images.yaml and params_gen.yaml: dvc.yaml
# imports them next to params.yaml (for their foreach), and DVC would merge sections of one name.
STUDENT_SECTIONS = ("students", "text_students", "mlm_students", "img_students", "gen_students")
FEATURE_MODES = ("full", "pooled", "attention")
LOGIT_DTYPES = ("float16", "float32")
# The metadata of a field set by kd, not by the user: left out of the keys an error lists.
INTERNAL = {"internal": True}
ENCODINGS = ("topk", "compact")  # label.encoding: kd/cache/encoding.py
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")  # the keys of lm.DTYPES
TEACHER_DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16-mixed")  # a text model's training precision (kd.training.autocast)
SPLITS = ("labeled", "unlabeled", "test")


@dataclass
class Shares:
    """Text only: each split's share of the corpus's characters, dealt in whole documents."""

    labeled: float = 0.7
    unlabeled: float = 0.2
    test: float = 0.1


@dataclass
class PrepareConfig:
    # mnist5k | digits | mnist1d | shapes | pydoc | an image folder | a .parquet, .txt or .jsonl file
    dataset: str = "mnist5k"
    input_shape: list[int] | None = None  # required for a Parquet file whose metadata lacks it
    # encoded images only (an image folder, a Parquet `image` column): resize to [size] or
    # [height, width]; the normalisation recorded beside the uint8 pixels (null: the labeled
    # split's per-channel statistics)
    image_size: list[int] | None = None
    # images: convert to this many channels (1 or 3: what the model's first layer wants, e.g. 3
    # for a torchvision factory on grayscale digits); null keeps the data's own
    channels: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    # how their pixels are stored: `pixels` (uint8 `x`, zstd) or `png` (an `image` column of
    # lossless PNG bytes, decoded by the readers: about the size of PNG files, 0.7x of `pixels`)
    store: str = "pixels"
    # samples per split; for text, blocks of block_size tokens (null: every block of the split;
    # for images, the whole of a split the source names). `kd prepare` on text data takes null
    # for a size its params file leaves out.
    labeled: int | None = 1000
    unlabeled: int | None = 3000
    test: int | None = 1000
    samples: int = 5000  # mnist1d and addition only: how many digits (sums) to generate
    seed: int = 0
    # text only (pydoc, a .txt file, a Parquet file with a text column); image datasets ignore them
    text_column: str = "text"  # the Parquet column (or JSON Lines field) holding one document per row
    # instruction data instead: a prompt and its response per row, or a chat (a list of
    # {role, content}, rendered with the tokenizer's chat template; the assistant turns are the
    # responses). Only response tokens are predicted: cache rows and losses cover them alone.
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    shares: Shares = field(default_factory=Shares)
    tokenizer: str | None = None  # a local Hugging Face model or tokenizer directory; null: train a BPE
    # a regex: keep only the documents (examples) whose first line it matches, AFTER they are
    # dealt to the splits, so a subset's test documents are test documents of the whole
    keep: str | None = None
    vocab_size: int = 4096  # byte-level BPE entries, special tokens included (ignored with `tokenizer`)
    block_size: int = 128  # tokens per row


@dataclass
class TeacherConfig:
    arch: str = "cnn"  # a name in kd.tasks.image_models.ARCHITECTURES or package.module:factory
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    shift: int = 2  # random-shift augmentation, in pixels (0 = off)
    # or label's crop_flip recipe, a fresh view per image and epoch (the view_* keys as in label)
    view_recipe: str = "shift"
    view_scale: list[float] | None = None
    view_ratio: list[float] | None = None
    view_flip: float | None = None
    seed: int = 0
    # text teachers: fp32 | bf16-mixed (bfloat16 autocast around the forwards, float32 weights and
    # loss maths), and Hugging Face's gradient checkpointing (activations recomputed in the backward)
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_budget("teacher", self)
        if self.shift < 0:
            raise ConfigError(f"teacher.shift: {self.shift} must be >= 0")
        check_view_recipe(self, "teacher")


PART_ROWS = 16384  # cache rows a part holds when label.part_size is null


@dataclass
class LabelConfig:
    # the teacher's architecture when its config.json cannot name it: package.module:factory
    # (null: the one its config.json names; built-in or Hugging Face only)
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None  # null: the config.json's (for the same arch)
    top_k: int = 5
    temperatures: list[float] = field(default_factory=lambda: [1, 4])
    logit_dtype: str = "float16"  # topk_logit's dtype (encoding topk)
    # how the top-k is stored: topk (ids and logits as they are) | compact (ids as gaps, logits in
    # one byte each, decoded by the reader; kd/cache/encoding.py)
    encoding: str = "topk"
    # sampled targets: per row and cached temperature, this many tokens drawn from the teacher's
    # full distribution, stored with counts and the teacher's entropy (null: none;
    # kd/cache/sampling.py), the draws seeded by sampling_seed and the row alone
    sampling: int | None = None
    sampling_seed: int = 0
    features: dict[str, str] = field(default_factory=dict)  # teacher layer -> mode
    views: int = 0  # augmented views per sample besides view 0 (the input as is)
    view_recipe: str = "shift"  # how a view is drawn (kd.augment): shift | crop_flip
    view_shift: int = 2  # shift: random shift of up to this many pixels
    # crop_flip (images): random resized crop of an area fraction in view_scale and an aspect
    # ratio (width / height) in view_ratio, then a horizontal flip with probability view_flip
    # (null: [0.35, 1.0], [3/4, 4/3], 0.5; set only with crop_flip)
    view_scale: list[float] | None = None
    view_ratio: list[float] | None = None
    view_flip: float | None = None
    view_seed: int = 0
    batch_size: int = 256
    # samples per Parquet part (and per resume step); null: about PART_ROWS cache rows' worth
    # (16,384 images, or 129 blocks of 128 tokens), so a streamed student holds little
    part_size: int | None = None
    keep_teacher: bool = False  # copy the teacher's weights into the cache (students with init: teacher)
    # a language-model teacher's dtype (auto: its config's) and device (auto: cuda when there is one)
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in TEACHER_DTYPES:
            raise ConfigError(f"label.dtype: {self.dtype!r} must be one of {', '.join(TEACHER_DTYPES)}")
        if self.device not in TEACHER_DEVICES:
            raise ConfigError(f"label.device: {self.device!r} must be one of {', '.join(TEACHER_DEVICES)}")
        if self.top_k < 1:
            raise ConfigError(f"label.top_k: {self.top_k} must be >= 1")
        for t in self.temperatures:
            if not isinstance(t, (int, float)) or t <= 0:
                raise ConfigError(f"label.temperatures: {t!r} must be a number > 0")
        if len(set(map(float, self.temperatures))) != len(self.temperatures):
            raise ConfigError(f"label.temperatures: {self.temperatures} has a duplicate")
        if self.logit_dtype not in LOGIT_DTYPES:
            raise ConfigError(f"label.logit_dtype: {self.logit_dtype!r} must be one of {LOGIT_DTYPES}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"label.encoding: {self.encoding!r} must be one of {ENCODINGS}")
        if self.sampling is not None and (isinstance(self.sampling, bool) or not isinstance(self.sampling, int)
                                          or not 1 <= self.sampling <= 65535):
            raise ConfigError(f"label.sampling: {self.sampling!r} must be null or a number of draws in [1, 65535]")
        if self.sampling_seed < 0:
            raise ConfigError(f"label.sampling_seed: {self.sampling_seed} must be >= 0")
        for layer, mode in self.features.items():
            if mode not in FEATURE_MODES:
                raise ConfigError(f"label.features.{layer}: mode {mode!r} must be one of {FEATURE_MODES}")
        for key in ("views", "view_shift"):
            if getattr(self, key) < 0:
                raise ConfigError(f"label.{key}: {getattr(self, key)} must be >= 0")
        check_view_recipe(self, "label")
        for key in ("batch_size", "part_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"label.{key}: {getattr(self, key)} must be >= 1")


@dataclass
class GenerateConfig:
    """`kd generate`: the teacher answers the prompts of one prepared split (instruction data)."""

    split: str = "unlabeled"  # the split whose responses the teacher rewrites
    max_new_tokens: int = 64  # per response, its eos included (and never past the block)
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only: the smallest set of tokens holding this much probability
    samples: int = 1  # responses per prompt (more than 1 needs do_sample)
    seed: int = 0  # a response's draws come from (seed, example id, sample index) alone
    batch_size: int = 32  # prompts per batched forward
    part_size: int = 256  # prompts per part file (the resume step)
    # keep a response only if its mean token log-probability under the teacher is at least this
    # (null: keep every response)
    min_logprob: float | None = None
    dtype: str = "auto"  # the teacher's dtype and device, as in label
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"generate.split: {self.split!r} must be one of {', '.join(SPLITS)}")
        for key in ("max_new_tokens", "samples", "batch_size", "part_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"generate.{key}: {getattr(self, key)} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"generate.temperature: {self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p: {self.top_p} must be in (0, 1]")
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0):
            raise ConfigError(f"generate.do_sample: false (greedy), but temperature {self.temperature} and top_p "
                              f"{self.top_p} are for sampling; set do_sample: true or leave them at 1")
        if self.samples > 1 and not self.do_sample:
            raise ConfigError(f"generate.samples: {self.samples} responses per prompt need do_sample: true "
                              "(greedy decoding gives one)")
        if self.min_logprob is not None and self.min_logprob > 0:
            raise ConfigError(f"generate.min_logprob: {self.min_logprob} must be <= 0 (a mean log-probability), "
                              "or null to keep every response")
        if self.dtype not in TEACHER_DTYPES:
            raise ConfigError(f"generate.dtype: {self.dtype!r} must be one of {', '.join(TEACHER_DTYPES)}")
        if self.device not in TEACHER_DEVICES:
            raise ConfigError(f"generate.device: {self.device!r} must be one of {', '.join(TEACHER_DEVICES)}")


VIEW_RECIPES = ("shift", "crop_flip")


def check_view_recipe(cfg: Any, where: str) -> None:
    """`view_recipe` and the keys of its recipe (cfg: a LabelConfig or TeacherConfig)."""
    if cfg.view_recipe not in VIEW_RECIPES:
        raise ConfigError(f"{where}.view_recipe: {cfg.view_recipe!r} must be one of {VIEW_RECIPES}")
    for key in augment.CROP_FLIP_DEFAULTS:
        value = getattr(cfg, key)
        if value is not None and cfg.view_recipe != "crop_flip":
            raise ConfigError(f"{where}.{key}: {value} is for view_recipe crop_flip, not {cfg.view_recipe!r}")
    for key in ("view_scale", "view_ratio"):
        pair = getattr(cfg, key)
        if pair is not None and (len(pair) != 2 or not 0 < pair[0] <= pair[1]):
            raise ConfigError(f"{where}.{key}: {pair} must be [low, high] with 0 < low <= high")
    if cfg.view_scale is not None and cfg.view_scale[1] > 1:
        raise ConfigError(f"{where}.view_scale: {cfg.view_scale} must be at most 1 (a fraction of the image's area)")
    if cfg.view_flip is not None and not 0 <= cfg.view_flip <= 1:
        raise ConfigError(f"{where}.view_flip: {cfg.view_flip} must be a probability in [0, 1]")


class LossConfig:
    """`students.NAME.loss`: one optional section per loss method (None: not used), its
    fields derived from the registry `methods.METHODS` by `loss_config`, so that a method is a
    key here once it is registered there. This base holds what every such config does."""

    def teacher_layers(self, where: str) -> dict[str, tuple[str, ...]]:
        """Teacher layer -> the cache modes that serve every method using it (preferred first)."""
        layers: dict[str, tuple[str, ...]] = {}
        for name, term in methods.chosen(self).items():
            for layer, modes in term.teacher_layers():
                both = tuple(m for m in layers.get(layer, modes) if m in modes)
                if not both:
                    raise ConfigError(f"{where}.loss.{name}: teacher layer {layer!r} is needed in modes "
                                      f"{layers[layer]} by another term and {modes} by this one")
                layers[layer] = both
        return layers


def loss_config() -> type:
    """The dataclass of `students.NAME.loss` for the methods registered now: a LossConfig with
    one field per method in METHODS' order, its module's CONFIG or None (the default)."""
    return _loss_config(tuple((name, module.CONFIG) for name, module in methods.METHODS.items()))


@functools.cache
def _loss_config(registered: tuple[tuple[str, type], ...]) -> type:
    # one class per registry state, so that configs read under the same registry compare equal
    return dataclasses.make_dataclass("LossConfig", [(name, config | None, field(default=None))
                                                     for name, config in registered],
                                      bases=(LossConfig,), namespace={"__module__": __name__})


@dataclass
class ParallelConfig:
    """`students.NAME.parallel`, under torchrun: `strategy` ddp (each rank holds the whole model) or
    fsdp (language models; each rank holds 1/N of every weight, gradient and AdamW state: FSDP2)."""
    strategy: str = "ddp"


@dataclass
class StudentConfig:
    """A student (or a teacher assistant: the same schema under `assistants`)."""

    name: str = field(default="", metadata=INTERNAL)  # the mapping key, set by `student()`
    # a STUDENT_SECTIONS name or "assistants", set by `student()`
    section: str = field(default="students", metadata=INTERNAL)
    arch: str = "mlp"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    repeats: int = 1  # train seeds seed, seed+1, ... seed+repeats-1 (for mean +- std)
    # learn from this assistant's cache instead of the teacher's (an assistant may name another:
    # a chain teacher -> assistant -> assistant -> student)
    assistant: str | None = None
    transfer: list[str] = field(default_factory=lambda: ["labeled", "unlabeled"])
    views: bool = False  # draw each epoch among the cached views of a sample
    # language models: "teacher" (its layers, one in every N; label.keep_teacher), a local pretrained
    # directory (its tokenizer is the student's), or null (random)
    init: str | None = None
    # causal LMs: the student's own tokenizer (a directory: kd's tokenizer.json or a Hugging Face
    # one); null: the init directory's, else the teacher's. Another than the teacher's learns from
    # the cache through the text (loss terms mapped, uld)
    tokenizer: str | None = None
    # language models: fp32 | bf16-mixed (bfloat16 autocast around the forwards, float32 weights and
    # loss maths), and Hugging Face's gradient checkpointing; the baseline twin trains the same way
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    loss: LossConfig = field(default_factory=lambda: loss_config()())
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def where(self) -> str:
        """The entry's dotted key in params.yaml, for messages."""
        return f"{self.section}.{self.name}"

    def __post_init__(self) -> None:
        where = self.where
        if self.section == "assistants" and self.assistant == self.name:
            raise ConfigError(f"{where}.assistant: an assistant cannot learn from itself")
        if self.init is not None and not self.init.strip():
            raise ConfigError(f"{where}.init: {self.init!r} must be 'teacher' (start from the teacher's layers, "
                              "one in every N_teacher / N_student), the path of a local pretrained model directory "
                              "or null (random)")
        for split in self.transfer:
            if split not in ("labeled", "unlabeled"):
                raise ConfigError(f"{where}.transfer: {split!r} must be 'labeled' or 'unlabeled'")
        if not self.transfer:
            raise ConfigError(f"{where}.transfer: must name at least one split")
        terms = methods.chosen(self.loss)
        if not terms:
            raise ConfigError(f"{where}.loss: needs at least one term ({', '.join(methods.METHODS)})")
        for name, term in terms.items():
            term.check(f"{where}.loss.{name}")
        if self.parallel.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"{where}.parallel.strategy: {self.parallel.strategy!r} must be ddp or fsdp")
        if self.repeats < 1:
            raise ConfigError(f"{where}.repeats: {self.repeats} must be >= 1")
        if self.assistant is not None and self.loss.teacher_layers(where):
            raise ConfigError(f"{where}.assistant: an assistant's cache holds no features; feature terms "
                              f"({', '.join(methods.of_kind('feature'))}) learn from the teacher's cache only")
        self.loss.teacher_layers(where)  # conflicting modes for one teacher layer
        check_budget(where, self)


def check_budget(where: str, cfg: TeacherConfig | StudentConfig) -> None:
    """The training budget every trained model shares: epochs, batch size, lr, weight decay; and
    its precision (PRECISIONS)."""
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"{where}.precision: {cfg.precision!r} must be one of {', '.join(PRECISIONS)}")
    for key in ("epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{where}.{key}: {getattr(cfg, key)} must be >= 1")
    if cfg.lr <= 0:
        raise ConfigError(f"{where}.lr: {cfg.lr} must be > 0")
    if cfg.weight_decay < 0:
        raise ConfigError(f"{where}.weight_decay: {cfg.weight_decay} must be >= 0")


@dataclass
class EvalConfig:
    batch_size: int = 256
    ece_bins: int = 15
    latency_runs: int = 50  # batch-1 forward passes timed for the median latency
    throughput_batch: int = 256
    throughput_runs: int = 10
    threads: int = 1  # torch threads while timing, for comparable figures


@dataclass
class PathsConfig:
    """`paths`: what a project's dvc.yaml passes to the commands (read by DVC, not by kd's commands;
    `kd init` writes it)."""

    teacher: str = "data/teacher"  # the teacher `kd label` (and `kd generate`) runs: --teacher


def load_params(path: str | Path) -> dict[str, Any]:
    """Read params.yaml and check its top-level sections."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {SECTIONS}, got {type(data).__name__}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{path}: unknown key {key!r} (sections are {', '.join(SECTIONS)})")
    return data


def section(path: str | Path, name: str, cls: type) -> Any:
    """The dataclass `cls` built from section `name` of the params file (defaults if absent)."""
    return from_mapping(cls, load_params(path).get(name) or {}, name)


def student(path: str | Path, name: str, section: str = "students") -> StudentConfig:
    """Entry `name` of the `students` (or `text_students`, `mlm_students`) section, or of `assistants`."""
    params = load_params(path)
    sections = STUDENT_SECTIONS if section == "students" else (section,)
    found = [s for s in sections if name in (params.get(s) or {})]
    if len(found) != 1:
        defined = [n for s in sections for n in (params.get(s) or {})]
        raise ConfigError(f"{path}: {'/'.join(found) if found else section}.{name} is "
                          f"{'defined twice' if found else 'not defined'} (defined: {', '.join(defined) or 'none'})")
    section = found[0]
    data = dict(params[section][name] or {})
    for key in ("name", "section"):
        if key in data:
            raise ConfigError(f"{section}.{name}.{key}: unknown key (set from where the entry stands)")
    return from_mapping(StudentConfig, {**data, "name": name, "section": section}, f"{section}.{name}")


def student_names(path: str | Path, section: str = "students") -> list[str]:
    params = load_params(path)
    sections = STUDENT_SECTIONS if section == "students" else (section,)
    return [name for s in sections for name in (params.get(s) or {})]


def from_mapping(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses.

    Raises ConfigError naming the dotted key for an unknown key or a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            keys = sorted(f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal"))
            raise ConfigError(f"{where}.{key}: unknown key (expected one of: {', '.join(keys)})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if hint is LossConfig:  # its fields are the registered methods
        hint = loss_config()
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, {} if value is None else value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {value!r} must be a number")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {value!r} must be a string")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {value!r} must be a list")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {value!r} must be a mapping")
        if args and args[1] is str:
            return {str(k): _coerce(v, str, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    return value


def as_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (for manifests and checkpoints)."""
    return dataclasses.asdict(config)
