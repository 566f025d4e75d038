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
export HF_HUB_OFFLINE=1
# The models are tiny: one thread each wastes little on a quiet machine and keeps the job from stalling on a
# loaded one (threads spinning against other processes). Set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
T0=$(date +%s)
STAGES="$OUT/stages"
mkdir -p "$STAGES"
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }
if COMMIT=$(git rev-parse HEAD 2>/dev/null); then
    # uncommitted changes count as code too: their hash joins the commit
    if ! git diff --quiet HEAD 2>/dev/null; then COMMIT="$COMMIT+dirty:$(git diff HEAD | sha256sum | cut -c1-12)"; fi
else
    COMMIT=unknown
fi
sha() { sha256sum "$@" | cut -c1-16 | paste -sd' ' -; }
record() { [ -f "$STAGES/$1.done" ] && sha256sum "$STAGES/$1.done" | cut -c1-16 || echo none; }

# changed OLD: "key: old -> new" for every setting that differs between the file OLD and $SETTINGS
changed() {
    printf '%s\n' "$SETTINGS" | awk -F= 'NR == FNR { o[$1] = substr($0, length($1) + 2); next }
        { n = substr($0, length($1) + 2)
          if (!($1 in o)) print "      " $1 ": (not set) -> " n
          else if (o[$1] != n) print "      " $1 ": " o[$1] " -> " n
          delete o[$1] }
        END { for (k in o) print "      " k ": " o[k] " -> (not set)" }' "$1" -
}
# begin NAME OUTPUT...: whether stage NAME must run with $SETTINGS (lines key=value). 1 = reuse its outputs (same
# settings, finished); 0 = run it: fresh (its OUTPUTs removed) when its last run had other settings, resumed when an
# interrupted run had the same ones.
begin() {
    local name=$1; shift
    local f="$STAGES/$name" prev=""
    if [ -f "$f.done" ]; then
        if [ "$(cat "$f.done")" = "$SETTINGS" ]; then
            echo "    reusing the finished stage (settings unchanged): $*"
            return 1
        fi
        prev="$f.done"
    elif [ -f "$f.started" ]; then
        prev="$f.started"
    fi
    if [ -n "$prev" ] && [ "$(cat "$prev")" != "$SETTINGS" ]; then
        echo "    settings changed since the last run into $OUT; starting this stage fresh (removing $*):"
        changed "$prev"
        rm -rf "$@"
    elif [ -n "$prev" ]; then
        echo "    resuming an interrupted run of this stage (settings unchanged)"
    fi
    rm -f "$f.done"
    printf '%s\n' "$SETTINGS" > "$f.started"
    return 0
}
finish() { mv "$STAGES/$1.started" "$STAGES/$1.done"; }
RAN=()

step "1/9 synthetic dataset -> $DATA (10 classes: shape, colour, texture)"
SETTINGS="classes=10
per_class=100
val_per_class=8
size=64
seed=0
generator=$(sha usp_scale/data/synthetic.py)
code=$COMMIT"
if [ "$DATA" != "$OUT/data" ] && [ -f "$DATA/synthetic.json" ]; then
    # a dataset the user keeps elsewhere: used if it is the one this job makes, never deleted
    $PY - "$DATA/synthetic.json" <<'EOF'
import json, sys
want = {"classes": 10, "per_class": 100, "val_per_class": 8, "size": 64, "seed": 0}
got = json.load(open(sys.argv[1]))
bad = [f"{k}={got.get(k)} (this job makes {k}={v})" for k, v in want.items() if got.get(k) != v]
if bad:
    sys.exit(f"DATA={sys.argv[1].rsplit('/', 1)[0]} was made with other settings: {', '.join(bad)}; point DATA at "
             "another folder or remove it")
EOF
    echo "    using the existing dataset $DATA"
    printf '%s\n' "$SETTINGS" > "$STAGES/data.done"
elif begin data "$DATA"; then
    $PY launchers/make_synthetic.py --out "$DATA" --classes 10 --per-class 100 --val-per-class 8 --size 64
    finish data; RAN+=(data)
fi

step "2/9 latent caches with the shipped VAE synthetic-f8: 2 RandomResizedCrop views (pretraining), ADM crop (DiT)"
SETTINGS="vae=synthetic-f8
pre=pretrain,2 views
dit=adm,1 view
data=$(record data)
code=$COMMIT"
if begin caches "$OUT/cache_pre" "$OUT/cache_dit"; then
    for spec in "pre pretrain 2" "dit adm 1"; do
        set -- $spec
        $PY launchers/cache_latents.py --data-root "$DATA" --out "$OUT/cache_$1" --augment "$2" --views "$3" \
            --image-size 64 --vae-path synthetic-f8 --shard-size 500 --batch-size 100 --num-workers 0 --no-progress
    done
    finish caches; RAN+=(caches)
fi

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

step "5/9 the baseline, started in the background: the same DiT from scratch, $DIT_STEPS steps, its 80 samples and \
metrics (log: $OUT/dit_scratch.log)"
SETTINGS="$DIT_SETTINGS"
SCRATCH_PID=""
if begin dit_scratch "$OUT/dit_scratch" "$OUT/samples_scratch" "$OUT/dit_scratch.log"; then
    dit_job dit_scratch "" > "$OUT/dit_scratch.log" 2>&1 &
    SCRATCH_PID=$!
fi

step "6/9 USP: DDPM finetuning of the transferred DiT, $DIT_STEPS steps (cached ADM-crop latents, posterior samples, \
EMA), 80 samples (EMA weights, DDPM 50 steps, guidance 3), FID/IS/KID/PR vs the val split"
SETTINGS="$DIT_SETTINGS
transfer=$(record transfer)"
if begin dit "$OUT/dit" "$OUT/samples"; then
    dit_job dit "$OUT/transfer/dit.safetensors"
    finish dit; RAN+=(dit)
fi
if [ -n "$SCRATCH_PID" ]; then
    echo "    waiting for the from-scratch DiT (pid $SCRATCH_PID)"
    if ! wait "$SCRATCH_PID"; then
        echo "the from-scratch DiT failed; the end of its log ($OUT/dit_scratch.log):" >&2
        tail -n 40 "$OUT/dit_scratch.log" >&2
        exit 1
    fi
    echo "    the from-scratch DiT finished (log $OUT/dit_scratch.log, metrics $OUT/samples_scratch/metrics.jsonl)"
    SETTINGS="$DIT_SETTINGS"; finish dit_scratch; RAN+=(dit_scratch)
fi

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
