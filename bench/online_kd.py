"""Online distillation, the reference a cached student is measured against (issue 30).

The same student, data, budget, schedule and loss as `kd distill` on a cache, through kd's own
training loop (`kd.distill.train_model`'s steps: seed, `task.build`, `methods.student_terms`,
`training.fit`), with one difference: the soft term's targets come from the teacher, run in
the loop on the batch's inputs (its full softmax, `losses.soft_target_loss`), not from the
cache. The cache still supplies the batches' rows (the next tokens, the hard labels): any
cache of the same teacher and transfer splits serves, its soft targets unread.

    python bench/online_kd.py --pipeline text --seed 0 --cache DIR     # one student from the cache
    python bench/online_kd.py --pipeline text --seed 0 --cache DIR --online

Each run prints one JSON line: the pipeline, seed, source, the test score (text: perplexity
over every predicted test token, as `kd eval`; digits: test accuracy) and the time per epoch.
No twin is trained (`kd distill` would train one per seed; it does not decide the student).
`bench/cache_price.py` runs the grid of caches and seeds with this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd import losses, tasks  # noqa: E402
from kd.cache import Cache  # noqa: E402
from kd.config import StudentConfig, student  # noqa: E402
from kd.distill import train_model  # noqa: E402
from kd.methods import Built, Shapes, student_layers, student_terms  # noqa: E402
from kd.tasks.next_token import TokenRows, blocks_and_targets, next_token_logits  # noqa: E402
from kd.training import fit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# pipeline -> (its params.yaml, the student measured, its data directory)
PIPELINES = {"text": (ROOT / "examples/text/params.yaml", "gpt_small"),
             "digits": (ROOT / "examples/mnist/params.yaml", "mlp_soft")}


def config(pipeline: str, seed: int, epochs: int | None = None, targets: str = "topk") -> StudentConfig:
    """The pipeline's default student with `seed`: one seed per run (`repeats` 1), its soft term
    reading `targets` (topk, or sampled: a cache labeled with `label.sampling`); `epochs` only
    for a quick check."""
    params, name = PIPELINES[pipeline]
    cfg = dataclasses.replace(student(params, name), seed=seed, repeats=1)
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, soft=dataclasses.replace(cfg.loss.soft,
                                                                                               targets=targets)))
    return cfg if epochs is None else dataclasses.replace(cfg, epochs=epochs)


def teacher_logits(task_name: str, teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for a batch's inputs, one row per cache row (as `kd label` writes
    them: a causal LM's every position but the last, an image classifier's one row)."""
    with torch.no_grad():
        if task_name == "causal_lm":
            return next_token_logits(teacher, x).float()
        return teacher(x).float()


def online_terms(cfg: StudentConfig, task, model, cache: Cache, teacher: torch.nn.Module) -> Built:
    """The student's terms as `kd distill` composes them, the soft term's targets replaced by the
    teacher's full softmax on the batch (same weight, same temperature, same place in the sum)."""
    built = student_terms(cfg, Shapes(task.student_shapes(model, cfg, student_layers(cfg), cache), {}))
    weight, _ = built.terms["soft"]
    T = float(cfg.loss.soft.temperature)

    def online_soft(batch, out):
        return losses.soft_target_loss(out["logits"], teacher_logits(task.NAME, teacher, batch["x"]), T)

    built.terms["soft"] = (weight, online_soft)
    return built


def train(cfg: StudentConfig, cache: Cache, prepared: Path, teacher_dir: Path | None) -> tuple[torch.nn.Module, list]:
    """One student: from the cache (`teacher_dir` None: `kd distill`'s own `train_model`), or
    online with the teacher in `teacher_dir` (the same steps with the online soft term)."""
    task = tasks.for_cache(cache)
    task.check(cfg, cache, prepared)
    dataset = task.rows(cache, prepared, cfg, 4096)
    if teacher_dir is None:
        return train_model(task, cfg, cache, prepared, dataset, "cached", False, {})
    teacher = tasks.for_teacher(teacher_dir).load_teacher(teacher_dir, None, None, device="cpu").model.eval()
    torch.manual_seed(cfg.seed)  # as train_model: the same initial weights as the cached student's
    model = task.build(cfg, cache, prepared)
    built = online_terms(cfg, task, model, cache, teacher)
    log = fit(model, dataset, built.terms, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, desc="online", progress=False)
    return model, log


