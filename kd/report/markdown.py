"""The report's markdown: the teacher and cache, the leaderboard, one sentence per student, and
(for tasks that compare methods) the methods and progressive-distillation sections.

Every word that differs between tasks comes from the task's `Score`; everything else is shared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kd.cache import encoding as encodings
from kd.cache.layout import temperature_key
from kd.report.results import Report
from kd.report.scores import Score, fmt, points, signed

# Leaderboard columns the markdown table shows beside the task's score: header and format.
HEADERS = {"params": ("params", ","), "size_bytes": ("size (bytes)", ","), "throughput": ("samples/s", ",.0f"),
           "throughput_tokens_per_s": ("tokens/s", ",.0f"), "accuracy_retained": ("retained", ".3f"),
           "agreement": ("agreement", ".4f"), "kl_to_teacher": ("KL", ".4f"), "ece": ("ECE", ".4f"),
           "speedup_vs_teacher": ("speedup", ".1f"), "perplexity": ("perplexity", ".2f"),
           "baseline_perplexity": ("twin perplexity", ".2f"), "teacher_perplexity": ("teacher perplexity", ".2f"),
           "bits_per_char": ("bits/char", ".3f"), "baseline_bits_per_char": ("twin bits/char", ".3f"),
           "teacher_bits_per_char": ("teacher bits/char", ".3f"),
           "exact_match_first_turn": ("first-turn exact match", ".4f"),
           "baseline_exact_match_first_turn": ("twin first-turn", ".4f"),
           "teacher_exact_match_first_turn": ("teacher first-turn", ".4f")}


def share(fraction: float) -> str:
    """A fraction as a percentage with the digits that hold: 0.00047 -> '0.047%', 0.25 -> '25%'."""
    percent = 100.0 * fraction
    if percent >= 10:
        return f"{percent:.0f}%"
    return f"{percent:.1f}%" if percent >= 1 else f"{percent:.2g}%"


def sentence(name: str, metrics: dict[str, Any], score: Score) -> str:
    """One student in words: size and speed against the teacher, its score against the teacher's
    and its twin's, and (when measured) its agreement with the teacher."""
    parts = []
    if metrics.get("teacher_params"):
        parts.append(f"{share(metrics['params'] / metrics['teacher_params'])} of the teacher's parameters")
    else:
        parts.append("size vs the teacher unknown")
    speedup = metrics.get("speedup_vs_teacher")
    if speedup is None:
        parts.append("speed vs the teacher unknown")
    else:
        parts.append(f"{speedup:.1f}x faster" if speedup >= 1 else f"{1.0 / speedup:.1f}x slower")
    change = score.paired(metrics[score.key], metrics[score.baseline_key])
    change_words = (f"{abs(100 * change):.1f}% {'lower' if change >= 0 else 'higher'}" if score.relative
                    else signed(change, ".1f"))
    versus = score.versus.format(change=change_words, twin=format(metrics[score.baseline_key], score.fmt))
    agrees = (f" It agrees with the teacher's top-1 on {100 * metrics['agreement']:.1f}% of the cache's test rows."
              if metrics.get("agreement") is not None else "")
    return f"**{name}**: {', '.join(parts)}, {score.keeps(metrics)} ({versus}).{agrees}"


def seeds_sentence(metrics: dict[str, Any], score: Score) -> str:
    """Mean +- std over seeds of the score and of the change over the twins, when there is more
    than the first seed."""
    if metrics["seeds"] < 2:
        return ""
    return score.over_seeds.format(n=metrics["seeds"], score=_pm(metrics, score.key, score.fmt),
                                   change=_change(metrics, score.change_key, score.change_words))


def _pm(row: dict[str, Any], prefix: str, spec: str = ".4f") -> str:
    """PREFIX_mean ± PREFIX_std of a row."""
    mean, std = row[f"{prefix}_mean"], row[f"{prefix}_std"]
    return "n/a" if mean is None else f"{format(mean, spec)} ± {format(std, spec)}"


def _change(row: dict[str, Any], prefix: str, words: Callable[..., str] = points) -> str:
    """PREFIX_mean ± PREFIX_std of a row as a change: in points, or as `words` (Score.change_words) puts it."""
    return words(row[f"{prefix}_mean"], row[f"{prefix}_std"])


def _share(metrics: dict[str, Any], key: str) -> str:
    """A share as a percentage, '' where the metrics lack it."""
    return "" if metrics.get(key) is None else f"{100 * metrics[key]:.1f}%"


