#!/usr/bin/env bash
# GPU acceptance run: CSR sampling and ZeRO-3 DPO steps at LLaVA-1.5-7B geometry (random weights, bf16),
# made to fit in 8 minutes on one H100 (not run yet: no GPU was available when it was written;
# docs/benchmarks.md).
#
#   bash scripts/gpu_check.sh [WHEELS_DIR]        # default wheelhouse: gpu_wheels/
#
# Starting point: a node with a CUDA PyTorch and transformers, and no network. Whatever else it needs
# (DeepSpeed, peft, open_clip, ...) comes from WHEELS_DIR, filled beforehand by scripts/gpu_wheels.sh
# (about 20 MiB, 64 MiB at most), installed into a venv that sees the node's own torch. It prints
# tokens/s, peak GPU memory and PASS/FAIL per stage, then the total time; exit code 0 only if all pass.
# CSR_GPU_CHECK_TINY=1 runs the same code at toy sizes (on the CPU with gloo where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
STARTED=$(date +%s)
WHEELS=${1:-${CSR_WHEELS:-gpu_wheels}}
PY=${PYTHON:-python3}
WORK=${CSR_GPU_CHECK_WORK:-runs/gpu_check}
LIMIT_S=480
TINY=()
[ "${CSR_GPU_CHECK_TINY:-0}" = 1 ] && TINY=(--tiny)
mkdir -p "$WORK"
LOG="$WORK/gpu_check.log"
: >"$LOG"

# 1. the node: a torch that can use its GPUs (the same check as `csr doctor`, which this node may not run)
if [ ${#TINY[@]} = 0 ]; then
  if ! PYTHONPATH=. "$PY" - <<'EOF'
import sys
from csr_plugin.doctor import mismatch, read_nvidia_smi, read_torch
torch_info = read_torch()
if not torch_info.available:
    print("FAIL: " + (mismatch(read_nvidia_smi(), torch_info) or f"torch {torch_info.version} sees no GPU"))
    sys.exit(1)
print(f"torch {torch_info.version} (CUDA {torch_info.cuda}); GPUs: {'; '.join(torch_info.devices)}")
EOF
  then exit 1; fi
fi

# 2. what the node lacks, from the wheelhouse, offline, into a venv that keeps the node's torch
MISSING=()
for pair in deepspeed:deepspeed peft:peft open_clip:open_clip_torch timm:timm PIL:pillow torchvision:torchvision \
            pydantic:pydantic einops:einops setuptools:setuptools; do   # setuptools: to build DeepSpeed
  "$PY" -c "import ${pair%%:*}" >/dev/null 2>&1 || MISSING+=("${pair##*:}")
done
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "installing from $WHEELS: ${MISSING[*]}"
  [ -d "$WHEELS" ] || { echo "FAIL: no wheelhouse at $WHEELS (fill it with scripts/gpu_wheels.sh)"; exit 1; }
  if "$PY" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)"; then
    # the node's torch lives in a venv, which another venv cannot be layered over: install into it
    echo "into the node's own venv: $("$PY" -c 'import sys; print(sys.prefix)')"
  else
    [ -x "$WORK/venv/bin/python" ] || "$PY" -m venv --system-site-packages "$WORK/venv"
    PY="$WORK/venv/bin/python"
  fi
  # DeepSpeed arrives as source: built against the node's torch (no build isolation), no ops compiled
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation \
    "${MISSING[@]}" >>"$LOG" 2>&1 || { echo "FAIL: offline install (see $LOG)"; exit 1; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
GPUS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
[ ${#TINY[@]} = 1 ] && GPUS=2   # two gloo ranks: the partitioned path, not a world of one

# 3. sampling (one GPU), 4. DPO steps (every GPU of the node, NCCL)
run_stage() {
  local name=$1; shift
  local started=$(date +%s)
  if "$@" >>"$LOG" 2>&1; then status=0; else status=$?; fi
  local line
  line=$(grep "^GPU_CHECK " "$LOG" | grep "\"stage\": \"$name\"" | tail -1 | cut -d' ' -f2- || true)
  if [ -z "$line" ]; then
    echo "$name: FAIL (exit $status, no result; see $LOG)"
    return 1
  fi
  "$PY" - "$line" "$(( $(date +%s) - started ))" <<'EOF'
import json, sys
r, wall = json.loads(sys.argv[1]), sys.argv[2]
extra = f", losses {r['losses']}, world {r['world_size']} ({r['backend']}), LoRA rank {r['lora_rank']}" if r["stage"] == "dpo" else \
    f", {r['trees']}/{r['prompts']} trees"
print(f"{r['stage']}: {'PASS' if r['pass'] else 'FAIL'}: {r['tokens_per_s']} tokens/s, peak GPU memory "
      f"{r['peak_gpu_gib']} GiB, attention {r['attention']}{extra}; {r['seconds']} s timed, {wall} s with start-up")
sys.exit(0 if r["pass"] else 1)
EOF
}
FAILED=0
run_stage sample "$PY" scripts/gpu_check.py sample --work "$WORK" "${TINY[@]}" || FAILED=1
run_stage dpo "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" scripts/gpu_check.py dpo \
  --work "$WORK" "${TINY[@]}" || FAILED=1
ELAPSED=$(( $(date +%s) - STARTED ))
if [ "$ELAPSED" -gt "$LIMIT_S" ] && [ ${#TINY[@]} = 0 ]; then
  echo "total: ${ELAPSED} s, over the ${LIMIT_S} s budget"
  FAILED=1
fi
echo "total: ${ELAPSED} s; log: $LOG"
if [ "$FAILED" = 0 ]; then echo "GPU check: PASS"; else echo "GPU check: FAIL"; fi
exit "$FAILED"