def score(pipeline: str, model: torch.nn.Module, prepared: Path, batch_size: int = 16) -> float:
    """Text: test perplexity over every predicted test token (exp of the mean next-token loss,
    as `kd eval`); digits: test accuracy."""
    model.eval()
    with torch.no_grad():
        if pipeline == "text":
            _, blocks, predicted, truth = blocks_and_targets(prepared / "test.parquet")
            assert predicted is None  # plain text: every position is predicted
            rows = TokenRows(model.model if isinstance(model, TokenRows) else model)
            logits = torch.cat([rows(blocks[i:i + batch_size]) for i in range(0, len(blocks), batch_size)])
            return math.exp(float(F.cross_entropy(logits.float(), truth)))
        from kd.prepared import images
        test = images.read_split(prepared / "test.parquet")
        x = torch.as_tensor(test.x, dtype=torch.float32).view(len(test.x), *test.input_shape)
        y = torch.as_tensor(test.y)
        pred = torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
        return float((pred == y).float().mean())


def run(pipeline: str, seed: int, cache_dir: Path, prepared: Path, teacher_dir: Path | None,
        epochs: int | None = None, targets: str = "topk") -> dict:
    cfg = config(pipeline, seed, epochs, targets)
    started = time.perf_counter()
    model, log = train(cfg, Cache.open(cache_dir), prepared, teacher_dir)
    seconds = time.perf_counter() - started
    return {"pipeline": pipeline, "seed": seed, "source": "online" if teacher_dir else str(cache_dir),
            "targets": "online" if teacher_dir else targets,
            "score": score(pipeline, model, prepared), "metric": "perplexity" if pipeline == "text" else "accuracy",
            "train_seconds": seconds, "seconds_per_epoch": seconds / len(log),
            "final_loss": {k: v for k, v in log[-1].items() if k not in ("epoch", "lr", "seconds")}}


def step_check(pipeline: str, cache_dir: Path, prepared: Path, teacher_dir: Path, batches: int = 3) -> dict:
    """The k = V consistency check at the level of one step: on the first `batches` batches of
    seed 0's first epoch, a fresh student's soft term from the cache (`methods.soft`, as `kd
    distill` builds it) against the online one (the teacher's full softmax): the largest
    difference of the loss and of its gradient with respect to the student's logits. A cache
    that keeps every class differs from the teacher only by float16 rounding of the logits."""
    cfg = config(pipeline, 0)
    cache = Cache.open(cache_dir)
    task = tasks.for_cache(cache)
    dataset = task.rows(cache, prepared, cfg, 4096)
    teacher = tasks.for_teacher(teacher_dir).load_teacher(teacher_dir, None, None, device="cpu").model.eval()
    torch.manual_seed(cfg.seed)
    model = task.build(cfg, cache, prepared)
    cached = student_terms(cfg, Shapes({}, {})).terms["soft"][1]
    online = online_terms(cfg, task, model, cache, teacher).terms["soft"][1]
    worst = {"loss_cached": [], "loss_online": [], "max_abs_loss_diff": 0.0, "max_abs_grad_diff": 0.0,
             "max_abs_grad": 0.0}
    for _, batch in zip(range(batches), dataset.batches(0, cfg.batch_size, cfg.seed)):
        grads = []
        for term in (cached, online):
            logits = model(batch["x"]).detach().requires_grad_(True)
            loss = term(batch, {"logits": logits})
            loss.backward()
            grads.append(logits.grad)
            worst["loss_cached" if term is cached else "loss_online"].append(float(loss.detach()))
        worst["max_abs_loss_diff"] = max(worst["max_abs_loss_diff"],
                                         abs(worst["loss_cached"][-1] - worst["loss_online"][-1]))
        worst["max_abs_grad_diff"] = max(worst["max_abs_grad_diff"], float((grads[0] - grads[1]).abs().max()))
        worst["max_abs_grad"] = max(worst["max_abs_grad"], float(grads[1].abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", choices=list(PIPELINES), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, required=True, help="the cache (its rows; its soft targets with "
                        "--online unread)")
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--online", type=Path, default=None, metavar="TEACHER_DIR",
                        help="distil online from this teacher instead of from the cache's soft targets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="fewer epochs, for a quick check only")
    parser.add_argument("--targets", choices=["topk", "sampled"], default="topk",
                        help="what the soft term reads from the cache (sampled: a cache with label.sampling)")
    parser.add_argument("--step-check", action="store_true", help="with --online: compare one step's soft term "
                        "from the cache with the online one instead of training (`step_check`)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.step_check:
        print(json.dumps(step_check(args.pipeline, args.cache, args.prepared, args.online)), flush=True)
        return
    print(json.dumps(run(args.pipeline, args.seed, args.cache, args.prepared, args.online, args.epochs,
                         args.targets)), flush=True)


if __name__ == "__main__":
    main()
