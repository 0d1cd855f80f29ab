#!/usr/bin/env bash
# One device call for two issues:
#   1. the training demo on the GPU (issue 4): scripts/device_train.sh, `wide` preset by default
#      (bf16 then FP8 tensorwise, same seed and batches, then compare_runs.py);
#   2. the 956M train step with each scaling mode beside dynamic (issue 5):
#      scripts/bench_train_step.py --variants $BENCH_VARIANTS, capped at BENCH_S seconds (the
#      table is rewritten after each variant, so a cut run keeps the rows it finished).
#
#   run(command="bash scripts/device_train_and_scaling.sh", carry=["data/corpus"], timeout_s=600)
#
# $OUT gets device_train.sh's 7 files and bench_train_step.md (its table, then its log): 8 files,
# the device tool's limit.
set -uo pipefail
OUT=${OUT:-runs/device_train_and_scaling}
mkdir -p "$OUT"
source scripts/device_env.sh  # PYTHONPATH, carried wheels
STEPS=${STEPS:-500} BATCH=${BATCH:-8} PRESET=${PRESET:-wide}
SEQ=${SEQ:-2048} RUN_LIMIT=${RUN_LIMIT:-110} OUT=$OUT bash scripts/device_train.sh "$STEPS" "$BATCH" "$PRESET"
echo "== device_train exit $?"

BENCH_VARIANTS=${BENCH_VARIANTS:-bf16,ours-tensorwise,ours-static,ours-delayed,ours-staticgrads}
echo "== bench_train_step ($(date -u +%T), cap ${BENCH_S:-330}s): $BENCH_VARIANTS"
timeout "${BENCH_S:-330}" python3 scripts/bench_train_step.py --variants "$BENCH_VARIANTS" \
  --out /tmp/bench_train_step > /tmp/bench_train_step.log 2>&1
echo "== bench_train_step exit $?"
{ cat /tmp/bench_train_step/bench_train_step.md 2>/dev/null; echo; echo '## log'; echo '```'
  grep -v "Warning\|warn(" /tmp/bench_train_step.log | tail -60; echo '```'; } > "$OUT/bench_train_step.md"
date -u
