#!/usr/bin/env bash
# Installs everything (./.venv) and runs the test suite: unit tests, property tests and the real-component
# tests (local Ray cluster, vLLM CPU engine, DeepSpeed ZeRO over gloo, verifier pool), plus one end-to-end run.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh --runslow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
