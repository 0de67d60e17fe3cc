"""How small can k be? Kept mass, KL(full || cached) and student accuracy for several k.

Runs on an existing pipeline workspace (after `dvc repro`): labels the default data with
the trained teacher once per k into a scratch cache, trains one student per k from it
(default: `mlp_soft` of params.yaml), and prints a Markdown table; writes
bench/results_topk.json.

    python bench/topk_tradeoff.py --ks 1,2,3,5,10 --student mlp_soft
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/topk_tradeoff.py` puts bench/, not the repository, on sys.path
    sys.path.insert(0, str(REPO))

import torch
import typer

from bench import stamp
from kd import config
from kd.cache import Cache, Teacher, label
from kd.distill import train_student
from kd.prepared import images
from kd.tasks import image as image_task
from kd.tasks.image_models import fingerprint, load_model
from kd.training import predict


def main(ks: str = "1,2,3,5,10", student: str = "mlp_soft", temperature: float = 4,
         teacher_dir: Path = Path("examples/mnist/data/teacher"), prepared: Path = Path("examples/mnist/data/prepared"),
         params: Path = Path("examples/mnist/params.yaml"), out: Path = Path("bench/results_topk.json")) -> None:
    model, teacher_config = load_model(teacher_dir)
    teacher = Teacher(model, fingerprint(teacher_dir), teacher_config)
    base_label = config.section(params, "label", config.LabelConfig)
    cfg = config.student(params, student)
    test = images.read_split(prepared / "test.parquet")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for k in map(int, ks.split(",")):
            cache_dir = Path(scratch) / f"k{k}"
            label(teacher, prepared, cache_dir, dataclasses.replace(base_label, top_k=k), task_inputs=image_task.Inputs,
                  progress=False)
            cache = Cache.open(cache_dir)
            train_student(cfg, cache, prepared, Path(scratch) / f"student{k}", Path(scratch) / "baselines",
                          progress=False)
            trained, _ = load_model(Path(scratch) / f"student{k}")
            logits = predict(trained, torch.tensor(test.x), test.input_shape)
            fidelity = cache.manifest["fidelity"]["unlabeled"][config_name(temperature)]
            rows.append({"k": k, "kept_mass": fidelity["kept_mass"], "kl_full_to_cached": fidelity["kl_full_to_cached"],
                         "student_accuracy": float((logits.argmax(1).numpy() == test.y).mean()),
                         "soft_target_bytes": sum(p["bytes"] for s in cache.manifest["splits"].values()
                                                  for p in s["parts"])})
    print(f"| k | kept mass (T={temperature:g}) | KL(full || cached) | {student} accuracy | soft-target bytes |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']} | {r['kept_mass']:.4f} | {r['kl_full_to_cached']:.2e} | {r['student_accuracy']:.4f} "
              f"| {r['soft_target_bytes']:,} |")
    stamp.write(out, {"student": student, "temperature": temperature, "rows": rows})


def config_name(temperature: float) -> str:
    from kd.cache.layout import temperature_key
    return temperature_key(temperature)


if __name__ == "__main__":
    typer.run(main)
