# Shared by the CPU miniatures (launchers/run_tiny.sh: SD-VAE-style f8 latents, DiT; launchers/run_tiny_lightning.sh:
# VA-VAE-style f16d32 latents, LightningDiT): sourced, never run. Needs OUT, DATA and PY set; defines the stage
# bookkeeping (begin/finish/record: a stage reruns exactly when its settings changed; see run_tiny.sh's header),
# the code's commit, and the two stages both jobs share: the synthetic dataset and the two latent caches.
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


# tiny_data LABEL: the synthetic set (10 classes x 100 train, 8 val per class, 64 px, seed 0) into $DATA
tiny_data() {
    step "$1 synthetic dataset -> $DATA (10 classes: shape, colour, texture)"
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
}

# tiny_caches LABEL VAE [cache_latents.py flags...]: two latent caches of $DATA with the shipped VAE: 2
# RandomResizedCrop views (+ flips) for pretraining ($OUT/cache_pre), the ADM crop (+ flip) for the diffusion model
# ($OUT/cache_dit)
tiny_caches() {
    local label=$1 vae=$2; shift 2
    step "$label latent caches with the shipped VAE $vae: 2 RandomResizedCrop views (pretraining), ADM crop (DiT)"
    SETTINGS="vae=$vae${*:+ $*}
pre=pretrain,2 views
dit=adm,1 view
data=$(record data)
code=$COMMIT"
    if begin caches "$OUT/cache_pre" "$OUT/cache_dit"; then
        local name aug views
        for spec in "pre pretrain 2" "dit adm 1"; do
            read -r name aug views <<< "$spec"
            $PY launchers/cache_latents.py --data-root "$DATA" --out "$OUT/cache_$name" --augment "$aug" \
                --views "$views" --image-size 64 --vae-path "$vae" "$@" --shard-size 500 --batch-size 100 \
                --num-workers 0 --no-progress
        done
        finish caches; RAN+=(caches)
    fi
}

# tiny_dit_pair JOB LABEL_SCRATCH LABEL_USP: the diffusion model from scratch (the baseline, in the background, one
# thread: JOB dit_scratch '' > OUT/dit_scratch.log) beside the same model from the transferred MAE (JOB dit
# OUT/transfer/dit.safetensors), each a stage with the settings $DIT_SETTINGS (+ the transfer's record for USP).
# JOB NAME INIT finetunes into OUT/NAME, samples into OUT/samples${NAME#dit} and scores them.
tiny_dit_pair() {
    local job=$1
    step "$2 (log: $OUT/dit_scratch.log)"
    SETTINGS="$DIT_SETTINGS"
    local pid=""
    if begin dit_scratch "$OUT/dit_scratch" "$OUT/samples_scratch" "$OUT/dit_scratch.log"; then
        "$job" dit_scratch "" > "$OUT/dit_scratch.log" 2>&1 &
        pid=$!
    fi
    step "$3"
    SETTINGS="$DIT_SETTINGS
transfer=$(record transfer)"
    if begin dit "$OUT/dit" "$OUT/samples"; then
        "$job" dit "$OUT/transfer/dit.safetensors"
        finish dit; RAN+=(dit)
    fi
    if [ -n "$pid" ]; then
        echo "    waiting for the from-scratch run (pid $pid)"
        if ! wait "$pid"; then
            echo "the from-scratch run failed; the end of its log ($OUT/dit_scratch.log):" >&2
            tail -n 40 "$OUT/dit_scratch.log" >&2
            exit 1
        fi
        echo "    the from-scratch run finished (log $OUT/dit_scratch.log, metrics $OUT/samples_scratch/metrics.jsonl)"
        SETTINGS="$DIT_SETTINGS"; finish dit_scratch; RAN+=(dit_scratch)
    fi
}
