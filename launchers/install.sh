#!/usr/bin/env bash
# Installs what the README's two commands need: the pinned CPU-capable stack that CI uses (torch 2.14.1,
# torchvision 0.29.1; keep these pins equal to setup.py's docstring and .ci/run) and this checkout, editable, with
# its extras. pip skips what is already installed at these versions, so a second run takes seconds.
#
#   bash launchers/install.sh            # extras "all" (everything but flash-attn and the TensorFlow test tier)
#   EXTRAS=all,tf bash launchers/install.sh
#   PYTHON=python3.11 bash launchers/install.sh
#
# Called by `bash launchers/run_tiny.sh --install` and `bash tests/run.sh --install` (the README's commands).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-all}
# DeepSpeed compiles no CUDA ops at install time (they are built on first use on a GPU machine)
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q -e ".[$EXTRAS]"
