#!/usr/bin/env bash
# GPU benchmark run: pretraining throughput/MFU, embedding and perturbation speed ("base"), then the
# distributed paths for real ("scale": the `mixgf pretrain` Trainer path vs the standalone loop,
# sharded `mixgf embed` under torchrun vs one process, FSDP and DeepSpeed pretraining steps).
# Usage on a GPU machine, from the project root, with the package importable (pip install -e . or
# PYTHONPATH=src) and the Baron human h5ad at $BARON (default ../shared/data/baron_pancreas_human.h5ad):
#   bash benchmarks/run_gpu.sh [OUT_DIR] [all|base|scale|checks|fsdp|classify]   # base ~8 min, scale ~9 min on one H100
# "fsdp" (not in "all"; ~3 min after "checks", whose quick demo it reuses) is FSDP2's first GPU run: the FSDP config
# at the tiny preset, bf16, 40 steps with held-out evaluation, a resume to 60, the same run as DDP, and the
# bundles compared (tied decoder, largest weight difference to DDP).
# "checks" (not in "all"; ~4 min) runs `mixgf demo --quick` twice on the GPU and compares the two runs'
# numbers (fine-tuning, embedding and pretraining determinism on CUDA with one device per process).
# "classify" (not in "all"; sized to ~9 min) is the real-budget classification run: the
# mix-geneformer preset at 2,048 genes per cell, random init vs pretrained on both species, with the
# demo's pretraining objective and fine-tuning recipe (benchmarks/results/finetune_cv_*.txt).
# Its pretraining holds out 5% of the training cells and scores them every 500 steps: the held-out MLM
# against the frequency baselines at a real budget (classify_held_out.csv, the issue's MLM target).
set -uo pipefail
out=${1:-benchmarks/gpu_results}
stage=${2:-all}
mkdir -p "$out"
baron=${BARON:-../shared/data/baron_pancreas_human.h5ad}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

if [[ $stage == all || $stage == base ]]; then
  timeout 330 python3 benchmarks/pretrain.py --device cuda --quick 2>&1 | tee "$out/pretrain.txt"
  timeout 90 python3 benchmarks/embed.py --device cuda --data "$baron" --n-cells 256 --batch-size 64 2>&1 | tee "$out/embed.txt"
  timeout 90 python3 benchmarks/perturb.py --device cuda --data "$baron" --cells 4 --max-len 2048 --batch-size 128 --precision fp32,bf16 --loop-variants 64 2>&1 | tee "$out/perturb.txt"
fi

if [[ $stage == all || $stage == scale ]]; then
  work="$out/scale_work"
  ngpu=$(nvidia-smi -L | wc -l)
  world=$(( ngpu > 1 ? ngpu : 2 ))   # on a one-GPU machine two ranks share cuda:0
  # 1. `mixgf pretrain` (run_pretraining: sampler, collator, DataLoader workers, Trainer) vs the loop,
  #    alternating, at the loop's best H100 settings: mix-geneformer, batch 64 x 2,048, compiled blocks.
  timeout 420 python3 benchmarks/pretrain.py --device cuda --quick --presets mix-geneformer --batch 64 \
      --no-baseline --trainer --workers 4 --rounds 2 --workdir "$work/pretrain" 2>&1 | tee "$out/pretrain_trainer.txt"
  # 2. Sharded embedding: one process vs torchrun, fp32 (equal to 1e-5) and bf16 autocast.
  for precision in fp32 auto; do
    timeout 240 python3 benchmarks/sharded_embed.py --device cuda --data "$baron" --world "$world" --n-cells 2048 \
        --batch-size 64 --precision "$precision" --workdir "$work/embed" 2>&1 | tee -a "$out/sharded_embed.txt"
  done
  # 3. FSDP (Accelerate's FSDP2, the tied MLM head in one group) and DeepSpeed ZeRO-2 pretraining, 30 steps
  #    each on the Baron corpus built in step 2 (FSDP's first GPU run: its line records the exit status); GPU memory
  #    sampled with nvidia-smi (reserved, so above the allocator's peak); tokens/s and MFU from metrics.csv.
  for strategy in fsdp deepspeed; do
    if [[ $strategy == deepspeed ]] && ! python3 -c "import deepspeed" 2>/dev/null; then
      echo "deepspeed not installed (pip install 'mixgeneformer[deepspeed]'): skipped" | tee -a "$out/strategies.txt"; continue
    fi
    config=configs/geneformer_v2_fsdp.yaml
    [[ $strategy == deepspeed ]] && config=configs/mix_geneformer_deepspeed.yaml
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$work/mem_$strategy.txt" &
    sampler=$!
    timeout 240 torchrun --nproc_per_node "$ngpu" -m mixgeneformer pretrain --config "$config" \
        output_dir="$work/run_$strategy" "data.corpus=[$work/embed/corpus]" data.vocab="$work/embed/model/vocab.json" \
        data.medians="$work/embed/model/medians.tsv" data.eval_fraction=0 train.max_steps=30 train.warmup_steps=3 \
        checkpoint.save_steps=30 logging.logging_steps=5 logging.progress_bar=false logging.tensorboard=false \
        --overwrite > "$work/log_$strategy.txt" 2>&1
    status=$?
    kill "$sampler"
    {
      echo "== $strategy ($config, $ngpu GPU(s)): exit $status; peak nvidia-smi memory.used MiB: $(sort -n "$work/mem_$strategy.txt" | tail -1)"
      tail -n 4 "$work/run_$strategy/metrics.csv" 2>/dev/null || tail -n 20 "$work/log_$strategy.txt"
    } | tee -a "$out/strategies.txt"
  done
