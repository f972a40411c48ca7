#!/usr/bin/env bash
# Every GPU check in one run, at most 8 minutes on one H100 / H200:
#   1. the `-m gpu` kernel tests (tests/test_kernels_gpu.py);
#   2. benchmarks/kernels.py at Mistral-7B shapes: roofline fractions, speed-ups against materialise + bmm and
#      cuBLAS K-concatenation, and the device's measured DeviceRates (for kernels/dispatch.py's RATES);
#   3. benchmarks/decode.py: `generate` tokens/s of the dynamic model against the dense base at B in {1, 16, 64}
#      on a ~1B random Llama in bf16, eager and on a static cache with the decode step compiled;
#   4. benchmarks/gpu_report.py: one summary page of the three.
# Everything goes to OUT_DIR (default benchmarks/results), named by device and date. Each step has its own time
# limit; a step that fails or runs out is reported and the others still run. Without CUDA it says so and stops.
#
# Usage: benchmarks/gpu.sh [OUT_DIR]
# On a machine whose Python lacks this project's dependencies, put their wheels in .whl/ first (see the device
# notes); they are installed into a temporary directory, never into the system.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moe-merge-wheels .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/moe-merge-wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import moe_merge" 2> /dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --target /tmp/moe-merge-package . || exit 1
  export PYTHONPATH="/tmp/moe-merge-package:${PYTHONPATH:-}"
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA device on this machine: every GPU check is skipped and nothing is written"
  exit 0
fi

mkdir -p "$OUT"
DATE=$(date +%F)
LOG="$OUT/gpu-$DATE.log"
: > "$LOG"
step() {  # step NAME SECONDS COMMAND...: run it under its limit, log it, record its exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
export PYTHONUNBUFFERED=1
step tests 90 "$PY" -m pytest -q -m gpu tests/test_kernels_gpu.py -p no:cacheprovider
step kernels 240 "$PY" benchmarks/kernels.py --out "$OUT"
step generate 210 "$PY" benchmarks/decode.py --device cuda --dtype bfloat16 --shapes llama-1b \
  --only "base,wemoe dense,lora low-rank,twin svd,base static+compile,lora low-rank static+compile" --out "$OUT"
"$PY" benchmarks/gpu_report.py "$OUT" --log "$LOG"