def _spread(metrics: dict[str, Any], key: str) -> str:
    """KEY over seeds: the value alone for one seed (no spread), else mean ± std of KEY_mean, KEY_std."""
    return f"{metrics[key]:.3f}" if metrics["seeds"] < 2 else _pm(metrics, key, ".3f")


def _stored_as(manifest: dict[str, Any]) -> str:
    """How the cache stores its top-k logits: the float dtype, or the compact encoding."""
    encoding = encodings.of(manifest)
    return manifest.get("logit_dtype") if encoding["name"] == "topk" else encodings.describe(encoding)


def _kept_mass(manifest: dict[str, Any]) -> str:
    """Per cached temperature, the mean probability mass the top-k keeps on each split (test
    first) and, where recorded, the KL from the full distribution to the cached one on test."""
    fidelity = manifest.get("fidelity", {})
    splits = sorted(fidelity, key=lambda split: (split != "test", split))
    kept = []
    for t in manifest.get("temperatures", []):
        name = temperature_key(t)  # fidelity keys: t1, t4, t2_5
        per_split = [f"{100 * fidelity[split][name]['kept_mass']:.1f}% on {split}" for split in splits
                     if name in fidelity[split]]
        if not per_split:
            continue
        kl = fidelity.get("test", {}).get(name, {}).get("kl_full_to_cached")
        kept.append(f"T={t}: {', '.join(per_split)}" + (f" (KL(full || cached) {kl:.3f} on test)"
                                                        if kl is not None else ""))
    return "; ".join(kept) or "n/a"


def _cell(column: str, row: dict[str, Any], score: Score) -> str:
    if column == score.change_column:
        return score.change_words(row[column])
    if column in (score.key, score.baseline_key, score.teacher_key):
        return fmt(row[column], score.fmt)
    text = fmt(row[column], HEADERS[column][1])
    return f"{text}x" if column == "speedup_vs_teacher" and row[column] is not None else text


def _header(column: str, score: Score) -> str:
    return {score.key: score.name, score.baseline_key: "twin", score.teacher_key: "teacher",
            score.change_column: "vs twin"}.get(column) or HEADERS[column][0]


def render(report: Report, manifest: dict[str, Any], cache_root: Any) -> str:
    """report.md, from the leaderboard, the students in its order and (for tasks that compare
    methods) the methods and progressive tables."""
    score, rows, results = report.score, report.rows, report.results
    teacher = manifest.get("teacher", {})
    config = teacher.get("config") or {}
    first = results[0].metrics
    kwargs = f" `{json.dumps(config['arch_kwargs'])}`" if config.get("arch_kwargs") else ""
    top_k = manifest.get("top_k")
    lines = [
        f"# {score.title}",
        "",
        f"Teacher: `{config.get('arch', '?')}`{kwargs} ({score.kind}), {fmt(first.get('teacher_params'), ',')} "
        f"parameters, {score.name} {fmt(first.get(score.teacher_key), score.fmt)} "
        f"(fingerprint `{str(teacher.get('fingerprint', '?'))[:12]}`).",
        f"Cache `{cache_root}`: {score.rows(manifest)}, the teacher's top-{top_k} of {score.classes(manifest)} "
        f"logits per row ({_stored_as(manifest)}), temperatures {manifest.get('temperatures')}.",
        f"Mean probability mass the top-{top_k} keeps: {_kept_mass(manifest)}.",
        "",
        f"Each student is compared with its twin: the same architecture, seed and budget, {score.twin}. Speed is "
        f"{HEADERS[score.throughput_key][0]} on CPU, measured side by side with a random-weight copy of the teacher's "
        "architecture. The columns up to speedup are the first seed's; the last gives the mean ± sample std over "
        "every trained seed of the score and of the paired change against each seed's own twin (seeds in brackets).",
        "",
        "| student | " + " | ".join(_header(c, score) for c in score.shown) + " | over seeds |",
        "|---|" + "---:|" * (len(score.shown) + 1),
    ]
    for row in rows:
        over_seeds = ("one seed (no spread)" if row["seeds"] < 2 else
                      f"{_pm(row, score.key, score.fmt)}, {_change(row, score.change_key, score.change_words)} "
                      f"({row['seeds']})")
        lines.append(f"| {row['student']} | " + " | ".join(_cell(c, row, score) for c in score.shown)
                     + f" | {over_seeds} |")
    if any(not r.metrics.get("kl_exact", True) for r in results):
        lines += ["", f"KL is KL(teacher || student) at T=1 over the teacher's top-{top_k} plus one tail bucket: "
                      "a lower bound of the full KL, since the cache holds only the top-k logits."]
    lines += ["", "## Students", ""]
    lines += [f"- {sentence(r.name, r.metrics, score)}{seeds_sentence(r.metrics, score)}" for r in results]
    if score.compares_methods:
        lines += methods_markdown(report.methods) + progressive_markdown(report.progressive)
    lines += bits_markdown(results)
    lines += test_sets_markdown(report.test_sets, score)
    lines += ["", "## Plots", ""]
    lines += [f"![{name[:-4]}]({name})" for name in score.plots]
    return "\n".join(lines) + "\n"


