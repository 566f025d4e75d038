#!/usr/bin/env bash
# The USP + VA-VAE + LightningDiT chain (docs/method.md §10) in miniature, on a CPU, in a few minutes, with the
# main job's baselines beside its numbers:
#   synthetic JPEG dataset -> latent caches with the shipped x16 VAE synthetic-f16 (VA-VAE's block layout, 32
#   channels; 4x4x32 latents at 64 px) and their fp64 channel statistics -> USP pretraining of LightningMAE-tiny/1
#   (LightningDiT blocks, patch 1) -> exact transfer into LightningDiT-tiny/1 -> flow finetuning with LightningDiT's
#   options (task=sit, logit-normal t, cosine loss, AdamW beta2 0.95, EMA) -> sampling (Euler ODE, timestep shift
#   0.3, guidance 3) -> FID/IS/KID/precision-recall against the val split with the shipped extractor usp-synthetic.
#   Baselines, trained and measured the same way: the same LightningDiT from scratch for the same steps (run beside
#   the USP one, one thread each); the reference values of real train images, the VAE decoding random latents
#   (N(0, 1) in the normalised space, through the channel statistics) and uniform noise. Ends with the summary table
#   of launchers/tiny_report.py (OUT/summary.json) and fails if the samples do not beat the noise baselines.
#   Whether USP wins here is printed, not assumed (docs/tiny.md).
#
#   bash launchers/run_tiny_lightning.sh                   # outputs in runs/tiny_lightning
#   OUT=/tmp/x PYTHON=python3.11 bash launchers/run_tiny_lightning.sh
#   DIT_STEPS=500 MAE_EPOCHS=4 bash launchers/run_tiny_lightning.sh    # shorter (worse samples)
#   DATA=runs/tiny/data bash launchers/run_tiny_lightning.sh            # reuse the main job's dataset
#
# Stage bookkeeping as launchers/run_tiny.sh (launchers/tiny_common.sh): a rerun into the same OUT reuses every
# stage whose settings are unchanged and redoes the others, saying which setting changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then
    echo "run_tiny_lightning.sh: unknown argument(s) '$*' (settings are environment variables: OUT, DATA, PYTHON, \
DIT_STEPS, MAE_EPOCHS)" >&2
    exit 2
fi
OUT=${OUT:-runs/tiny_lightning}
DATA=${DATA:-$OUT/data}
PY=${PYTHON:-python3}
DIT_STEPS=${DIT_STEPS:-2000}
MAE_EPOCHS=${MAE_EPOCHS:-8}
. launchers/tiny_common.sh

tiny_data "1/7"
# the cache writer adds latent_stats.json (fp64 channel statistics of the posterior sample) to each f16d32 cache;
# every stage below normalises with the ADM cache's, the statistics of the latents the LightningDiT learns
tiny_caches "2/7" synthetic-f16 --vae-version f16d32
STATS="$OUT/cache_dit"

step "3/7 USP pretraining of LightningMAE-tiny/1 on the cached latents (patch 1, 4x4x32, $MAE_EPOCHS epochs)"
SETTINGS="MAE_EPOCHS=$MAE_EPOCHS
recipe=$(sha configs/debug/tiny.yaml configs/debug/tiny_lightning.yaml)
caches=$(record caches)
code=$COMMIT"
if begin pretrain "$OUT/pretrain"; then
    $PY launchers/pretrain.py --config configs/debug/tiny_lightning.yaml output_dir="$OUT/pretrain" \
        data.root="$DATA" data.latent_cache="$OUT/cache_pre" vae.latent_stats="$STATS" schedule.epochs="$MAE_EPOCHS"
    finish pretrain; RAN+=(pretrain)
fi

step "4/7 transfer LightningMAE -> LightningDiT-tiny/1 (the same blocks and keys; the 4x4 table unchanged)"
SETTINGS="seed=0
pretrain=$(record pretrain)
code=$COMMIT"
if begin transfer "$OUT/transfer"; then
    $PY launchers/transfer.py --src "$OUT/pretrain/export/model.safetensors" --model LightningDiT-tiny/1 \
        --input-size 4 --in-chans 32 --num-classes 10 --out "$OUT/transfer/dit.safetensors" model.learn_sigma=false
    finish transfer; RAN+=(transfer)
fi

# One LightningDiT run: finetune (from INIT, '' = scratch), sample 80 images, score them. $1 = dit or dit_scratch.
lightning_job() {
    local name=$1 init=$2 samples="$OUT/samples${1#dit}"
    $PY launchers/finetune.py --config configs/debug/tiny_lightningdit.yaml output_dir="$OUT/$name" \
        data.root="$DATA" data.latent_cache="$OUT/cache_dit" vae.latent_stats="$STATS" \
        schedule.max_steps="$DIT_STEPS" checkpoint.init_from="$init"
    $PY launchers/sample.py --model LightningDiT-tiny/1 --ckpt "$OUT/$name/export/ema.safetensors" \
        --vae synthetic-f16 --vae-version f16d32 --latent-stats "$STATS" --image-size 64 model.in_chans=32 \
        model.learn_sigma=false --num-classes 10 --sampler euler --steps 50 --timestep-shift 0.3 --cfg-scale 3.0 \
        --num-samples 80 --batch-size 40 --out-dir "$samples"
    $PY launchers/evaluate.py --samples "$samples" --reference "$DATA/val" --feature-extractor usp-synthetic \
        --metrics fid is kid pr --no-progress
}
DIT_SETTINGS="DIT_STEPS=$DIT_STEPS
recipe=$(sha configs/debug/tiny.yaml configs/debug/tiny_lightning.yaml configs/debug/tiny_lightningdit.yaml)
sampling=80 samples, EMA, Euler 50 steps, timestep shift 0.3, guidance 3, usp-synthetic vs val
caches=$(record caches)
code=$COMMIT"
tiny_dit_pair lightning_job "5/7 the baseline, started in the background: the same LightningDiT from scratch, \
$DIT_STEPS steps, its 80 samples and metrics" "6/7 USP: flow finetuning of the transferred LightningDiT, $DIT_STEPS \
steps (logit-normal t, cosine loss, cached ADM-crop posterior samples, EMA), 80 samples (EMA weights, Euler 50 steps, \
shift 0.3, guidance 3), FID/IS/KID/PR vs the val split"

step "7/7 summary: USP beside its baselines, real images, noise and random latents"
$PY launchers/tiny_report.py --run "$OUT" --data "$DATA" --vae synthetic-f16 --vae-version f16d32 \
    --latent-stats "$STATS" --model-name LightningDiT --commit "$COMMIT" \
    --wall-seconds $(( $(date +%s) - T0 )) --stages-run "${RAN[@]:-}"

step "done in $(( $(date +%s) - T0 )) s"
echo "pretraining:  $OUT/pretrain/{metrics.jsonl,loss_curve.png,export/}"
echo "LightningDiT: $OUT/dit/ (USP), $OUT/dit_scratch/ (scratch): metrics.jsonl, loss_curve.png, export/"
echo "samples:      $OUT/samples/grid.png (USP), $OUT/samples_scratch/grid.png (scratch), metrics.jsonl in each"
echo "summary:      $OUT/summary.json (settings of every stage: $STAGES/)"
