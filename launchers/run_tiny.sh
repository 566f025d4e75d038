#!/usr/bin/env bash
# The whole USP pipeline in miniature, on a CPU, in a few minutes, with its baselines beside every number:
#   synthetic JPEG dataset -> latent caches (the shipped small VAE synthetic-f8, trained on this dataset)
#   -> MAE pretraining on the cache -> transfer into DiT-tiny/2-VAE-simple -> DDPM finetuning -> sampling
#   (PNGs, .npz, grid) -> FID/IS/KID/precision-recall against the val split with the shipped extractor
#   usp-synthetic -> a linear probe of the pretrained encoder.
#   Baselines, trained and measured the same way: the same DiT from scratch (no MAE weights) for the same steps
#   (run beside the USP one, one thread each), and the linear probe of the same encoder randomly initialised; plus
#   the reference values of real images, the VAE decoding random latents and uniform noise. Ends with a summary
#   table (OUT/summary.json) and fails if the samples do not beat the noise baselines. The metrics hold for this
#   synthetic dataset only. Whether USP wins here is printed, not assumed: see docs/tiny.md and the effect
#   benchmark (benchmarks/effect/) for where it does.
#
#   bash launchers/run_tiny.sh --install       # first installs the pinned stack (launchers/install.sh): the README's
#                                              # command for a fresh machine
#   bash launchers/run_tiny.sh                 # outputs in runs/tiny
#   OUT=/tmp/x PYTHON=python3.11 bash launchers/run_tiny.sh
#   DIT_STEPS=500 bash launchers/run_tiny.sh   # shorter DiT finetuning (both DiTs; worse samples)
#   MAE_EPOCHS=4 bash launchers/run_tiny.sh    # shorter MAE pretraining
#
# Reruns into the same OUT: every stage records the settings it ran with (OUT/stages/<stage>.done: its knobs, the
# sha256 of its recipe files, the code's commit, and the records of the stages it reads). A stage whose settings are
# unchanged is reused; one whose settings differ is started fresh, and says which setting changed. After a
# default run, `DIT_STEPS=500 bash launchers/run_tiny.sh` redoes both DiTs, their samples and the summary ("DIT_STEPS:
# 2000 -> 500") and reuses the dataset, caches, MAE and probes. A stage that was interrupted resumes when its
# settings are unchanged. A DATA folder outside OUT is never deleted: if it was made with other settings the job
# stops and names them. OUT/summary.json records every stage's settings, the commit and the wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--install" ]; then
    shift
    bash launchers/install.sh
