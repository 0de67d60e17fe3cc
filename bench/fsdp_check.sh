#!/usr/bin/env bash
# FSDP text students on GPUs: tests/test_fsdp.py where `kd distill` under torchrun joins with nccl,
# one rank per GPU (kd.parallel picks nccl whenever CUDA is there), against a single CPU process.
# Needs at least 2 CUDA devices (NCCL refuses two ranks on one GPU); on CPU the same tests run
# with gloo as part of the ordinary suite. Usage, from anywhere: bash bench/fsdp_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
    echo "bench/fsdp_check.sh: needs 2 CUDA devices (one nccl rank each), found $gpus" >&2
    exit 2
fi
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())"
PYTHONPATH="$PWD" python -m pytest -q -x -p no:cacheprovider tests/test_fsdp.py
