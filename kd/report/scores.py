"""What each task's report measures and how its numbers read: one `Score` per task.

The rest of `kd.report` never asks which kind of student it reports on; it reads these
fields. The keys are the task names of `kd.tasks` ("image", "causal_lm", "masked_lm"),
which resolves a cache's manifest to one of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Metrics = dict[str, Any]


@dataclass(frozen=True)
class Score:
    key: str                        # the student's score in metrics.json ("accuracy"); also baseline_KEY, teacher_KEY
    name: str                       # the score in words ("test accuracy")
    lower_is_better: bool
    fmt: str                        # format spec of a score (".4f")
    change_key: str                 # metrics.json's per-seed change over the twin, as CHANGE_mean/_std
    change_column: str              # leaderboard.csv's first-seed change over the twin
    relative: bool                  # the change is 1 - score / twin's, shown in %; else 100 * (score - twin's), points
    throughput_key: str             # metrics.json's items per second ("throughput")
    shown: tuple[str, ...]          # leaderboard.csv's first-seed columns, in order; the markdown table shows these
    seeds_columns: tuple[str, str]  # plots/seeds.csv: the student's and its twin's score
    record: str                     # the file in a student's directory holding its config ({"student": ...})
    plots: tuple[str, ...]          # the PNGs, in the markdown's order (`plots.DRAW` draws each)
    compares_methods: bool          # methods.csv and progressive.csv (students grouped by setup, assistants)
    objective: str | None           # metrics.json's "objective" for this task's students
    # words
    kind: str                       # the teacher, in words ("image classifier")
    title: str                      # report.md's heading
    called: str                     # what `kd report` calls it on the command line
    rows: Callable[[Metrics], str]  # manifest -> what one cache row is
    classes: Callable[[Metrics], Any]  # manifest -> how many classes the logits range over
    twin: str                       # how the baseline twin was trained
    keeps: Callable[[Metrics], str]  # metrics -> the student's score against the teacher's
    versus: str                     # the student against its twin: {change} (in words) and {twin} (the twin's score)
    over_seeds: str                 # the sentence's seed summary: {n}, {score} (mean ± std), {change}

    @property
    def baseline_key(self) -> str:  # the twin's score in metrics.json; also baseline_KEY_mean/_std
        return f"baseline_{self.key}"

    @property
    def teacher_key(self) -> str:  # the teacher's (null in metrics.json when unknown)
        return f"teacher_{self.key}"

    @property
    def columns(self) -> tuple[str, ...]:
        """leaderboard.csv, in order: the first seed's columns, then the mean and std over seeds."""
        return ("student", *self.shown, "seeds", f"{self.key}_mean", f"{self.key}_std", f"{self.change_key}_mean",
                f"{self.change_key}_std")

    def paired(self, score: float, other: float) -> float:
        """The change of `score` over `other`, as `kd eval` pairs seeds."""
        return 1 - score / other if self.relative else 100.0 * (score - other)

    def change_words(self, mean: float | None, std: float | None = None) -> str:
        """A change (mean, std or None) as the markdown shows it: "+1.23 ± 0.45" points or "+1.2 ± 0.4%"."""
        return points(mean, std, 100, ".1f", "%") if self.relative else points(mean, std)


