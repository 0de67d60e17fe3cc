"""What k costs on text: kept mass and KL(full || cached) of the per-token cache for several k.

Runs after `dvc repro text_label` (the default text teacher and prepared pydoc): labels the
prepared splits with the teacher once per k into a scratch cache and reads the fidelity
statistics `kd label` writes (test split, every predicted token). Prints a Markdown table and
writes bench/results_topk_text.json.

    python bench/topk_text.py --ks 8,32,128
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline import config  # noqa: E402
from pipeline.cache import label  # noqa: E402
from stages.label import load_teacher  # noqa: E402


def main(ks: str = "8,32,128", teacher_dir: Path = REPO / "data/text/teacher",
         prepared: Path = REPO / "data/text/prepared", params: Path = REPO / "params_text.yaml",
         out: Path = REPO / "bench/results_topk_text.json") -> None:
    teacher = load_teacher(teacher_dir, None, None)
    base = config.section(params, "label", config.LabelConfig)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for k in map(int, ks.split(",")):
            manifest = label(teacher, prepared, Path(scratch) / f"k{k}", dataclasses.replace(base, top_k=k),
                             progress=False)
            fidelity = manifest["fidelity"]["test"]
            rows.append({"k": k, "teacher_next_token_accuracy": fidelity["teacher_accuracy"],
                         **{t: fidelity[t] for t in fidelity if t != "teacher_accuracy"},
                         "soft_target_bytes": sum(p["bytes"] for s in manifest["splits"].values() for p in s["parts"]),
                         "rows": sum(s["rows"] for s in manifest["splits"].values())})
    temps = [t for t in rows[0] if t.startswith("t") and t != "teacher_next_token_accuracy"]
    print("| k | " + " | ".join(f"kept mass ({t}) | KL(full \\|\\| cached) ({t})" for t in temps)
          + " | soft-target bytes per row |")
    print("|---:|" + "---:|" * (2 * len(temps) + 1))
    for r in rows:
        cells = [f"{r[t]['kept_mass']:.4f} | {r[t]['kl_full_to_cached']:.3f}" for t in temps]
        print(f"| {r['k']} | " + " | ".join(cells) + f" | {r['soft_target_bytes'] / r['rows']:.0f} |")
    out.write_text(json.dumps({"split": "test", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