fi

if [[ $stage == classify ]]; then
  timeout 560 python3 benchmarks/classify.py --device cuda --preset mix-geneformer --max-len 2048 --steps 1500 --batch 32 \
      --eval-fraction 0.05 --eval-steps 500 \
      --models random,both --seeds 0 --mlm-bias-init unigram \
      --overrides cross_species_weight=0.05,cross_species_queue=1024,cross_species_k=20 \
      --finetune-epochs 5 --finetune-set batch_size=32,validation_fraction=0,attention_dropout=0,hidden_dropout=0,bf16=true \
      --work-dir "$out/classify_work" --out "$out/classify.csv" 2>&1 | grep -v "^{" | tee "$out/classify.txt"
fi

if [[ $stage == checks ]]; then
  for run in a b; do
    start=$SECONDS
    timeout 240 python3 -m mixgeneformer demo --quick --device cuda --out "$out/checks_demo_$run" --overwrite \
        > "$out/checks_demo_$run.log" 2>&1
    echo "demo --quick run $run: exit $?, wall $((SECONDS - start)) s" | tee -a "$out/checks.txt"
  done
  python3 - "$out/checks_demo_a" "$out/checks_demo_b" <<'PY' 2>&1 | tee -a "$out/checks.txt"
import json, sys
from pathlib import Path
import numpy as np
import pandas as pd
a, b = (Path(p) for p in sys.argv[1:3])
for name in ("classify/metrics_per_seed.csv", "pretrain/run/metrics.csv"):
    x, y = pd.read_csv(a / name), pd.read_csv(b / name)
    speed = {"tokens_per_s", "mfu", "time_s"}  # throughput columns differ between runs by nature
    num = [c for c in x.columns if c in y.columns and c not in speed and pd.api.types.is_numeric_dtype(x[c])]
    diff = float(np.nanmax(np.abs(x[num].to_numpy(float) - y[num].to_numpy(float)))) if len(x) == len(y) else float("nan")
    print(f"{name}: {len(x)} / {len(y)} rows; largest difference between the two runs {diff:.3g}")
ma, mb = (json.loads((p / "report" / "metrics.json").read_text()) for p in (a, b))
print("species mixing a:", ma.get("embed", {}).get("species_mixing"), "\nspecies mixing b:", mb.get("embed", {}).get("species_mixing"))
PY
fi

if [[ $stage == fsdp ]]; then
  work="$out/fsdp_work"
  ngpu=$(nvidia-smi -L | wc -l)
  demo="$out/checks_demo_a"
  if [[ ! -d $demo/tokenize/corpus ]]; then
    demo="$work/demo"
    timeout 240 python3 -m mixgeneformer demo --quick --device cuda --out "$demo" --overwrite > "$work.demo.log" 2>&1
  fi
  common=(data.corpus="[$demo/tokenize/corpus]" data.vocab="$demo/vocab/vocab.json" data.medians="$demo/medians/medians.tsv"
          model.preset=tiny objective.pooling=mean data.eval_fraction=0.05 data.workers=0 train.warmup_steps=4 train.per_device_batch_size=16
          checkpoint.save_steps=20 logging.logging_steps=10 logging.eval_steps=20 logging.progress_bar=false
          logging.tensorboard=false)
  for run in fsdp ddp; do
    timeout 150 torchrun --nproc_per_node "$ngpu" -m mixgeneformer pretrain --config configs/geneformer_v2_fsdp.yaml \
        output_dir="$work/run_$run" distributed.strategy=$run train.max_steps=40 "${common[@]}" --overwrite \
        > "$work.log_$run.txt" 2>&1
    echo "== $run, 40 steps on $ngpu GPU(s): exit $?" | tee -a "$out/fsdp.txt"
    tail -n 3 "$work/run_$run/metrics.csv" 2>/dev/null | tee -a "$out/fsdp.txt" || tail -n 20 "$work.log_$run.txt" | tee -a "$out/fsdp.txt"
  done
  timeout 120 torchrun --nproc_per_node "$ngpu" -m mixgeneformer pretrain --config configs/geneformer_v2_fsdp.yaml \
      output_dir="$work/run_fsdp" distributed.strategy=fsdp train.max_steps=60 "${common[@]}" --resume \
      > "$work.log_resume.txt" 2>&1
  echo "== fsdp resumed to 60 steps: exit $?; checkpoints: $(ls "$work/run_fsdp" | grep checkpoint- | tr '\n' ' ')" | tee -a "$out/fsdp.txt"
  python3 - "$work/run_fsdp" "$work/run_ddp" <<'PY' 2>&1 | tee -a "$out/fsdp.txt"
import sys
import torch
from mixgeneformer.bundle import load_bundle
from safetensors.torch import load_file
fsdp, ddp = sys.argv[1:3]
model, vocab, _ = load_bundle(f"{fsdp}/model")
tied = model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
print("fsdp bundle (60 steps) loads; decoder tied to the word embeddings:", tied)
a, b = load_file(f"{fsdp}/checkpoint-40/model.safetensors"), load_file(f"{ddp}/checkpoint-40/model.safetensors")
print("checkpoint-40 keys equal to DDP's:", sorted(a) == sorted(b), len(a))
print("largest |fsdp - ddp| weight difference at step 40 (bf16 training):", max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b))
PY
fi
