"""How fast are the amax and cast kernels inductor writes for us, and can another spelling win?

    python3 scripts/probe_casts.py [--out DIR]        # CUDA only; ~2 minutes on an H200

Part 1 times single compiled ops on bf16 activations of the ANCHORS model's shapes against a
plain copy (the bandwidth reference):

* amax, spelled "flat" (`max(abs(x))`, one reduction over everything, `scaling.amax`) and "rows"
  (max per row, then the max of those): the same bits, different kernels;
* the dynamic cast (amax -> scale -> cast) with either spelling;
* the cast into the transposed layout `_scaled_mm` needs in backward, with inductor's default
  tiling and with `triton.prefer_nd_tiling`.

Part 2 times the fwd+bwd of one FP8 linear (bench_linear's step), with and without nd tiling,
beside torchao tensorwise, in one process. (The 2026-11-29 H200 run also timed a per-row amax
inside the linear: within 1% of the flat one; that switch is gone from `scaling.py`.)
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_linear  # noqa: E402

from compile_fp8 import scaling  # noqa: E402
from compile_fp8.config import CastSpec  # noqa: E402

SHAPES = ((16384, 8192), (16384, 2048))
LINEAR_SHAPES = ((8192, 8192), (2048, 5632), (5632, 2048))
E4M3 = torch.float8_e4m3fn
E4M3_SPEC = CastSpec(E4M3, "tensorwise")


def bench(fn, *args) -> float:
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median")


def compiled(fn, nd_tiling=False):
    """`fn` compiled fresh, with or without inductor's nd tiling (compiles on first call)."""
    torch._dynamo.reset()
    opt = torch.compile(fn, dynamic=False)

    def run(*args):
        with torch._inductor.config.patch({"triton.prefer_nd_tiling": nd_tiling}):
            return opt(*args)

    return run


def amax_rows(t):
    """max |t| as the max of per-row maxima: the same bits as `scaling.amax`, other kernels."""
    return torch.amax(torch.abs(t), dim=-1).max()


def part1() -> list[str]:
    lines = ["| shape | op | ms | GB/s |", "|---|---|---:|---:|"]
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        scale = scaling.amax_to_scale(scaling.amax(x), E4M3)
        nbytes = x.numel() * x.element_size()
        ops = {
            "copy (reference)": (compiled(lambda t: t * 1), nbytes * 2),
            "amax flat": (compiled(scaling.amax), nbytes),
            "amax rows": (compiled(amax_rows), nbytes),
            "cast dynamic, flat amax": (compiled(_dyn), nbytes * 2.5),
            "cast dynamic, rows amax": (compiled(_dyn_rows), nbytes * 2.5),
            "cast -> transposed": (compiled(_cast_t), nbytes * 1.5),
            "cast -> transposed, nd tiling": (compiled(_cast_t, nd_tiling=True), nbytes * 1.5),
            "cast -> both layouts": (compiled(_cast_both), nbytes * 2),
            "cast -> both layouts, nd tiling": (compiled(_cast_both, nd_tiling=True), nbytes * 2),
        }
        for name, (fn, moved) in ops.items():
            args = (x,) if "transposed" not in name and "both" not in name else (x, scale)
            ms = bench(fn, *args)
            lines.append(f"| {m}x{k} | {name} | {ms:.4f} | {moved / ms / 1e6:,.0f} |")
            print(lines[-1], flush=True)
    return lines


def _dyn(t):
    return scaling.cast_to_fp8(t, E4M3_SPEC, 1)[0]


def _dyn_rows(t):
    return scaling.saturated_cast(t, scaling.amax_to_scale(amax_rows(t), E4M3), E4M3)


def _cast_t(t, scale):
    return scaling.saturated_cast(t, scale, E4M3).t().contiguous()


def _cast_both(t, scale):
    fp8 = scaling.saturated_cast(t, scale, E4M3)
    return fp8, fp8.t().contiguous()


def part2(m: int) -> list[str]:
    choices = [("ours", False), ("ours + nd tiling", True)]
    lines = ["| K | N | torchao tw ms | " + " | ".join(f"{c[0]} ms" for c in choices) + " |",
             "|---:|---:|---:|" + "---:|" * len(choices)]  # fmt: skip
    for k, n in LINEAR_SHAPES:
        base = bench_linear.make_base(k, n, "cuda")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        row = []
        for label, nd in [("torchao", False)] + choices:
            torch._dynamo.reset()
            name = "torchao-tensorwise" if label == "torchao" else "ours-tensorwise"
            with torch._inductor.config.patch({"triton.prefer_nd_tiling": nd}):
                step = bench_linear.make_step(bench_linear.build_variant(name, base, x), x, grad)
                step()  # compile under these settings
                row.append(bench(step))
        lines.append(f"| {k} | {n} | " + " | ".join(f"{ms:.3f}" for ms in row) + " |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--skip-linear", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_casts.py times CUDA kernels; no GPU here", file=sys.stderr)
        return 2
    bench_linear.raise_compile_limits()
    text = ["# probe_casts (part 1: single ops)", ""] + part1()
    if not args.skip_linear:
        text += ["", f"# part 2: one FP8 linear fwd+bwd, M={args.m}", ""] + part2(args.m)
    if args.out:
        pathlib.Path(args.out, "probe_casts.md").write_text("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
