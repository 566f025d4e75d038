#!/usr/bin/env bash
# GPU check of the training system on one device (a few minutes): exact resume with bf16 autocast and
# CUDA RNG (local), DDP (nccl) and FSDP2 (bf16 MixedPrecisionPolicy) one-process runs through torchrun,
# then the engine-path step benchmark (eager) for MAE-XL (batch 256) and DiT-XL/2 (128), torch reference path vs Triton kernels
# (a smoke run of the tiny models first, so a broken script fails in seconds).
#   bash benchmarks/train/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
$PY - "$OUT" <<'PYEOF'
import json, os, sys
sys.path.insert(0, "tests")
import torch
import _helpers_train as H
out = sys.argv[1]
r = H.run_resume_pair("local", os.path.join(out, "resume"), **{"engine.precision": "auto", "optim.fused": "true"})
print("GPU local bf16 exact resume:", r["full"] == r["split"], r["model_equal"], r["ema_equal"], r["full"][:3])
PYEOF
for eng in ddp fsdp2; do
  $PY -m torch.distributed.run --nproc_per_node 1 launchers/pretrain.py --config configs/debug/synthetic_pretrain.yaml \
      output_dir="$OUT/$eng" engine.name=$eng schedule.max_steps=6 progress=false 2>&1 | grep -E "done|Error|error" | tail -3
  tail -1 "$OUT/$eng/metrics.jsonl"
done
$PY benchmarks/train/bench_step.py --smoke --kernels torch,auto,triton --csv "$OUT/train_step_smoke.csv" | tail -8
$PY benchmarks/train/bench_step.py --models MAE-XL@256,DiT-XL/2@128 --compile eager --kernels torch,auto \
    --steps 20 --warmup 5 --csv "$OUT/train_step.csv" | tail -6
