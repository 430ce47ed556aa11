#!/usr/bin/env bash
# Creates .venv with everything csr-plugin needs on a CPU machine, idempotently.
# Why the order: flash-attn and deepspeed build against the installed torch
# (--no-build-isolation), and openrlhf pins both; see docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.csr-setup-done"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup_env.sh ]; then
  exit 0
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PIP install -q --upgrade pip setuptools wheel ninja packaging psutil
# torchvision is required by open_clip; the torch/torchvision pair below is the
# one known to import together here (a CPU-only torch file has no matching torchvision).
$PIP install -q "torch==${CSR_TORCH_VERSION:-2.14.1}" "torchvision==${CSR_TORCHVISION_VERSION:-0.29.1}"
# flash-attn: openrlhf imports flash_attn.bert_padding at import time. Without
# CUDA its source package installs as pure Python (DESIGN.md section 4).
if ! $VENV/bin/python -c "import flash_attn" 2>/dev/null; then
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    $PIP install -q --no-build-isolation "flash-attn==2.8.3"
fi
DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed==0.19.6"
$PIP install -q "openrlhf==0.11.2"
$PIP install -q -e ".[dev]"
touch "$STAMP"
echo "csr-plugin environment ready in $VENV"
