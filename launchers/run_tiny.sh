#!/usr/bin/env bash
# The whole USP pipeline in miniature, on a CPU, in about two minutes, with results that mean something:
#   synthetic JPEG dataset -> latent caches (the shipped small VAE synthetic-f8, trained on this dataset)
#   -> MAE pretraining on the cache -> transfer into DiT-tiny/2-VAE-simple -> DDPM finetuning -> sampling
#   (PNGs, .npz, grid) -> FID/IS/KID/precision-recall against the val split with the shipped extractor
#   usp-synthetic, beside real-image, noise and random-latent reference values -> a linear probe of the
#   pretrained encoder. Ends with a summary table (OUT/summary.json) and fails if the samples do not beat
#   the baselines. The metrics hold for this synthetic dataset only.
#
#   bash launchers/run_tiny.sh                 # outputs in runs/tiny
#   OUT=/tmp/x PYTHON=python3.11 bash launchers/run_tiny.sh
#   DIT_STEPS=500 bash launchers/run_tiny.sh   # shorter DiT finetuning (worse samples)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tiny}
DATA=${DATA:-$OUT/data}
PY=${PYTHON:-python3}
DIT_STEPS=${DIT_STEPS:-2000}
export HF_HUB_OFFLINE=1
# The models are tiny: one thread each wastes little on a quiet machine and keeps the job from stalling on a
# loaded one (threads spinning against other processes). Set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }
T0=$(date +%s)

step "1/8 synthetic dataset -> $DATA (10 classes: shape, colour, texture)"
[ -f "$DATA/synthetic.json" ] || $PY launchers/make_synthetic.py --out "$DATA" --classes 10 --per-class 100 \
    --val-per-class 8 --size 64

step "2/8 latent caches with the shipped VAE synthetic-f8: 2 RandomResizedCrop views (pretraining), ADM crop (DiT)"
for spec in "pre pretrain 2" "dit adm 1"; do
    set -- $spec
    $PY launchers/cache_latents.py --data-root "$DATA" --out "$OUT/cache_$1" --augment "$2" --views "$3" \
        --image-size 64 --vae-path synthetic-f8 --shard-size 500 --batch-size 100 --num-workers 0 --no-progress
done

step "3/8 MAE pretraining on the cached latents (vit_tiny_patch_vae, 8 epochs)"
$PY launchers/pretrain.py --config configs/debug/tiny.yaml output_dir="$OUT/pretrain" data.root="$DATA" \
    data.format=latents data.latent_cache="$OUT/cache_pre"

step "4/8 transfer MAE -> DiT-tiny/2-VAE-simple (14x14 -> 4x4 table, adaLN-Zero)"
$PY launchers/transfer.py --src "$OUT/pretrain/export/model.safetensors" --model DiT-tiny/2-VAE-simple \
    --input-size 8 --num-classes 10 --out "$OUT/transfer/dit.safetensors"

step "5/8 DDPM finetuning, $DIT_STEPS steps (cached ADM-crop latents, posterior samples, EMA)"
$PY launchers/finetune.py --config configs/debug/tiny_dit.yaml output_dir="$OUT/dit" data.root="$DATA" \
    data.format=latents data.latent_cache="$OUT/cache_dit" schedule.max_steps="$DIT_STEPS" \
    checkpoint.init_from="$OUT/transfer/dit.safetensors"

step "6/8 sampling 80 images (EMA weights, DDPM 50 steps, guidance 3) and FID/IS/KID/PR vs the val split"
$PY launchers/sample.py --model DiT-tiny/2-VAE-simple --ckpt "$OUT/dit/export/ema.safetensors" \
    --model-kwargs '{"input_size": 8}' --vae synthetic-f8 --image-size 64 --num-classes 10 \
    --num-samples 80 --batch-size 40 --steps 50 --cfg-scale 3.0 --out-dir "$OUT/samples"
$PY launchers/evaluate.py --samples "$OUT/samples" --reference "$DATA/val" --feature-extractor usp-synthetic \
    --metrics fid is kid pr --no-progress

step "7/8 linear probe of the pretrained encoder (top-1 on val; chance 10 %)"
$PY launchers/finetune.py --config configs/debug/tiny_linprobe.yaml output_dir="$OUT/linprobe" data.root="$DATA" \
    checkpoint.init_from="$OUT/pretrain/export/model.safetensors"

step "8/8 summary: the samples beside real images, noise and random latents"
$PY launchers/tiny_report.py --run "$OUT" --data "$DATA"

step "done in $(( $(date +%s) - T0 )) s"
echo "pretraining:  $OUT/pretrain/{metrics.jsonl,loss_curve.png,export/}"
echo "DiT:          $OUT/dit/{metrics.jsonl,loss_curve.png,export/}"
echo "samples:      $OUT/samples/grid.png, $OUT/samples/samples_80x64x64x3.npz, metrics in $OUT/samples/metrics.jsonl"
echo "linear probe: $OUT/linprobe/metrics.jsonl"
echo "summary:      $OUT/summary.json"