def bits_markdown(results: list[Any]) -> list[str]:
    """Language-model students side by side in bits per character (students of another tokenizer
    than the teacher's compare there), with their twins and the teacher, and how a student's own
    tokens line up with the teacher's; only for students whose metrics have it."""
    rows = [r for r in results if r.metrics.get("bits_per_char") is not None]
    if not rows:
        return []
    teacher = rows[0].metrics.get("teacher_bits_per_char")
    lines = ["", "## Bits per character", "",
             "Each student's test loss over the characters its predicted tokens cover (total nats / (ln 2 x "
             "characters)), so students of other tokenizers compare: mean ± sample std over its seeds (the value "
             f"alone for one seed), its twins' beside it. The teacher: {fmt(teacher, '.3f')}. For a student with its "
             "own tokenizer: the share of its predicted test positions a cached teacher row lines up with (the same "
             "next-character boundary), of those whose predicted tokens are the same text (one-to-one), and the "
             "share of the teacher's top-k mass on tokens the student's vocabulary has (mapped).", "",
             "| student | tokenizer | loss | bits/char | twin bits/char | aligned | one-to-one | mapped mass |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r.metrics
        own = m.get("student_tokenizer")
        tokenizer = "the teacher's" if own is None else f"own ({own['vocab_size']:,})"
        loss = " + ".join(k for k, v in (r.spec.get("loss") or {}).items() if v is not None)
        lines.append(f"| {r.name} | {tokenizer} | {loss} | {_spread(m, 'bits_per_char')} | "
                     f"{_spread(m, 'baseline_bits_per_char')} | {_share(m, 'aligned_positions')} | "
                     f"{_share(m, 'aligned_one_to_one')} | {_share(m, 'mapped_kept_mass')} |")
    return lines


def test_sets_markdown(rows: list[dict[str, Any]], score: Score) -> list[str]:
    """Each student on every test set: its score, its twins' and the paired change, over seeds."""
    if not rows:
        return []
    labels = list(dict.fromkeys(row["test_set"] for row in rows))
    cells = {(row["student"], row["test_set"]): row for row in rows}
    lines = ["", "## Test sets", "",
             f"Each student's {score.name} on each test set (`cache`: the cache's own test split), as mean ± sample "
             "std over its seeds, its twins' beside it, and the paired change against each seed's own twin.", "",
             "| student | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for student in dict.fromkeys(row["student"] for row in rows):
        lines.append(f"| {student} | " + " | ".join(
            f"{_pm(cells[student, label], 'score', score.fmt)} "
            f"(twin {_pm(cells[student, label], 'baseline', score.fmt)}"
            f"; {_change(cells[student, label], 'change', score.change_words)})" for label in labels) + " |")
    return lines


def methods_markdown(methods: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Methods: gain over soft targets alone", "",
             "Students are grouped by architecture and budget (architecture, epochs, batch size, learning rate, "
             "weight decay, transfer set, seeds, views, assistant). In each group the reference is the student "
             "trained with soft targets and no feature term; every other student's gain over it is the paired "
             "difference of test accuracy on the same seed, as mean ± sample std in points over the seeds both "
             "have. A mean within one std of zero is no measurable gain; a negative one beyond it hurts.", ""]
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in methods:
        groups.setdefault(row["group"], []).append(row)
    for number, members in groups.items():
        lines += [f"Group {number}: {members[0]['setup']}.", "",
                  "| student | terms | seeds | accuracy | vs baseline twin (points) | vs soft alone (points) "
                  "| verdict |",
                  "|---|---|---:|---:|---:|---:|---|"]
        sentences = []
        for row in members:
            vs_soft = {"reference": "reference", "no soft-only reference": "n/a"}.get(
                row["role"], f"{_change(row, 'gain_over_soft')} ({row['paired_seeds']} paired)")
            lines.append(f"| {row['student']} | {row['method']} | {row['seeds']} | {_pm(row, 'accuracy')} "
                         f"| {_change(row, 'gain_over_baseline')} | {vs_soft} | {row['verdict']} |")
            if row["role"] == "compared":
                sentences.append(f"- **{row['student']}** ({row['method']}) vs **{row['reference']}** (soft alone): "
                                 f"{_change(row, 'gain_over_soft')} points over {row['paired_seeds']} paired seeds: "
                                 f"{row['verdict']}.")
            elif row["role"] == "no soft-only reference":
                sentences.append(f"- **{row['student']}** ({row['method']}): no soft-only reference with the same "
                                 f"architecture and budget; accuracy {_pm(row, 'accuracy')}, "
                                 f"{_change(row, 'gain_over_baseline')} points over its baseline twins.")
        lines += ["", *sentences, ""] if sentences else [""]
    return lines[:-1]


def progressive_markdown(progressive: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Progressive distillation", ""]
    if not progressive:
        return lines + ["No student learns through a teacher assistant."]
    lines += ["Each student taught through a teacher assistant against the same student (architecture, budget, "
              "loss) taught directly by the teacher; the difference is paired by seed, via minus direct, in points.",
              "",
              "| student | assistant (params, accuracy) | teacher (params, accuracy) | direct | direct accuracy "
              "| via-assistant accuracy | difference (points) | verdict |",
              "|---|---|---|---|---:|---:|---:|---|"]
    sentences = []
    for row in progressive:
        difference = f"{_change(row, 'difference')} ({row['paired_seeds']} paired)" if row["direct"] else "n/a"
        lines.append(f"| {row['student']} | {row['assistant']} ({fmt(row['assistant_params'], ',')}, "
                     f"{fmt(row['assistant_accuracy'], '.4f')}) | {fmt(row['teacher_params'], ',')}, "
                     f"{fmt(row['teacher_accuracy'], '.4f')} | {row['direct'] or 'none'} "
                     f"| {_pm(row, 'direct_accuracy')} | {_pm(row, 'via_accuracy')} | {difference} "
                     f"| {row['verdict']} |")
        if row["direct"]:
            sentences.append(f"- **{row['student']}** ({fmt(row['student_params'], ',')} parameters) through "
                             f"**{row['assistant']}** ({fmt(row['assistant_params'], ',')}) vs **{row['direct']}** "
                             f"directly from the teacher ({fmt(row['teacher_params'], ',')}): "
                             f"{_change(row, 'difference')} points over {row['paired_seeds']} paired seeds: "
                             f"{row['verdict']}.")
        else:
            sentences.append(f"- **{row['student']}** through **{row['assistant']}**: no student with the same "
                             "architecture, budget and loss is taught directly by the teacher, so there is nothing "
                             "to compare with.")
    return lines + ["", *sentences] + capacity_markdown(progressive)


def capacity_markdown(progressive: list[dict[str, Any]]) -> list[str]:
    """The capacity gap: each student with a direct counterpart, by teacher/student size ratio,
    its gain over the twins directly and through its assistant (capacity_gap.png draws it)."""
    rows = sorted((row for row in progressive if row["direct"] and row["size_ratio"]),
                  key=lambda row: (row["size_ratio"], row["student"]))
    if not rows:
        return []
    lines = ["", "### The capacity gap", "",
             "The same rows by teacher/student size ratio (teacher parameters over student parameters): each "
             "student's gain over its baseline twins, taught directly by the teacher and through its assistant "
             "(mean ± sample std over seeds, points; both share the twins).", "",
             "| student (params) | teacher / student | assistant (params) | direct: gain over twin "
             "| via assistant: gain over twin | via minus direct | verdict |",
             "|---|---:|---|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['direct']} ({fmt(row['student_params'], ',')}) | {row['size_ratio']:.1f} "
                     f"| {row['assistant']} ({fmt(row['assistant_params'], ',')}) | {_change(row, 'direct_gain')} "
                     f"| {_change(row, 'via_gain')} | {_change(row, 'difference')} | {row['verdict']} |")
    return lines
