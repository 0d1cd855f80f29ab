"""Compare training runs: loss curves (PNG) and a table of final losses, speed and memory.

    python scripts/compare_runs.py runs/tiny-bf16 runs/tiny-fp8-tensorwise --out runs/compare
    python scripts/compare_runs.py runs/tiny-fp32 runs/tiny-fp8-tensorwise     # made on CPU

Each argument is a run folder of scripts/train.py (or its metrics.jsonl file). Writes
OUT/comparison.md and OUT/loss.png and prints the table. The reference for the relative
differences and the speed-up is the baseline run (--fp8 none), labelled by its parameter dtype:
bf16, or fp32 (float32, the default on CPU). tokens/s and the speed-up are shown only for runs
recorded on a CUDA GPU: on CPU the FP8 GEMMs are emulated, so tokens/s there are not meaningful
for FP8 and the report compares the losses only (and says so). See compile_fp8/lm/compare.py.
"""

from __future__ import annotations

import argparse
import sys

from compile_fp8.lm.compare import write_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files)")
    p.add_argument("--out", default="runs/compare", help="folder for comparison.md and loss.png")
    args = p.parse_args(argv)
    try:
        markdown = write_report(args.runs, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"wrote {args.out}/comparison.md and {args.out}/loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
