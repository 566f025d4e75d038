#!/usr/bin/env bash
# The whole USP pipeline in miniature, on a CPU, in a few minutes:
#   synthetic JPEG dataset -> multi-view latent cache (tiny random VAE) -> MAE pretraining on the
#   cache -> transfer into DiT-tiny/2-VAE-simple -> DDPM finetuning -> sampling (PNGs, .npz, grid)
#   -> FID/IS/KID against the synthetic val split; plus a linear probe of the pretrained encoder.
#
# The VAE is random (no weights can be downloaded here), so decoded samples look like noise:
# the job shows the mechanics and the outputs of every stage, not image quality.
#
#   bash launchers/run_tiny.sh                 # outputs in runs/tiny
#   OUT=/tmp/x PYTHON=python3.11 bash launchers/run_tiny.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tiny}
DATA=${DATA:-$OUT/data}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }

step "1/7 synthetic dataset -> $DATA"
[ -f "$DATA/synthetic.json" ] || $PY launchers/make_synthetic.py --out "$DATA" --classes 10 --per-class 40 --size 64

step "2/7 latent cache: 2 RandomResizedCrop views (+ flips) per image"
$PY launchers/cache_latents.py --data-root "$DATA" --out "$OUT/cache" --views 2 --image-size 64 \
    --vae-path tiny-random --shard-size 200 --batch-size 50 --num-workers 0

step "3/7 MAE pretraining on the cached latents (vit_tiny_patch_vae)"
$PY launchers/pretrain.py --config configs/debug/tiny.yaml output_dir="$OUT/pretrain" data.root="$DATA" \
    data.format=latents data.latent_cache="$OUT/cache" optim.blr=1.5e-3 schedule.epochs=4

step "4/7 transfer MAE -> DiT-tiny/2-VAE-simple (14x14 -> 4x4 table, adaLN-Zero)"
$PY launchers/transfer.py --src "$OUT/pretrain/export/model.safetensors" --model DiT-tiny/2-VAE-simple \
    --input-size 8 --num-classes 10 --out "$OUT/transfer/dit.safetensors"

step "5/7 DDPM finetuning (online VAE, ADM crop, EMA)"
$PY launchers/finetune.py --config configs/debug/tiny_dit.yaml output_dir="$OUT/dit" data.root="$DATA" \
    checkpoint.init_from="$OUT/transfer/dit.safetensors"

step "6/7 sampling 80 images (EMA weights, DDPM 50 steps) and FID/IS/KID vs the val split"
$PY launchers/sample.py --model DiT-tiny/2-VAE-simple --ckpt "$OUT/dit/export/ema.safetensors" \
    --model-kwargs '{"input_size": 8}' --vae tiny-random --image-size 64 --num-classes 10 \
    --num-samples 80 --batch-size 40 --steps 50 --out-dir "$OUT/samples"
$PY launchers/evaluate.py --samples "$OUT/samples" --reference "$DATA/val" --feature-extractor usp-tiny \
    --metrics fid is kid

step "7/7 linear probe of the pretrained encoder (top-1 on val)"
$PY launchers/finetune.py --config configs/debug/tiny_linprobe.yaml output_dir="$OUT/linprobe" data.root="$DATA" \
    checkpoint.init_from="$OUT/pretrain/export/model.safetensors"

step "done"
echo "pretraining:  $OUT/pretrain/{metrics.jsonl,loss_curve.png,export/}"
echo "DiT:          $OUT/dit/{metrics.jsonl,loss_curve.png,export/}"
echo "samples:      $OUT/samples/grid.png, $OUT/samples/samples_80x64x64x3.npz, metrics in $OUT/samples/metrics.jsonl"
echo "linear probe: $OUT/linprobe/metrics.jsonl"
