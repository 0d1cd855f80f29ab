#!/usr/bin/env bash
# GPU check of compile_fp8 on one CUDA machine: the GPU tests, then the benchmarks.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]          # default RESULTS_DIR: gpu_check_out
#
# Assumes a CUDA GPU with FP8 (sm89+: Ada, Hopper or newer) and a Python environment with torch
# (a CUDA build, which brings triton), torchao and pytest installed, e.g. `pip install -e ".[test]"`
# on top of a CUDA torch. The package is imported from this checkout (PYTHONPATH is set to it).
#
# Stages, in this order. Each runs from the repository root under `timeout` (seconds; exit 124
# or 137 = stopped at its limit), writes its output to RESULTS_DIR/<stage>.log, and a stage that
# fails or times out does not stop the next one. A summary comes last; the exit status is 1 if
# any stage failed. The benchmarks rewrite their tables after every row, so a stage stopped at
# its limit keeps the rows it finished.
#
#   stage       what                                          results              limit (env var, default s)
#   env         versions of torch, triton, torchao; the GPU   env.log              GPU_CHECK_ENV_TIMEOUT (120)
#   tests       python -m pytest -m gpu -q                    tests.log            GPU_CHECK_TESTS_TIMEOUT (1800)
#   linear      scripts/bench_linear.py: one linear's         bench_linear/        GPU_CHECK_LINEAR_TIMEOUT (900)
#               fwd+bwd, bf16 vs ours vs torchao
#   train_step  scripts/bench_train_step.py: the 956M LM's    bench_train_step/    GPU_CHECK_TRAIN_STEP_TIMEOUT (1200)
#               training step, bf16 vs ours vs torchao
#   inference   scripts/bench_inference.py: prefill and       bench_inference/     GPU_CHECK_INFERENCE_TIMEOUT (900)
#               decode forwards, bf16 vs ours vs torchao
#
# Other settings (environment variables):
#   GPU_CHECK_STAGES              the stages to run, e.g. "tests inference" (default: all of them)
#   GPU_CHECK_PYTEST_ARGS         more pytest arguments, e.g. "tests/test_small_m_gemm.py -x"
#   GPU_CHECK_LINEAR_VARIANTS     bench_linear --variants (default: all of its variants)
#   GPU_CHECK_TRAIN_VARIANTS      bench_train_step --variants
#                                 (default: bf16,ours-tensorwise,ours-staticgrads-fastaccum,torchao-tensorwise,
#                                 ours-rowwise,torchao-rowwise)
#   GPU_CHECK_INFERENCE_VARIANTS  bench_inference --variants
#                                 (default: bf16,ours-tensorwise,ours-rowwise,ours-static,torchao-tensorwise)
#   PYTHON                        the interpreter (default: python, else python3)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS_DIR=${1:-gpu_check_out}
mkdir -p "$RESULTS_DIR" || exit 2
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)  # absolute: the stages run from the repository root
cd "$ROOT" || exit 2
PYTHON=${PYTHON:-$(command -v python || echo python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON
STAGES=${GPU_CHECK_STAGES:-env tests linear train_step inference}
TRAIN_VARIANTS=${GPU_CHECK_TRAIN_VARIANTS:-bf16,ours-tensorwise,ours-staticgrads-fastaccum,torchao-tensorwise,ours-rowwise,torchao-rowwise}
INFERENCE_VARIANTS=${GPU_CHECK_INFERENCE_VARIANTS:-bf16,ours-tensorwise,ours-rowwise,ours-static,torchao-tensorwise}
SUMMARY=()
FAILED=0
TESTS_RAN=0

run_stage() {  # run_stage NAME LIMIT_S RESULTS COMMAND...: capped, logged, recorded for the summary
  local name=$1 limit=$2 results=$3 start=$SECONDS rc status
  shift 3
  echo "== $name ($(date -u +%H:%M:%S) UTC, limit ${limit}s, log $RESULTS_DIR/$name.log)"
  timeout -k 30 "$limit" "$@" > "$RESULTS_DIR/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124 | 137) status="timed out (${limit}s)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    tail -n 15 "$RESULTS_DIR/$name.log" | sed 's/^/   | /'
  fi
  echo "   $name: $status"
  SUMMARY+=("$(printf '%-11s %-22s %6ss   %s' "$name" "$status" "$((SECONDS - start))" "$results")")
}

env_report() {  # run by `timeout` in a child bash (exported below)
  date -u
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU visible')" || return 1
  "$PYTHON" -c "import triton; print('triton', triton.__version__)"
  "$PYTHON" -c "import torchao; print('torchao', torchao.__version__)"
  "$PYTHON" -c "import pytest; print('pytest', pytest.__version__)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  fi
}
export -f env_report

for stage in $STAGES; do
  case $stage in
    env)
      run_stage env "${GPU_CHECK_ENV_TIMEOUT:-120}" "env.log" bash -c env_report ;;
    tests)
      TESTS_RAN=1
      # shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS: several words on purpose
      run_stage tests "${GPU_CHECK_TESTS_TIMEOUT:-1800}" "tests.log" \
        "$PYTHON" -m pytest -m gpu -q ${GPU_CHECK_PYTEST_ARGS:-} ;;
    linear)
      run_stage linear "${GPU_CHECK_LINEAR_TIMEOUT:-900}" "bench_linear/bench_linear.md" \
        "$PYTHON" scripts/bench_linear.py ${GPU_CHECK_LINEAR_VARIANTS:+--variants "$GPU_CHECK_LINEAR_VARIANTS"} \
        --out "$RESULTS_DIR/bench_linear" ;;
    train_step)
      run_stage train_step "${GPU_CHECK_TRAIN_STEP_TIMEOUT:-1200}" "bench_train_step/bench_train_step.md" \
        "$PYTHON" scripts/bench_train_step.py --variants "$TRAIN_VARIANTS" --out "$RESULTS_DIR/bench_train_step" ;;
    inference)
      run_stage inference "${GPU_CHECK_INFERENCE_TIMEOUT:-900}" "bench_inference/bench_inference.md" \
        "$PYTHON" scripts/bench_inference.py --variants "$INFERENCE_VARIANTS" --out "$RESULTS_DIR/bench_inference" ;;
    *)
      echo "unknown stage '$stage' (stages: env tests linear train_step inference)" >&2
      exit 2 ;;
  esac
done

echo
echo "== summary (results under $RESULTS_DIR)"
printf '%s\n' "${SUMMARY[@]}"
if [ "$TESTS_RAN" = 1 ]; then
  echo "tests: $(tail -n 1 "$RESULTS_DIR/tests.log")"  # pytest's last line: passed / failed / skipped
fi
exit "$FAILED"
