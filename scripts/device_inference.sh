#!/usr/bin/env bash
# One device call = the inference pass (issue 9) plus the scaling-mode GPU tests (issue 5):
#
#   run(command="bash scripts/device_inference.sh", carry=[".whl"], timeout_s=600)
#
# 1. pytest -m gpu on tests/test_inference.py and tests/test_scaling_modes.py  -> gpu_tests.log
# 2. the weight-only kernel's tile sweep at M = 16 (per weight shape)           -> sweep/
# 3. decode 16 x 1 (compile modes default and reduce-overhead), using the tiles
#    the sweep found fastest per shape                                          -> decode/
# 4. prefill 4 x 2048                                                           -> prefill/
# 5. decode "default" again for ours with inductor's static launcher for
#    user-defined Triton kernels (the launch-overhead question)                 -> decode_static/
# Each step is capped (timeout) so the call always returns its logs in $OUT.
set -uo pipefail
OUT=${OUT:-runs/device_inference}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, torchao; print('torch', torch.__version__, 'triton', triton.__version__, 'torchao', torchao.__version__)"
} 2>&1 | tee "$OUT/env.txt"

step() {  # step SECONDS NAME COMMAND...: run capped, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "== $name ($(date -u +%T), cap ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name exit $?"
}
BENCH="python3 scripts/bench_inference.py"
step ${TESTS_S:-170} gpu_tests python3 -m pytest tests/test_inference.py tests/test_scaling_modes.py \
  -m gpu -q -p no:cacheprovider --durations=10
step ${SWEEP_S:-120} sweep $BENCH --sweep tiles --warmup 2 --iters 10 --repeats 3 --out "$OUT/sweep"
TUNING=()
[ -s "$OUT/sweep/bench_inference_sweep.json" ] && TUNING=(--weight-only-tuning "$OUT/sweep/bench_inference_sweep.json")
step ${DECODE_S:-150} decode $BENCH --cases decode --variants bf16,ours-tensorwise,ours-rowwise,torchao-tensorwise \
  "${TUNING[@]}" --out "$OUT/decode"
step ${PREFILL_S:-90} prefill $BENCH --cases prefill --variants bf16,ours-tensorwise,ours-rowwise,torchao-tensorwise \
  --out "$OUT/prefill"
TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1 \
  step ${STATIC_S:-45} decode_static $BENCH --cases decode --modes default --variants ours-tensorwise \
  "${TUNING[@]}" --out "$OUT/decode_static"
date -u
