#!/usr/bin/env bash
# One device call = the issue-4 GPU run: the `wide` preset (the 956M anchor model's layer shapes
# in 4 layers, 309M params without the embedding) trained in bf16, then in FP8 tensorwise, same
# seed, same weights, same batches; then compare_runs.py. Everything that comes back lands
# directly in $OUT:
#
#   env.txt  train_bf16.log  train_fp8.log  metrics_bf16.jsonl  metrics_fp8_tensorwise.jsonl
#   comparison.md  loss.png                                     (7 files; the tool returns 8)
#
# Checkpoints go to /tmp/runs (never to $OUT). Run from the repo root on the device tool, with
# the prepared corpus carried along (prepare it here first: python scripts/prepare_data.py):
#
#   run(command="bash scripts/device_train.sh", carry=["data/corpus"], timeout_s=600)
#   bash scripts/device_train.sh [STEPS [BATCH_SIZE [PRESET]]]      # defaults: 500 8 wide
#
# Measured (H200, 2026-11-29, docs/training.md): 500 steps of 8 x 2048 tokens (8.2M tokens,
# 1.5 passes over the corpus); bf16 first step 13 s then ~60 ms/step, FP8 22 s then ~52 ms/step;
# the whole call took 148 s. Each run is capped at RUN_LIMIT seconds (default 270) so the
# comparison always runs inside the 10-minute call.
set -uo pipefail
STEPS=${1:-500}
BATCH=${2:-8}
PRESET=${3:-wide}
RUN_LIMIT=${RUN_LIMIT:-270}
SEQ=${SEQ:-2048}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu SEQ=128 ... 10 4 tiny: a CPU dry run of this script
OUT=${OUT:-runs/device_train}
RUNS=/tmp/runs
mkdir -p "$OUT" "$RUNS"
source scripts/device_env.sh  # PYTHONPATH, carried wheels

if [ ! -s data/corpus/train.bin ]; then
  echo "data/corpus/train.bin is missing: run 'python scripts/prepare_data.py' on the CPU side" \
       "and pass carry=[\"data/corpus\"] to the device call" >&2
  exit 2
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  echo "preset=$PRESET steps=$STEPS batch=$BATCH x $SEQ run_limit=${RUN_LIMIT}s"
} 2>&1 | tee "$OUT/env.txt"

train() {  # train FP8_RECIPE LOGNAME: one scripts/train.py process, capped at RUN_LIMIT
  rm -rf "$RUNS/$2"
  timeout "$RUN_LIMIT" python3 scripts/train.py --preset "$PRESET" --fp8 "$1" \
    --steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ" --seed 0 --device "$DEVICE" \
    --eval-every 100 --eval-batches 20 --out "$RUNS/$2" --progress print 2>&1 \
    | tee "$OUT/train_$2.log"
  local rc=${PIPESTATUS[0]}
  cp "$RUNS/$2/metrics.jsonl" "$OUT/metrics_$3.jsonl" 2>/dev/null
  echo "== $2: exit status $rc (124 = stopped at ${RUN_LIMIT}s)"
  return "$rc"
}

echo "== bf16"
train none bf16 bf16; bf16_rc=$?
echo "== fp8 tensorwise"
train tensorwise fp8 fp8_tensorwise; fp8_rc=$?

echo "== comparison"
python3 scripts/compare_runs.py "$OUT/metrics_bf16.jsonl" "$OUT/metrics_fp8_tensorwise.jsonl" \
  --out "$OUT"
compare_rc=$?
echo "bf16 rc=$bf16_rc fp8 rc=$fp8_rc compare rc=$compare_rc"
exit $(( bf16_rc || fp8_rc || compare_rc ))
