#!/usr/bin/env bash
# A short accelerator check (< 8 minutes) for a GPU machine that has PyTorch but maybe no vLLM, no DeepSpeed and no
# network: the NCCL weight stream of cluster/collective.py between two processes, one learner update on CUDA against
# the same update on CPU (stated tolerances), and --dry-run of every cuda/npu config. Optional packages that are
# missing are skipped and named in the report; without CUDA it still runs (the CPU halves, gloo instead of NCCL)
# and says that CUDA was absent. Report: $OUT/device_check.{json,txt} when OUT is set, else ./device_check_out/.
# Exit status: 0 when nothing failed (skips included), 1 when a check failed.
# Usage: bash scripts/device_check.sh [--stream-mb 256] [--timeout 120]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python)"; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
echo "[device_check] python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
exec timeout --kill-after=10 480 "$PY" scripts/device_check.py "$@"
