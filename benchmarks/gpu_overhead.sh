#!/usr/bin/env bash
# Issue 7 on a GPU: the overhead benchmark on CUDA with bfloat16 autocast and channels_last, then
# the smallest pair again with torch.compile. One short, prepared run (about 10 minutes of device
# time): `bash benchmarks/gpu_overhead.sh [OUT_DIR]` from the repository root, with torch and
# align_kd installed (`bash scripts/setup.sh`) and CIFAR-10 at $ALIGN_KD_DATA or ../shared/data.
# Writes overhead_gpu.json, overhead_gpu_scaling.png and overhead_gpu_compile.json to OUT_DIR
# (default benchmarks/results) and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures the GPU path')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" benchmarks/overhead.py --device cuda --amp --channels-last --threads 4 \
    --out "$out/overhead_gpu.json" --plot "$out/overhead_gpu_scaling.png"
"$py" benchmarks/overhead.py --device cuda --amp --channels-last --compile --threads 4 --pairs cnn \
    --no-scaling --no-memory --out "$out/overhead_gpu_compile.json"
