#!/usr/bin/env bash
# One device call = the inference pass (issue 9), stage by stage, each capped so the call
# always returns its logs:
#
#   run(command="bash scripts/device_inference.sh", carry=[".whl"], timeout_s=600)
#   bash scripts/device_inference.sh [STAGE...]     # default: tests sweep decode prefill
#
#   tests    pytest -m gpu: tests/test_inference.py and the scaling-mode GPU tests (issue 5; cap
#            $TESTS_S, default 400 s: inference alone took > 220 s on a fresh machine),
#            or the test ids in $TESTS
#   sweep    the small-M kernel's tiles at M = 16, per weight shape of the 956M model, for the
#            x flavours in $SWEEP_FLAVOURS (default hp,fp8)
#   decode   16 x 1 tokens, compile modes $DECODE_MODES (default: reduce-overhead), with the
#            sweep's per-shape winners when the same call ran the sweep; PROFILE=1 adds each
#            variant's CUDA kernels per call (decode_profile.md), HOST_PROFILE=1 with it a cProfile
#            of the CPU side of the calls
#   prefill  4 x 2048 tokens, compile mode default
#
# Variants: $VARIANTS (default bf16,ours-tensorwise,ours-rowwise; add torchao-tensorwise for
# the cross-check). The device tool returns at most 8 files, so $OUT gets one .md table per
# stage, one log per stage and env.txt; the json files stay in /tmp/bench on the device.
set -uo pipefail
OUT=${OUT:-runs/device_inference}
WORK=${WORK:-/tmp/bench}  # per process when two run at once (the decode stage reads the sweep json here)
mkdir -p "$OUT" "$WORK"
source scripts/device_env.sh  # PYTHONPATH, carried wheels
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, torchao; print('torch', torch.__version__, 'triton', triton.__version__, 'torchao', torchao.__version__)"
} 2>&1 | tee "$OUT/env.txt"

VARIANTS=${VARIANTS:-bf16,ours-tensorwise,ours-rowwise}
BENCH="python3 scripts/bench_inference.py"
step() {  # step SECONDS NAME COMMAND...: run capped, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "== $name ($(date -u +%T), cap ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name exit $?"
}
for stage in "${@:-tests sweep decode prefill}"; do
  for s in $stage; do
    case $s in
      tests) step "${TESTS_S:-400}" gpu_tests python3 -m pytest ${TESTS:-tests/test_inference.py \
               tests/test_scaling_modes.py} -m gpu -q -p no:cacheprovider --durations=10 ;;
      sweep) step "${SWEEP_S:-300}" sweep $BENCH --sweep tiles --sweep-flavours "${SWEEP_FLAVOURS:-hp,fp8}" \
               --warmup 2 --iters 10 --repeats 3 --out "$WORK/sweep"
             cp "$WORK/sweep/bench_inference_sweep.md" "$OUT/sweep.md" 2>/dev/null ;;
      decode) TUNING=()  # the sweep's per-shape winners, when this call ran the sweep
              [ -f "$WORK/sweep/bench_inference_sweep.json" ] && TUNING=(--weight-only-tuning "$WORK/sweep/bench_inference_sweep.json")
              step "${DECODE_S:-150}" decode $BENCH --cases decode --modes "${DECODE_MODES:-reduce-overhead}" \
                --variants "$VARIANTS" "${TUNING[@]}" ${PROFILE:+--profile} ${HOST_PROFILE:+--host-profile} --out "$WORK/decode"
              cp "$WORK/decode/bench_inference.md" "$OUT/decode.md" 2>/dev/null
              cp "$WORK/decode/bench_inference_profile.md" "$OUT/decode_profile.md" 2>/dev/null ;;
      prefill) step "${PREFILL_S:-170}" prefill $BENCH --cases prefill --variants "$VARIANTS" --out "$WORK/prefill"
               cp "$WORK/prefill/bench_inference.md" "$OUT/prefill.md" 2>/dev/null ;;
      *) echo "unknown stage $s (tests sweep decode prefill)"; exit 2 ;;
    esac
  done
done
date -u
