#!/usr/bin/env bash
# One device call for issue 3's open measurements, stage by stage, each capped:
#
#   run(command="bash scripts/device_perf.sh", carry=[".whl"], timeout_s=600)
#   bash scripts/device_perf.sh [STAGE...]       # default: rowwise compile
#
#   linear   one linear's fwd+bwd at the four ANCHORS shapes, every recipe, ours vs torchao vs bf16
#            (bench_linear.py, wall clock, 2 interleaved rounds; ~4 minutes)
#   step     the 956M train step, every recipe in one process: bench_train_step.py --variants $STEP_VARIANTS
#            (default bf16, ours and torchao tensorwise, ours and torchao rowwise; ~8 minutes)
#   rowwise  the 956M train step, rowwise recipes: bench_train_step.py --variants $ROWWISE_VARIANTS
#   compile  where the first step's compile time goes: profile_compile.py on the anchor model cut
#            to $COMPILE_LAYERS layers (each layer compiles the same code), variants $COMPILE_VARIANTS
#   profile  where one step's kernel time goes, per category: profile_train_step.py on the anchor
#            model cut to 2 layers, variants $PROFILE_VARIANTS
#   layers   "which layers should be FP8?": one linear's fwd+bwd CUDA kernel time (profiler, no host
#            time) per (K, N) of $LAYER_SHAPES at M = 16384, bf16 vs ours tensorwise / rowwise
#
# $OUT gets env.txt and one .md per stage (its table, then the tail of its log). Both benchmark
# tables from one call, on two GPUs at once (kind nvidia-h200-x2; each benchmark is one process):
#   source scripts/device_env.sh   # installs the carried wheels once, before both start
#   CUDA_VISIBLE_DEVICES=0 bash scripts/device_perf.sh linear & CUDA_VISIBLE_DEVICES=1 bash scripts/device_perf.sh step; wait
# (docs/benchmarks.md, 19:22 run). Variants may carry an experiment: STEP_VARIANTS=...,ours-tensorwise+rowamax
set -uo pipefail
OUT=${OUT:-runs/device_perf}
mkdir -p "$OUT"
source scripts/device_env.sh  # PYTHONPATH, carried wheels
W=$(mktemp -d)  # this call's logs and tables: two calls on two GPUs at once must not share files
python3 -c "import torch, triton, torchao; print(torch.__version__, triton.__version__, torchao.__version__)" \
  2>&1 | tail -1 | tee "$OUT/env.txt"
stage() {  # stage SECONDS NAME TABLE COMMAND...: run capped; $OUT/NAME.md = the table, then the log
  local limit=$1 name=$2 table=$3; shift 3
  echo "== $name ($(date -u +%T), cap ${limit}s)"
  timeout "$limit" "$@" > "$W/$name.log" 2>&1
  echo "== $name exit $?"
  { cat "$table" 2>/dev/null; echo; echo '## log'; echo '```'
    grep -v "Warning\|warn(" "$W/$name.log" | tail -40; echo '```'; } > "$OUT/$name.md"
}
for s in ${@:-rowwise compile}; do
  case $s in
    linear) stage "${LINEAR_S:-300}" linear $W/linear/bench_linear.md python3 scripts/bench_linear.py --rounds 2 \
              --variants "${LINEAR_VARIANTS:-bf16,ours-tensorwise,torchao-tensorwise,ours-rowwise,torchao-rowwise}" --out $W/linear ;;
    step) stage "${STEP_S:-560}" step $W/step/bench_train_step.md python3 scripts/bench_train_step.py \
            --variants "${STEP_VARIANTS:-bf16,ours-tensorwise,torchao-tensorwise,ours-rowwise,torchao-rowwise}" --out $W/step ;;
    rowwise) stage "${ROWWISE_S:-330}" rowwise $W/rowwise/bench_train_step.md python3 scripts/bench_train_step.py \
               --variants "${ROWWISE_VARIANTS:-bf16,ours-rowwise,torchao-rowwise}" --out $W/rowwise ;;
    compile) stage "${COMPILE_S:-200}" compile $W/compile/profile_compile.md python3 scripts/profile_compile.py \
               --layers "${COMPILE_LAYERS:-4}" --variants "${COMPILE_VARIANTS:-bf16,ours-tensorwise,torchao-tensorwise}" \
               --out $W/compile ;;
    profile) stage "${PROFILE_S:-240}" profile $W/profile/profile_train_step.md python3 scripts/profile_train_step.py \
               --layers 2 --variants "${PROFILE_VARIANTS:-bf16,ours-tensorwise,torchao-tensorwise}" --out $W/profile ;;
    layers) stage "${LAYERS_S:-280}" layers $W/layers/bench_linear.md python3 scripts/bench_linear.py \
              --timer kernels --rounds 1 --variants "${LAYER_VARIANTS:-bf16,ours-tensorwise,ours-rowwise}" \
              --shapes "${LAYER_SHAPES:-$(python3 scripts/layer_grid.py)}" --out $W/layers ;;
    *) echo "unknown stage $s (linear step rowwise compile profile layers)"; exit 2 ;;
  esac
done
date -u
