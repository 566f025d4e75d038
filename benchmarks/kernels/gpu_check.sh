#!/usr/bin/env bash
# One GPU call: compile check, the kernel and attention tests on the GPU (interpreter off), then every
# micro-benchmark. Usage: bash benchmarks/kernels/gpu_check.sh [--quick] [--dtype bf16]
set -euo pipefail
cd "$(dirname "$0")/../.."
export TRITON_INTERPRET=0
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU found')"
python -m usp_scale.kernels.compile_check --arch "$(python -c 'import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)')"
python -m pytest -q -p no:cacheprovider tests/test_kernels_*.py tests/test_attention.py
python benchmarks/kernels/run_all.py "$@"
