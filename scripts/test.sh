#!/usr/bin/env bash
# Installs everything (./.venv) and runs the test suite: unit tests, property tests and the real-component
# tests (local Ray cluster, vLLM CPU engine, DeepSpeed ZeRO over gloo, verifier pool), plus one end-to-end run.
# Extra arguments go to pytest. Slow end-to-end tests are skipped by default (pytest.ini: -m "not slow"); run them
# with `bash scripts/test.sh -m slow`, or everything with `bash scripts/test.sh -m ""`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
