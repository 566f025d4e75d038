#!/usr/bin/env bash
# Everything a short GPU lease should check and time, in order of value, each part under its own time
# limit so that one slow part cannot eat the others. Logs and CSV/JSON rows go to OUT; copy them into
# benchmarks/reports/ with the card's name afterwards.
#
#   bash benchmarks/gpu_session.sh OUT                      # kernels train micro profile (~12 min on an H200)
#   bash benchmarks/gpu_session.sh OUT kernels train        # chosen parts
#   bash benchmarks/gpu_session.sh OUT sample               # the sampling benchmark (~3 min), not in the default
# Through the device tool, whose $OUT returns at most 8 files: write elsewhere and return one archive.
# A lease has 15 minutes and one call at most 10, so plan two calls on the warm machine:
#   call 1 (~9 min):  bash benchmarks/gpu_session.sh /tmp/s kernels train; tar czf $OUT/s1.tgz -C /tmp s
#   call 2 (~4 min):  bash benchmarks/gpu_session.sh /tmp/s micro profile; tar czf $OUT/s2.tgz -C /tmp s
#
# Parts:
#   kernels  Triton kernels and attention dispatch vs their torch references on the GPU (correctness)
#   train    one training step, MAE-XL at batch 256 and DiT-XL/2 at batch 128 (the batch sizes of the official
#            H200 anchors), bf16: torch reference, kernels=auto (eager; compiled it is the torch path) and
#            all-Triton, eager and compiled (issue 4 goal: >= official compiled, 2,176 / 577 img/s on an
#            H200); ~6-7 min, most of it compiling
#   sample   DiT-XL/2 sampling throughput at batch 256 and the projected FID-50K GPU-hours
#   eval     the ADM evaluation of FID-50K: Inception forward img/s (fp32, TF32 off), Fréchet distances, fp16
#            precision/recall of 50,000 x 10,000 (~1-2 min; cost_report.py --eval-json reads eval.json)
#   micro    kernel micro-benchmarks (forward / backward / both vs eager and compiled torch)
#   fp8      the compiled step with engine.fp8=tensorwise, MAE-XL@256 and DiT-XL/2@128 (~3 min; needs torchao,
#            which the device image lacks: carry the wheel, `pip download --no-deps torchao==0.18.0 -d .whl`,
#            and install it first as the device tool's README says); compare with the train part's rows
#   profile  device time of one eager step by kernel category (matmul, attention, ours, norm, ...), MAE-XL and
#            DiT-XL/2, torch vs auto (~1 min); PROFILE_COMPILE=both adds the compiled step (+3 min)
#   data     online pretraining inputs (benchmarks/data/bench_online.py, ~6 min): the SD-VAE encoder alone at 224^2
#            batch 128 (official eager fp16 autocast, the compiled diffusers bf16 channels_last baseline, ours per
#            vae.compile_mode; goal >= 1.3x the baseline), and end-to-end images/s of online MAE-XL pretraining
#            (nvJPEG decode + the PIL crops on the GPU, the encoder overlapped on a side stream; PIL workers) next
#            to the cached step. Needs diffusers on the device (pure Python: carry its wheel, `pip download
#            --no-deps diffusers -d .whl`, and install it first); not in the default parts.
# bench_loader.py (DALI decode) also needs the DALI wheel, which is too large for the device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_session.sh OUT [parts...]}
shift
PARTS=${*:-kernels train micro profile}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p "$OUT"
$PY -c "import usp_scale.kernels" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . \
    > "$OUT/pip.log" 2>&1 || { echo "cannot install usp_scale (see $OUT/pip.log)"; exit 1; }
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_session.sh needs a CUDA GPU')" || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
    | tee "$OUT/machine.txt"

run() {  # run NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? $(grep -vE '^W[0-9]{4}' "$OUT/$name.log" | tail -3 | tr '\n' ' ')"
}

for part in $PARTS; do
  case $part in
    kernels) run kernels 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_*.py tests/test_attention.py ;;
    train)   run train 420 $PY benchmarks/train/bench_step.py --models MAE-XL@256,DiT-XL/2@128 --compile both \
               --kernels torch,auto,triton --steps 15 --warmup 3 --csv "$OUT/train_step.csv" ;;
    sample)  run sample 180 $PY benchmarks/sample/bench_sampling.py --modes eager,compile --iters 10 --loop-steps 5 \
               --out "$OUT/sampling.json" ;;
    eval)    run eval 180 $PY benchmarks/eval/bench_eval.py --out "$OUT/eval.json" ;;
    micro)   run micro 120 $PY benchmarks/kernels/run_all.py --quick --dtype bf16 --csv "$OUT/kernels.csv" ;;
    profile) run profile 240 $PY benchmarks/train/profile_step.py --models MAE-XL@256,DiT-XL/2@128 --kernels torch,auto \
               --compile "${PROFILE_COMPILE:-eager}" --out "$OUT/profile" ;;
    data)    run data 420 $PY benchmarks/data/bench_online.py --out "$OUT/data" ;;
    fp8)     run fp8 300 $PY benchmarks/train/bench_step.py --models MAE-XL@256,DiT-XL/2@128 --compile compiled \
               --kernels torch --fp8 tensorwise --steps 20 --warmup 5 --csv "$OUT/train_step_fp8.csv" ;;
    *) echo "unknown part $part (kernels, train, sample, micro, profile, fp8, data)"; exit 2 ;;
  esac
done
if [[ -f "$OUT/train_step.csv" ]]; then   # GPU-days of the USP pipeline at the measured rates (host only)
  $PY benchmarks/cost_report.py --train-csv "$OUT/train_step.csv" \
      $([[ -f "$OUT/sampling.json" ]] && echo --sampling-json "$OUT/sampling.json") --out "$OUT/cost.md" \
      > "$OUT/cost.log" 2>&1 && echo "=== cost: $(grep -m1 'USP pipeline' "$OUT/cost.md")"
fi
