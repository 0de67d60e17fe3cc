"""Loss methods: one module per method, and `METHODS`, the one lookup from a params name to
its module. The pure loss functions stay in `kd.losses`.

A method's module declares
    its config      a dataclass subclassing `common.Method`: the keys of `students.NAME.loss.<name>`
                    in params.yaml with their defaults, checked by its `check(where)`; says which
                    cached temperatures, teacher layers (and cache modes) and student layers it reads
    CONFIG          that dataclass
    TASKS           the tasks whose students it trains: "image", "causal_lm", "masked_lm"
    OWN_TOKENIZER   whether it also serves a causal student with its own tokenizer (not the teacher's)
    KIND            what it learns from, for the report (KINDS): "logits" (the teacher's soft
                    targets), "labels" (hard labels) or "feature" (cached teacher layers)
    build(cfg, shapes) -> Built   its named terms {name: (weight, term(batch, out) -> scalar)},
                    the student layers to tap and the helper modules trained with the student
    ROWS            (KIND "logits" and "labels" only; optional) rows(batch) -> (N,) bool, the rows
                    each of its terms averages over (default: all): its terms then read the
                    logits alone and are means over those rows (`training.RowMean`), which lets a
                    text student compute them from its hidden state chunk by chunk (`kd.head`)

Everything else is derived from `METHODS`, in its order: the keys of `students.NAME.loss`
(`config.loss_config`), the methods each task accepts (`supported`), the feature methods an
assistant's cache cannot serve (`of_kind`), and the report's method labels and its soft-only
reference (`report.compare`, by KIND).

Adding a method, say `mine`:
1. Write its loss as a function of tensors in `kd/losses.py` (the shapes in a comment).
2. Write `kd/methods/mine.py`: its config, CONFIG, TASKS, OWN_TOKENIZER, KIND and `build`, as
   in `soft.py` or `hint.py`. A term reads the batch keys `loader.CacheRows.targets` gives
   (`topk_idx`, `topk_logit`, `label`, `lse` at soft's temperature, `teacher.<layer>` for each
   layer its `teacher_layers` names) and the student's outputs (`logits`, each tapped layer);
   a key it does not give yet (another temperature's lse, say) is added there.
3. Add one line to `METHODS` below: `"mine": mine` (and its import).
4. Use it: `students.NAME.loss.mine: {weight: ...}` in params.yaml is now a checked key, and
   `kd distill NAME` logs each of its terms by name in train_log.csv.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from kd.errors import ConfigError
from kd.methods import attention, cosine, hard, hint, mapped, rkd, soft, uld
from kd.methods.common import Built, Shapes
from kd.training import RowMean, all_rows

# Loss-method name -> module. The one place a config name meets code; its order is that of
# the terms in train_log.csv and of the names in the report's method labels.
METHODS: dict[str, ModuleType] = {
    "soft": soft,
    "hard": hard,
    "hint": hint,
    "attention": attention,
    "rkd": rkd,
    "cosine": cosine,
    "mapped": mapped,
    "uld": uld,
}
KINDS = ("logits", "labels", "feature")  # a module's KIND


def supported(task: str, own_tokenizer: bool = False) -> tuple[str, ...]:
    """The methods whose TASKS name `task`; with `own_tokenizer`, only those that also serve a
    student with its own tokenizer (OWN_TOKENIZER). In METHODS' order."""
    return tuple(name for name, module in METHODS.items()
                 if task in module.TASKS and (module.OWN_TOKENIZER or not own_tokenizer))


def of_kind(kind: str) -> tuple[str, ...]:
    """The methods of KIND `kind` (one of KINDS), in METHODS' order."""
    return tuple(name for name, module in METHODS.items() if module.KIND == kind)


def chosen(loss: Any) -> dict[str, Any]:
    """The methods a student's `loss` section sets: name -> its config, in METHODS' order."""
    return {name: getattr(loss, name) for name in METHODS if getattr(loss, name) is not None}


def student_terms(cfg: Any, shapes: Shapes) -> Built:
    """All of a student's terms, taps and trainable helper modules, composed from its config."""
    built = Built({})
    for name, term_cfg in chosen(cfg.loss).items():
        try:
            part = METHODS[name].build(term_cfg, shapes)
        except ConfigError as exc:
            raise ConfigError(f"{cfg.where}.{exc}") from None
        if METHODS[name].KIND in ("logits", "labels"):  # means over rows of the logits
            rows = getattr(METHODS[name], "ROWS", all_rows)
            part.terms = {key: (weight, RowMean(term, rows))
                          for key, (weight, term) in part.terms.items()}
        built.terms.update(part.terms)
        built.taps += [t for t in part.taps if t not in built.taps]
        built.modules += part.modules
    return built


def student_layers(cfg: Any) -> list[str]:
    """The student layers the methods tap, each once."""
    return list(dict.fromkeys(layer for term in chosen(cfg.loss).values() for layer in term.student_layers()))


def needed_temperatures(cfg: Any) -> list[float]:
    """The cached temperatures (lse columns) the methods read."""
    return list(dict.fromkeys(t for term in chosen(cfg.loss).values() for t in term.temperatures()))


def needed_samples(cfg: Any) -> list[float]:
    """The temperatures whose sampled targets the methods read."""
    return list(dict.fromkeys(t for term in chosen(cfg.loss).values() for t in term.sampled_temperatures()))


__all__ = ["KINDS", "METHODS", "Built", "Shapes", "chosen", "needed_samples", "needed_temperatures", "of_kind",
           "student_layers", "student_terms", "supported"]
