#!/usr/bin/env bash
# GPU benchmark run (one H100): pretraining throughput/MFU, then embedding and perturbation speed.
# Usage on a GPU machine, from the project root, with the package importable (pip install -e . or
# PYTHONPATH=src) and the Baron human h5ad at $BARON (default ../shared/data/baron_pancreas_human.h5ad):
#   bash benchmarks/run_gpu.sh [OUT_DIR]
set -uo pipefail
out=${1:-benchmarks/gpu_results}
mkdir -p "$out"
baron=${BARON:-../shared/data/baron_pancreas_human.h5ad}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 330 python3 benchmarks/pretrain.py --device cuda --quick 2>&1 | tee "$out/pretrain.txt"
timeout 90 python3 benchmarks/embed.py --device cuda --data "$baron" --n-cells 256 --batch-size 64 2>&1 | tee "$out/embed.txt"
timeout 90 python3 benchmarks/perturb.py --device cuda --data "$baron" --cells 4 --max-len 2048 --batch-size 128 --precision fp32,bf16 --loop-variants 64 2>&1 | tee "$out/perturb.txt"
