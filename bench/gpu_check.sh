#!/usr/bin/env bash
# The CUDA paths of issue 31 on a lent GPU machine, in one short run (about 5 minutes on one H100):
#   bash bench/gpu_check.sh            # from the repository root; results under ${OUT:-bench/gpu}
# 1. kd label's scan of the logits on CUDA equals the CPU's (targets.soft_targets, tolerance);
# 2. liger-kernel's fused cross-entropy against F.cross_entropy, when liger-kernel is importable
#    (LIGER_WHEEL=path.whl installs a wheel first, without dependencies: the machine is offline);
# 3. bench/llm_shapes.py on CUDA: the full Qwen2-0.5B shape (24 layers) at 2,048 and 8,192 tokens
#    (kd's step against the plain Hugging Face step) and kd label against the bare forward;
# 4. a 2-process DDP (nccl) `kd distill` smoke, only with 2 or more GPUs (nccl puts one rank per GPU).
set -euo pipefail
OUT=${OUT:-bench/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

echo "== 1. label's scan on cuda vs cpu"
python - <<'PY' 2>&1 | tee "$OUT/scan.txt"
import numpy as np, torch
from kd.cache.targets import soft_targets
g = torch.Generator().manual_seed(0)
logits = torch.randn(512, 151936, generator=g) * 2
for dtype in (torch.float32, torch.bfloat16):
    z = logits.to(dtype)
    cpu, gpu = soft_targets(z, 32, [1, 4], "float32"), soft_targets(z.cuda(), 32, [1, 4], "float32")
    same_idx = float((cpu["topk_idx"] == gpu["topk_idx"]).mean())
    worst = max(float(np.abs(cpu[k] - gpu[k]).max()) for k in ("topk_logit", "logit_max", "lse_t1", "lse_t4"))
    print(f"{dtype}: top-k ids equal {same_idx:.4f}, largest |cpu - cuda| {worst:.2e}")
    assert same_idx > 0.999 and worst < 1e-3
PY

echo "== 2. liger-kernel"
if [ -n "${LIGER_WHEEL:-}" ]; then pip install --no-deps --no-index "$LIGER_WHEEL"; fi
python - <<'PY' 2>&1 | tee "$OUT/liger.txt"
import torch, torch.nn.functional as F
from kd import kernels
ce = kernels.liger_cross_entropy("cuda")
if ce is None:
    print("liger-kernel not importable here (or KD_LIGER=0): kd's own forms only; nothing to compare")
else:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4096, 896, device="cuda", generator=g, requires_grad=True)
    weight = (torch.randn(151936, 896, device="cuda", generator=g) * 0.03).requires_grad_()
    labels = torch.randint(0, 151936, (4096,), device="cuda", generator=g)
    labels[::7] = -1
    got = ce(hidden, weight, labels)
    keep = labels >= 0
    want = F.cross_entropy(hidden[keep] @ weight.T, labels[keep])
    print(f"liger {float(got):.6f} vs F.cross_entropy {float(want):.6f}")
    assert abs(float(got) - float(want)) < 1e-3 * abs(float(want))
PY

echo "== 3. bench/llm_shapes.py on cuda"
python bench/llm_shapes.py --device cuda --layers 24 --tokens 2048 8192 --threads 8 --steps 3 --rounds 3 \
  --out "$OUT/results_llm_shapes_cuda.json" 2>&1 | grep -v "Writing model shards" | tee "$OUT/llm_shapes.txt"

echo "== 4. DDP (nccl) smoke"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python -m pytest -x -q -k "torchrun" tests/test_distributed.py 2>&1 | tail -3 | tee "$OUT/ddp.txt"
else
  echo "one GPU: nccl needs a GPU per rank, no DDP smoke here" | tee "$OUT/ddp.txt"
fi
