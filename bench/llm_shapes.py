"""A Qwen2-0.5B-shaped language model at its real vocabulary (151,936): what kd's distillation
step and `kd label` cost against plain Hugging Face on the same model and tokens.

    python bench/llm_shapes.py                   # CPU, 4 layers, 2,048 tokens: ~10 min on 2 cores
    python bench/llm_shapes.py --only label --repo OTHER_CHECKOUT --out other.json   # another kd/
    python bench/llm_shapes.py --device cuda --layers 24 --tokens 2048 8192   # the GPU machine (bench/gpu_check.sh)

The model is Qwen2-0.5B's shape (model_type qwen2: vocabulary 151,936, hidden 896,
intermediate 4,864, 14 heads with 2 key-value heads, tied embedding) with `--layers` layers
(4 on CPU: the output layer, not the body, decides the cost at this vocabulary), random
weights, and a 4,096-entry byte-level BPE trained on pydoc by `tokenizers` (the ids the text
uses; the model keeps its 151,936 outputs). Each case runs in a process of its own, with
`--threads` torch threads:
- `kd_step` / `hf_step`, at each `--tokens` (one block of that many tokens per step, batch 1,
  fused AdamW, `--steps` steps after a warm-up): kd's distillation step (soft top-32 at T = 1
  plus hard, weights 0.5/0.5, `kd distill`'s own `training.step` with the terms kd builds for
  that student config, on a batch of kd's loader from a real cache) against the same model's
  plain Hugging Face step, `model(input_ids, labels=input_ids).loss`. The student is built by
  kd (`task.build`) in both. Memory: the peak resident memory (VmHWM, Linux) over what the
  process held before the first step (the model, its batch; reset with /proc/self/clear_refs),
  so the optimizer state, activations, logits and whatever the loss keeps; on CUDA
  `torch.cuda.max_memory_allocated` over the allocated memory before the first step.
- `label`: `kd.cache.label` into a fresh directory against the teacher's bare forward
  (`model(input_ids=blocks).logits`, nothing kept) over the same blocks of 256 tokens
  (`--label-blocks`, 24 by default: 6,120 predicted tokens) in the same batches (256 rows, the
  default `label.batch_size`: one block), top-32 at T = 1, interleaved `--rounds` rounds; the
  ratio is the median of the per-round ratios. The model's load is counted for neither: it is
  loaded once before both. `--profile` adds a cProfile of one more `kd label` (own time per
  function), to say where the rest goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QWEN = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
        "num_key_value_heads": 2, "tie_word_embeddings": True}
SMALL = {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
         "num_key_value_heads": 1, "num_hidden_layers": 1, "tie_word_embeddings": True}  # labels the step's cache
LABEL_BLOCK = 256  # --label-blocks of them (24: 6,120 predicted tokens), half labeled, a quarter unlabeled, test
TOP_K = 32
STUDENT = {"epochs": 1, "batch_size": 1, "lr": 1e-4, "weight_decay": 0.01, "transfer": ["labeled"],
           "loss": {"soft": {"weight": 0.5, "temperature": 1}, "hard": {"weight": 0.5, "labels": True}}}


def make_model(directory: Path, fields: dict, positions: int) -> None:
    """A qwen2 model of `fields` with random weights and a 4,096-entry BPE trained on pydoc."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.tokenizer import pydoc_tokenizer

    tokenizer = pydoc_tokenizer()
    config = AutoConfig.for_model("qwen2", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  max_position_embeddings=positions, **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _prepare(root: Path, teacher: Path, block: int, blocks: tuple[int, int, int]) -> Path:
    from kd.config import PrepareConfig, Shares
    from kd.sources import text as text_source

    out = root / f"prepared-{block}"
    if not out.exists():
        text_source.prepare(PrepareConfig(dataset="pydoc", tokenizer=str(teacher), block_size=block,
                                          labeled=blocks[0], unlabeled=blocks[1], test=blocks[2], shares=Shares()),
                            out)
    return out


def _status_kib(key: str) -> int:
    """A figure of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak since clear_refs)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# --- the cases, each in its own process ----------------------------------------------------------


def label_blocks(total: int) -> tuple[int, int, int]:
    """Blocks of the labeled, unlabeled and test splits for `total` blocks."""
    test = max(1, total // 4)
    unlabeled = max(1, total // 4)
    return total - test - unlabeled, unlabeled, test


def label_case(root: Path, layers: int, device: str, rounds: int, blocks: int, profile: bool) -> dict:
    """kd.cache.label / the bare forward, interleaved rounds, the model loaded once for both; with
    `profile`, a cProfile of one more `kd_label` (its functions by own time)."""
    import torch

    from bench.timing import interleave
    from kd import tasks
    from kd.cache import label
    from kd.config import LabelConfig
    from kd.prepared import tokens
    from kd.tasks import causal_lm

    prepared = _prepare(root, root / f"qwen-{layers}", LABEL_BLOCK, label_blocks(blocks))
    teacher = causal_lm.load_teacher(root / f"qwen-{layers}", dtype="float32", device=device)
    cfg = LabelConfig(top_k=TOP_K, temperatures=[1.0], batch_size=256)  # the default: rows per forward
    splits = [torch.from_numpy(tokens.read_blocks(prepared / f"{s}.parquet")[1]) for s in ("labeled", "unlabeled",
                                                                                             "test")]
    per_batch = max(1, cfg.batch_size // (LABEL_BLOCK - 1))  # as `kd label` cuts its batches
    on = torch.device(device)

    def sync() -> None:
        if on.type == "cuda":
            torch.cuda.synchronize()

    def bare_forward() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for blocks in splits:
                for batch in blocks.split(per_batch):
                    _ = teacher.model(input_ids=batch.to(on)).logits
        sync()
        return time.perf_counter() - started

    runs = iter(range(rounds + 1))

    def kd_label() -> float:
        out = root / f"cache-label-{next(runs)}"
        started = time.perf_counter()
        label(teacher, prepared, out, cfg, task_inputs=tasks.inputs_for(prepared, teacher), progress=False)
        sync()
        return time.perf_counter() - started

    bare_forward()  # warm-up: the first forward allocates what later ones reuse
    times = interleave({"bare_forward": bare_forward, "kd_label": kd_label}, rounds)
    ratios = [b / a for a, b in zip(times["bare_forward"], times["kd_label"])]
    result = {"tokens": sum(len(s) for s in splits) * (LABEL_BLOCK - 1), "block_size": LABEL_BLOCK,
              "batch_rows": cfg.batch_size, "top_k": TOP_K, "seconds": times,
              "kd_label_over_bare_forward": statistics.median(ratios)}
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(kd_label)
        stats = pstats.Stats(profiler)
        top = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:12]  # by own time
        result["profile_own_seconds"] = {f"{Path(f).name}:{line}({name})": round(v[2], 2)
                                         for (f, line, name), v in top}
        result["profile_total_seconds"] = round(stats.total_tt, 2)
    return result


def step_case(form: str, root: Path, layers: int, tokens: int, device: str, steps: int) -> dict:
    """One form's training steps on blocks of `tokens`: median seconds and the step's peak memory."""
    import torch

    from kd import tasks, training
    from kd.cache import Cache
    from kd.config import student
    from kd.methods import Shapes, student_terms

    cache = Cache.open(root / f"cache-{tokens}")
    prepared = root / f"prepared-{tokens}"
    cfg = student(root / "params.yaml", f"qwen{layers}")
    task = tasks.for_cache(cache)
    torch.manual_seed(0)
    model = task.build(cfg, cache, prepared)
    batches = list(task.rows(cache, prepared, cfg, 1e9).batches(0, 1, 0))[:steps + 1]
    on = torch.device(device)
    model.to(on)
    batches = [{k: v.to(on) for k, v in b.items()} for b in batches]
    if form == "kd_step":
        built = student_terms(cfg, Shapes(task.student_shapes(model, cfg, [], cache), {}))
        for module in built.modules:
            module.to(on).train()
        weights = torch.tensor([w for w, _ in built.terms.values()], device=on)
        params = [*model.parameters(), *(p for m in built.modules for p in m.parameters())]

        def loss_of(batch: dict) -> torch.Tensor:
            values = training.step(model, batch, built.terms, list(built.taps))
            return torch.stack(list(values.values())) @ weights
    else:
        hf = model.model if hasattr(model, "model") and not hasattr(model, "lm_head") else model  # TokenRows' model
        params = list(model.parameters())

        def loss_of(batch: dict) -> torch.Tensor:
            x = batch["x"]
            return hf(input_ids=x, labels=x).loss

    model.train()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if on.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts again from here
        before = _status_kib("VmRSS") * 1024
    times = []
    for batch in batches:  # the first is a warm-up (the optimizer's state is made there)
        started = time.perf_counter()
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if on.type == "cuda" else _status_kib("VmHWM") * 1024
    return {"seconds": statistics.median(times[1:]), "step_peak_mb": (peak - before) / 2**20,
            "held_before_mb": before / 2**20, "loss": float(loss)}


# --- the parent: builds the world once, runs each case in a fresh process -------------------------


def build(root: Path, layers: int, token_sizes: list[int], steps: int, need_label: bool, label_total: int) -> None:
    """The models, prepared blocks, caches and params.yaml every case reads (made once)."""
    import yaml

    from kd import tasks
    from kd.cache import label
    from kd.config import LabelConfig
    from kd.tasks import causal_lm

    positions = max([LABEL_BLOCK, *token_sizes])
    if need_label or token_sizes:
        make_model(root / f"qwen-{layers}", {**QWEN, "num_hidden_layers": layers}, positions)
    if need_label:
        _prepare(root, root / f"qwen-{layers}", LABEL_BLOCK, label_blocks(label_total))
    if token_sizes:
        make_model(root / "small", SMALL, positions)
        small = causal_lm.load_teacher(root / "small", dtype="float32", device="cpu")
        for tokens in token_sizes:
            prepared = _prepare(root, root / "small", tokens, (steps + 1, 1, 1))
            label(small, prepared, root / f"cache-{tokens}", LabelConfig(top_k=TOP_K, temperatures=[1.0],
                                                                         batch_size=tokens),
                  task_inputs=tasks.inputs_for(prepared, small), progress=False)
        arch_kwargs = {k: v for k, v in QWEN.items() if k != "vocab_size"} | {"num_hidden_layers": layers}
        students = {f"qwen{layers}": {"arch": "qwen2", "arch_kwargs": arch_kwargs, **STUDENT}}
        (root / "params.yaml").write_text(yaml.safe_dump({"students": students}))


def child(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(args.repo))
    import torch

    torch.set_num_threads(args.threads)
    form = args.child[0]
    if form == "label":
        return label_case(args.root, args.layers, args.device, args.rounds, args.label_blocks, args.profile)
    return step_case(form, args.root, args.layers, int(args.child[1]), args.device, args.steps)


def run_child(args: argparse.Namespace, *child_args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *child_args, "--root", str(args.root), "--repo", str(args.repo),
           "--layers", str(args.layers), "--device", args.device, "--threads", str(args.threads),
           "--steps", str(args.steps), "--rounds", str(args.rounds), "--label-blocks", str(args.label_blocks),
           *(["--profile"] if args.profile else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(child_args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[2048], help="block lengths of the step cases")
    parser.add_argument("--layers", type=int, default=4, help="the model's layers (Qwen2-0.5B has 24)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each case's process")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per step case, after a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the label case")
    parser.add_argument("--label-blocks", type=int, default=24, help="blocks of 256 tokens the label case labels")
    parser.add_argument("--profile", action="store_true", help="the label case: also a cProfile of one kd label")
    parser.add_argument("--only", choices=["label", "step"], help="one kind of case alone")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose kd/ the cases import")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results_llm_shapes.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sys.path.insert(0, str(args.repo))
    token_sizes = [] if args.only == "label" else args.tokens
    results: dict = {"model": {"arch": "qwen2", **QWEN, "num_hidden_layers": args.layers}, "device": args.device,
                     "threads": args.threads, "repo": str(args.repo), "steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        args.root = Path(tmp)
        build(args.root, args.layers, token_sizes, args.steps, args.only != "step", args.label_blocks)
        for tokens in token_sizes:
            forms = {}
            for form in ("hf_step", "kd_step"):
                forms[form] = run_child(args, form, str(tokens))
                print(f"{tokens} tokens, {form}: {json.dumps(forms[form])}", flush=True)
            kd, hf = forms["kd_step"], forms["hf_step"]
            forms |= {"time_ratio": kd["seconds"] / hf["seconds"],
                      "memory_ratio": kd["step_peak_mb"] / hf["step_peak_mb"]}
            results["steps"][str(tokens)] = forms
            print(f"{tokens} tokens: kd step {kd['seconds']:.2f} s, {kd['step_peak_mb']:.0f} MB; plain HF step "
                  f"{hf['seconds']:.2f} s, {hf['step_peak_mb']:.0f} MB; kd/HF time {forms['time_ratio']:.2f}, "
                  f"memory {forms['memory_ratio']:.2f}", flush=True)
        if args.only != "step":
            results["label"] = run_child(args, "label")
            seconds = results["label"]["seconds"]
            print(f"label: kd label {statistics.median(seconds['kd_label']):.1f} s, bare forward "
                  f"{statistics.median(seconds['bare_forward']):.1f} s, ratio "
                  f"{results['label']['kd_label_over_bare_forward']:.2f}", flush=True)
    from bench import stamp

    stamp.write(args.out, results)


if __name__ == "__main__":
    main()
