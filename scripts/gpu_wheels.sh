#!/usr/bin/env bash
# Fills the wheelhouse scripts/gpu_check.sh installs from on a node without network: everything the GPU
# acceptance run needs beyond a CUDA torch and transformers, at the versions the project pins or was
# tested with, and checks that it stays within 64 MiB. Run it on a machine with network and the same
# Python version as the GPU node:   bash scripts/gpu_wheels.sh [OUT_DIR]   (default: gpu_wheels)
# CSR_TORCHVISION_VERSION=0.28.0 (the pair of torch 2.13.0) adds torchvision, for a node without it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_wheels}
PY=${PYTHON:-python3}
LIMIT_MIB=64
mkdir -p "$OUT"
PACKAGES=(
  "deepspeed==0.19.6" einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 "typing_extensions>=4.16"
  open_clip_torch==3.3.0 timm==1.0.31 ftfy==6.3.1 wcwidth==0.9.5
  peft==0.21.2 accelerate==1.16.0
  pillow setuptools wheel
)
[ -n "${CSR_TORCHVISION_VERSION:-}" ] && PACKAGES+=("torchvision==$CSR_TORCHVISION_VERSION")
# --no-deps: torch, transformers and their own dependencies are the node's; deepspeed comes as its
# source package (DeepSpeed publishes no wheel), built there with DS_BUILD_OPS=0 (no compiler needed).
"$PY" -m pip download -q --no-deps -d "$OUT" "${PACKAGES[@]}"
SIZE=$(du -sm "$OUT" | cut -f1)
ls -1 "$OUT"
echo "wheelhouse $OUT: ${SIZE} MiB (limit ${LIMIT_MIB} MiB)"
[ "$SIZE" -le "$LIMIT_MIB" ] || { echo "over ${LIMIT_MIB} MiB" >&2; exit 1; }
