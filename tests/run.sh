#!/usr/bin/env bash
# The README's test command: `bash tests/run.sh --install` installs the pinned stack and this checkout with its
# extras (launchers/install.sh), then runs the whole suite on 2 processes (CPU; GPU-only tests skip cleanly; the
# cluster tier needs root and Debian's SLURM, see docs/training.md). .ci/run calls exactly this command.
# Without --install it only runs the tests; further arguments go to pytest (e.g. `bash tests/run.sh -x -k config`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--install" ]; then
    shift
    bash launchers/install.sh
fi
exec "$PY" -m pytest -q -n 2 --dist loadgroup tests "$@"
