#!/usr/bin/env bash
# GPU check in one short script (at most ~8 minutes): installs the package if needed, then extraction and
# clustering on a few hundred generated images; prints images/s, GPU memory and the speed-up over CPU.
# On a machine without a GPU it runs the CPU fallback and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
$PY -c "import mlcseg_ray" 2>/dev/null || $PY -m pip install -q -e .
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1
timeout 480 $PY bench/gpu_check.py --n "${N:-300}" "$@"