fi
if [ $# -gt 0 ]; then
    echo "run_tiny.sh: unknown argument(s) '$*' (the one flag is --install; settings are environment variables: OUT, DATA, PYTHON, DIT_STEPS, MAE_EPOCHS)" >&2
    exit 2
fi
OUT=${OUT:-runs/tiny}
DATA=${DATA:-$OUT/data}
PY=${PYTHON:-python3}
DIT_STEPS=${DIT_STEPS:-2000}
MAE_EPOCHS=${MAE_EPOCHS:-8}
# the shared stage bookkeeping, dataset and caches (launchers/tiny_common.sh)
. launchers/tiny_common.sh

tiny_data "1/9"
tiny_caches "2/9" synthetic-f8

step "3/9 MAE pretraining on the cached latents (vit_tiny_patch_vae, $MAE_EPOCHS epochs)"
SETTINGS="MAE_EPOCHS=$MAE_EPOCHS
recipe=$(sha configs/debug/tiny.yaml)
caches=$(record caches)
code=$COMMIT"
if begin pretrain "$OUT/pretrain"; then
    $PY launchers/pretrain.py --config configs/debug/tiny.yaml output_dir="$OUT/pretrain" data.root="$DATA" \
        data.format=latents data.latent_cache="$OUT/cache_pre" schedule.epochs="$MAE_EPOCHS"
    finish pretrain; RAN+=(pretrain)
fi

step "4/9 transfer MAE -> DiT-tiny/2-VAE-simple (14x14 -> 4x4 table, adaLN-Zero)"
SETTINGS="seed=0
pretrain=$(record pretrain)
code=$COMMIT"
if begin transfer "$OUT/transfer"; then
    $PY launchers/transfer.py --src "$OUT/pretrain/export/model.safetensors" --model DiT-tiny/2-VAE-simple \
        --input-size 8 --num-classes 10 --out "$OUT/transfer/dit.safetensors"
    finish transfer; RAN+=(transfer)
fi

# One DiT run: finetune (from INIT, '' = scratch), sample 80 images, score them. $1 = name (dit or dit_scratch).
dit_job() {
    local name=$1 init=$2 samples="$OUT/samples${1#dit}"
    $PY launchers/finetune.py --config configs/debug/tiny_dit.yaml output_dir="$OUT/$name" data.root="$DATA" \
        data.format=latents data.latent_cache="$OUT/cache_dit" schedule.max_steps="$DIT_STEPS" \
        checkpoint.init_from="$init"
    $PY launchers/sample.py --model DiT-tiny/2-VAE-simple --ckpt "$OUT/$name/export/ema.safetensors" \
        --model-kwargs '{"input_size": 8}' --vae synthetic-f8 --image-size 64 --num-classes 10 \
        --num-samples 80 --batch-size 40 --steps 50 --cfg-scale 3.0 --out-dir "$samples"
    $PY launchers/evaluate.py --samples "$samples" --reference "$DATA/val" --feature-extractor usp-synthetic \
        --metrics fid is kid pr --no-progress
}
DIT_SETTINGS="DIT_STEPS=$DIT_STEPS
recipe=$(sha configs/debug/tiny.yaml configs/debug/tiny_dit.yaml)
sampling=80 samples, EMA, DDPM 50 steps, guidance 3, usp-synthetic vs val
caches=$(record caches)
code=$COMMIT"

tiny_dit_pair dit_job "5/9 the baseline, started in the background: the same DiT from scratch, $DIT_STEPS steps, \
its 80 samples and metrics" "6/9 USP: DDPM finetuning of the transferred DiT, $DIT_STEPS steps (cached ADM-crop \
latents, posterior samples, EMA), 80 samples (EMA weights, DDPM 50 steps, guidance 3), FID/IS/KID/PR vs the val split"

step "7/9 linear probe of the pretrained encoder (top-1 on val; chance 10 %)"
SETTINGS="recipe=$(sha configs/debug/tiny.yaml configs/debug/tiny_linprobe.yaml)
pretrain=$(record pretrain)
code=$COMMIT"
if begin linprobe "$OUT/linprobe"; then
    $PY launchers/finetune.py --config configs/debug/tiny_linprobe.yaml output_dir="$OUT/linprobe" \
        data.root="$DATA" checkpoint.init_from="$OUT/pretrain/export/model.safetensors"
    finish linprobe; RAN+=(linprobe)
fi

step "8/9 the baseline: the same linear probe on the same encoder, randomly initialised (seed 0)"
SETTINGS="recipe=$(sha configs/debug/tiny.yaml configs/debug/tiny_linprobe.yaml)
data=$(record data)
code=$COMMIT"
if begin linprobe_random "$OUT/linprobe_random"; then
    $PY launchers/finetune.py --config configs/debug/tiny_linprobe.yaml output_dir="$OUT/linprobe_random" \
        data.root="$DATA" checkpoint.init_from=''
    finish linprobe_random; RAN+=(linprobe_random)
fi

step "9/9 summary: USP beside its baselines, real images, noise and random latents"
$PY launchers/tiny_report.py --run "$OUT" --data "$DATA" --commit "$COMMIT" --wall-seconds $(( $(date +%s) - T0 )) \
    --stages-run "${RAN[@]:-}"

step "done in $(( $(date +%s) - T0 )) s"
echo "pretraining:  $OUT/pretrain/{metrics.jsonl,loss_curve.png,export/}"
echo "DiT:          $OUT/dit/ (USP), $OUT/dit_scratch/ (scratch): metrics.jsonl, loss_curve.png, export/"
echo "samples:      $OUT/samples/grid.png (USP), $OUT/samples_scratch/grid.png (scratch), metrics.jsonl in each"
echo "linear probe: $OUT/linprobe/metrics.jsonl (USP), $OUT/linprobe_random/metrics.jsonl (random init)"
echo "summary:      $OUT/summary.json (settings of every stage: $STAGES/)"
