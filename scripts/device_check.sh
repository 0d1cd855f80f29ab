#!/usr/bin/env bash
# One device call = one whole GPU pass: environment, GPU tests, the linear benchmark.
#
#   (on the device tool, from the repo root, carrying .whl with torchao + expecttest wheels)
#   bash scripts/device_check.sh [bench_linear args...]
#
# Logs go to $OUT (the device tool's return folder, at most 8 files come back) or ./runs/device:
# env.txt, gpu_tests.log, bench_linear.{md,json}, profile_linear.txt,
# stderr.log.
set -uo pipefail
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
source scripts/device_env.sh  # PYTHONPATH, carried wheels

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import torchao; print('torchao', torchao.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== GPU tests"
python3 -m pytest tests -m gpu -q -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== bench_linear"
python3 scripts/bench_linear.py --out "$OUT" "$@" 2>>"$OUT/stderr.log"
bench_rc=$?

echo "== profile_linear (kernel tables)"
python3 scripts/profile_linear.py > "$OUT/profile_linear.txt" 2>>"$OUT/stderr.log" || echo "profile failed"

echo "gpu tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
