"""Where does the time of one compiled FP8 linear (fwd+bwd) go? A kernel table per variant.

    python scripts/profile_linear.py --shape 8192x8192 --variants ours-tensorwise,torchao-tensorwise

Uses bench_linear's variants and the torch profiler (CUDA time per kernel, 10 profiled steps
after warm-up), printing the top kernels of each variant: GEMMs vs casts/amax/transposes.
Needs a CUDA GPU with FP8 (sm89+); torchao for the torchao variants. `--out DIR` (default
runs/profile_linear) gets profile_linear.md: the tables, rewritten after every variant.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_linear  # noqa: E402
from _bench_common import add_out_argument, raise_compile_limits, write_results  # noqa: E402


def profile_variant(name: str, k: int, n: int, m: int, steps: int) -> str:
    base = bench_linear.make_base(k, n, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    step = bench_linear.make_step(bench_linear.build_variant(name, base, x), x, grad)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
    return f"## {name} K={k} N={n} M={m} ({steps} steps; divide totals by {steps})\n\n```\n{table}\n```"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8192x8192", help="KxN")
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="ours-tensorwise,torchao-tensorwise,ours-delayed")
    add_out_argument(p, "profile_linear", "profile_linear.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("profile_linear.py profiles CUDA kernels: no CUDA GPU here")
    k, n = (int(v) for v in args.shape.split("x"))
    raise_compile_limits()
    tables = []
    for name in args.variants.split(","):
        tables.append(profile_variant(name, k, n, args.m, args.steps))
        print(tables[-1], flush=True)
        write_results(args.out, "profile_linear", "\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