def fmt(value: Any, spec: str) -> str:
    """`value` formatted by `spec`; "n/a" for a value that is not there (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def signed(value: float, spec: str = ".2f") -> str:
    return format(round(value, int(spec[1:-1])) + 0.0, "+" + spec)  # + 0.0: no "-0.0"


def points(mean: float | None, std: float | None = None, scale: float = 1, spec: str = ".2f", unit: str = "") -> str:
    """A change, "+1.23" or "+1.23 ± 0.45" (scaled, e.g. by 100 for "%")."""
    if mean is None:
        return "n/a"
    return signed(scale * mean, spec) + (f" ± {format(scale * std, spec)}" if std is not None else "") + unit


def _image_keeps(m: Metrics) -> str:
    retained = m.get("accuracy_retained")
    return "teacher accuracy unknown" if retained is None else f"keeps {100 * retained:.1f}% of the teacher's accuracy"


def _causal_keeps(m: Metrics) -> str:
    teacher = m.get("teacher_perplexity")
    return f"test perplexity {m['perplexity']:.1f}" + (f" against the teacher's {teacher:.1f}" if teacher else "")


def _masked_keeps(m: Metrics) -> str:
    mine, teacher = m["masked_accuracy"], m.get("teacher_masked_accuracy")
    return (f"masked-token accuracy {mine:.4f}"
            + (f", {100 * mine / teacher:.1f}% of the teacher's {teacher:.4f}" if teacher else ""))


def _causal_rows(manifest: Metrics) -> str:
    info = manifest.get("text", {})
    if not info.get("response_only"):
        return f"one row per predicted token ({info.get('positions')} per block of {info.get('block_size')} tokens)"
    splits = (manifest.get("splits") or {}).values()
    rows, blocks = sum(s.get("rows", 0) for s in splits), sum(s.get("samples", 0) for s in splits)
    per_block = f"{rows / blocks:.1f} per block of {info.get('block_size')} tokens on average" if blocks else "none"
    return f"one row per predicted response token ({per_block}; prompts and padding have none)"


def _masked_rows(manifest: Metrics) -> str:
    info = manifest.get("text", {})
    return (f"one row per masked token ({info.get('positions')} per masking of a block of {info.get('block_size')} "
            f"tokens, {manifest.get('views', {}).get('count', 0) + 1} masking(s) per block, recorded)")


# Task name -> what its report measures. The one place the report meets a task.
SCORES: dict[str, Score] = {
    "image": Score(
        key="accuracy", name="test accuracy", lower_is_better=False, fmt=".4f", change_key="gain_points",
        change_column="gain_over_baseline_points", relative=False, throughput_key="throughput",
        shown=("params", "size_bytes", "throughput", "accuracy", "baseline_accuracy", "accuracy_retained",
               "agreement", "kl_to_teacher", "ece", "gain_over_baseline_points", "speedup_vs_teacher"),
        seeds_columns=("accuracy", "baseline_accuracy"), record="config.json",
        plots=("accuracy_vs_params.png", "gains.png", "capacity_gap.png", "training_curves.png", "per_class.png",
               "confusion.png"),
        compares_methods=True, objective=None, kind="image classifier", title="Distillation report", called="report",
        rows=lambda manifest: (f"one row per sample and view ({manifest.get('views', {}).get('count', 0)} "
                               "augmented views per sample)"),
        classes=lambda manifest: manifest.get("num_classes"),
        twin="trained on the labeled split's hard labels only",
        keeps=_image_keeps, versus="{change} points over training on labels alone",
        over_seeds=" Over {n} seeds: accuracy {score}, {change} points over the baseline twins."),
    "causal_lm": Score(
        key="perplexity", name="test perplexity", lower_is_better=True, fmt=".1f", change_key="perplexity_reduction",
        change_column="perplexity_reduction", relative=True, throughput_key="throughput_tokens_per_s",
        shown=("params", "size_bytes", "throughput_tokens_per_s", "perplexity", "baseline_perplexity",
               "teacher_perplexity", "perplexity_reduction", "agreement", "kl_to_teacher", "speedup_vs_teacher"),
        seeds_columns=("student", "baseline"), record="student.json",
        plots=("perplexity_vs_params.png", "training_curves.png", "per_position.png"),
        compares_methods=False, objective="causal", kind="causal LM", title="Text distillation report",
        called="text report",
        rows=_causal_rows, classes=lambda manifest: manifest.get("text", {}).get("vocab_size"),
        twin="trained on the text alone (the next-token loss)",
        keeps=_causal_keeps,
        versus="{change} than its twin's {twin}: the same student on the same text alone, same budget",
        over_seeds=" Over {n} seeds: perplexity {score}, {change} lower than the twins'."),
    "masked_lm": Score(
        key="masked_accuracy", name="masked-token accuracy", lower_is_better=False, fmt=".4f",
        change_key="accuracy_gain_points", change_column="accuracy_gain_points", relative=False,
        throughput_key="throughput_tokens_per_s",
        shown=("params", "size_bytes", "throughput_tokens_per_s", "masked_accuracy", "baseline_masked_accuracy",
               "teacher_masked_accuracy", "accuracy_gain_points", "agreement", "kl_to_teacher", "speedup_vs_teacher"),
        seeds_columns=("student", "baseline"), record="student.json",
        plots=("accuracy_vs_params.png", "training_curves.png", "per_position.png"),
        compares_methods=False, objective="masked", kind="masked LM", title="Text distillation report",
        called="text report",
        rows=_masked_rows, classes=lambda manifest: manifest.get("text", {}).get("vocab_size"),
        twin=("trained from the same start on the same masks with the masked-LM loss alone. Scores are on every "
              "cached masking of the test split; the teacher's is its cached top-1 on the same masked tokens"),
        keeps=_masked_keeps,
        versus=("{change} points over its twin's {twin}: the same student, start, masks and budget with the masked-LM "
                "loss alone"),
        over_seeds=" Over {n} seeds: {score} masked-token accuracy, {change} points over the twins."),
}

# The other scores a task's report can rank by (`kd report --score KEY`), by (task, metrics key).
# Causal LMs answering prompts (instruction data): the exact match of their greedy answers.
ALTERNATIVES: dict[tuple[str, str], Score] = {
    ("causal_lm", "exact_match"): Score(
        key="exact_match", name="test exact match", lower_is_better=False, fmt=".4f",
        change_key="exact_match_gain_points", change_column="exact_match_gain_points", relative=False,
        throughput_key="throughput_tokens_per_s",
        shown=("params", "size_bytes", "throughput_tokens_per_s", "exact_match", "baseline_exact_match",
               "teacher_exact_match", "exact_match_gain_points", "exact_match_first_turn",
               "baseline_exact_match_first_turn", "teacher_exact_match_first_turn", "perplexity",
               "baseline_perplexity", "teacher_perplexity", "agreement", "kl_to_teacher", "speedup_vs_teacher"),
        seeds_columns=("student_exact_match", "baseline_exact_match"), record="student.json",
        plots=("exact_match_vs_params.png", "training_curves.png", "per_position.png"),
        compares_methods=False, objective="causal", kind="causal LM", title="Text distillation report (exact match)",
        called="text report",
        rows=_causal_rows, classes=lambda manifest: manifest.get("text", {}).get("vocab_size"),
        twin="trained on the same responses alone (the next-token loss)",
        keeps=lambda m: (f"exact match {m['exact_match']:.4f}"
                         + (f" against the teacher's {m['teacher_exact_match']:.4f}"
                            if m.get("teacher_exact_match") is not None else "")),
        versus="{change} points over its twin's {twin}: the same student on the same responses alone, same budget",
        over_seeds=" Over {n} seeds: exact match {score}, {change} points over the twins."),
}


# Causal LMs of different tokenizers (students with their own): bits per character, which does
# not depend on the tokenizer (perplexity does).
ALTERNATIVES[("causal_lm", "bits_per_char")] = Score(
    key="bits_per_char", name="test bits per character", lower_is_better=True, fmt=".3f",
    change_key="bits_per_char_reduction", change_column="bits_per_char_reduction", relative=True,
    throughput_key="throughput_tokens_per_s",
    shown=("params", "size_bytes", "throughput_tokens_per_s", "bits_per_char", "baseline_bits_per_char",
           "teacher_bits_per_char", "bits_per_char_reduction", "perplexity", "baseline_perplexity", "agreement",
           "kl_to_teacher", "speedup_vs_teacher"),
    seeds_columns=("student_bits_per_char", "baseline_bits_per_char"), record="student.json",
    plots=("bits_per_char_vs_params.png", "training_curves.png", "per_position.png"),
    compares_methods=False, objective="causal", kind="causal LM", title="Text distillation report (bits per character)",
    called="text report",
    rows=_causal_rows, classes=lambda manifest: manifest.get("text", {}).get("vocab_size"),
    twin="trained on the text alone (the next-token loss), in the student's own tokens",
    keeps=lambda m: (f"test bits per character {m['bits_per_char']:.3f}"
                     + (f" against the teacher's {m['teacher_bits_per_char']:.3f}"
                        if m.get("teacher_bits_per_char") is not None else "")),
    versus="{change} than its twin's {twin}: the same student on the same text alone, same budget",
    over_seeds=" Over {n} seeds: bits per character {score}, {change} lower than the twins'.")


def score_for(task: str, key: str | None = None) -> Score:
    """The task's own score, or another one it can rank by (`ALTERNATIVES`)."""
    if key is None or key == SCORES[task].key:
        return SCORES[task]
    if (task, key) not in ALTERNATIVES:
        from kd.errors import ConfigError

        others = [k for t, k in ALTERNATIVES if t == task]
        raise ConfigError(f"--score: {key!r} is not a score of {task} students "
                          f"({', '.join([SCORES[task].key, *others])})")
    return ALTERNATIVES[(task, key)]
