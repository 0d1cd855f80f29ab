"""Time the Triton amax / cast_dual kernels (compile_fp8/kernels/cast.py) against inductor's code.

For each bf16 x [M, K] (default [16384, 8192] and [16384, 4096]) it times, with
``triton.testing.do_bench(..., return_mode="median")``:

* ``copy``         ``x.clone()``: the bandwidth ceiling (bytes read + written)
* ``amax``         ``cast.amax(x)`` vs ``torch.compile(cast.amax_reference)``
* ``cast_dual``    ``cast.cast_dual(x, scale, e4m3 / e5m2)`` vs ``torch.compile`` of
                   ``cast.cast_dual_reference`` (row-major + column-major float8 copies)
* ``amax+cast``    the whole dynamic tensorwise cast (amax -> scale -> dual cast) compiled with
                   ``fullgraph=True``, through the Triton ops vs through the references

and prints ms and GB/s (bytes the op must move / time), checking that ours and inductor's
outputs are bitwise equal. Two timers: ``graph`` (``do_bench_cudagraph``: GPU time alone) and
``launch`` (``do_bench``: also counts the host's launch cost, which a slow host can dominate
for a 0.1 ms kernel). ``--sweep`` also times a few block configs of each kernel (passed to
the launchers as arguments; the measurements behind ``cast.AMAX_CONFIG`` / ``CAST_CONFIG``).

``--accum`` also times cuBLAS's FP8 GEMMs (``torch._scaled_mm``) at the three GEMMs of each
linear of the 956M LM (M = 16384 tokens; output e4m3 x e4m3, grad_input and grad_weight e5m2 x
e4m3), with and without fast accumulation (``Float8Config(fast_accum=...)``), and bf16 ``mm``.

On a CUDA GPU with FP8 (sm89+) and triton::

    python scripts/bench_kernels.py [--sweep] [--accum] --out runs/bench_kernels

``--out DIR`` (default ``runs/bench_kernels``) gets ``bench_kernels.md`` (what is printed) and
``bench_kernels.json`` (one row per op, float8 type and timer; the sweep's rows with ``--sweep``).

Smoke test on CPU (the torch fallbacks; under TRITON_INTERPRET=1 the kernels in Triton's
interpreter), timed with perf_counter, only checks that it works::

    python scripts/bench_kernels.py --small
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from functools import partial

import torch

from compile_fp8.kernels import cast, triton_support
from compile_fp8.scaling import amax_to_scale

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import add_out_argument, device_name, write_results  # noqa: E402

SHAPES = ((16384, 8192), (16384, 4096))
SMALL_SHAPES = ((37, 50), (64, 48))
COLUMNS = ("op", "float8", "timer", "ours ms", "ours GB/s", "inductor ms", "inductor GB/s",
           "speed-up", "bitwise")  # fmt: skip
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# (elements per block, programs per SM, warps) and (BLOCK_M, BLOCK_K, warps)
AMAX_SWEEP = [
    (b, p, w) for b in (2048, 4096, 8192, 16384) for p in (1, 2, 4, 8) for w in (4, 8, 16)
]
CAST_SWEEP = [(64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 4), (128, 128, 8),
              (64, 256, 8), (256, 64, 8), (32, 128, 4), (128, 32, 4), (256, 128, 8)]  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int32)


def _same(a, b) -> bool:
    a, b = (a,) if torch.is_tensor(a) else a, (b,) if torch.is_tensor(b) else b
    return all(x.stride() == y.stride() and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def _timers(small: bool):
    """{name: fn -> median ms}. On CUDA: `graph` replays 100 ms of calls captured in a CUDA graph
    (the GPU's time alone); `launch` is plain do_bench, which also counts the Python launch cost
    (it records the start event before `fn` runs, so a slow host shows up in the time)."""
    if not small:
        from triton.testing import do_bench, do_bench_cudagraph

        return {
            "graph": lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median"),
            "launch": lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median"),
        }

    def perf_counter_ms(fn, iters=3):
        fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters * 1e3

    return {"perf_counter": perf_counter_ms}


def _ours(small: bool):
    """The public functions; on CPU under the interpreter, the Triton ops themselves."""
    if small and triton_support.triton is not None and triton_support.interpreting():
        return torch.ops.compile_fp8.amax, torch.ops.compile_fp8.cast_dual
    return cast.amax, cast.cast_dual


def _tensorwise_cast(amax_fn, cast_fn):
    def cast(x, float8_dtype):
        scale = amax_to_scale(amax_fn(x), float8_dtype)
        return cast_fn(x, scale, float8_dtype)

    return cast


def bench_cases(m, k, device, small):
    """(op, float8, ours_fn, inductor_fn, bytes moved, bitwise equal) for one bf16 x [m, k]."""
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16) * 3
    amax_ours, cast_ours = _ours(small)
    nbytes = x.numel() * x.element_size()
    cases = [("copy", "bf16", lambda: x.clone(), None, 2 * nbytes, True)]
    amax_ind = torch.compile(cast.amax_reference, fullgraph=True)
    same = _same(amax_ours(x), amax_ind(x))
    cases.append(("amax", "bf16", lambda: amax_ours(x), lambda: amax_ind(x), nbytes, same))
    cast_ind = torch.compile(cast.cast_dual_reference, fullgraph=True)
    fused_ours = _tensorwise_cast(amax_ours, cast_ours)
    if not (small and triton_support.interpreting()):  # interpreted kernels do not trace
        fused_ours = torch.compile(fused_ours, fullgraph=True)
    fused_ind = torch.compile(
        _tensorwise_cast(cast.amax_reference, cast.cast_dual_reference), fullgraph=True
    )
    for name, dtype in FP8_DTYPES.items():
        scale = amax_to_scale(amax_ours(x), dtype)
        same = _same(cast_ours(x, scale, dtype), cast_ind(x, scale, dtype))
        ours, ind = partial(cast_ours, x, scale, dtype), partial(cast_ind, x, scale, dtype)
        cases.append(("cast_dual", name, ours, ind, nbytes + 2 * x.numel(), same))
        same = _same(fused_ours(x, dtype), fused_ind(x, dtype))
        ours, ind = partial(fused_ours, x, dtype), partial(fused_ind, x, dtype)
        cases.append(("amax+cast", name, ours, ind, 2 * nbytes + 2 * x.numel(), same))
    return cases


def sweep_shape(m, k, device, timer, emit) -> list[dict]:
    """Time each AMAX_SWEEP / CAST_SWEEP config of the kernels (CUDA only); rows for the json."""
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    scale = torch.tensor(10.0, device=device)
    nbytes = x.numel() * x.element_size()
    rows = []
    emit(f"\n### sweep [{m}, {k}]: amax (block, programs/SM, warps), cast_dual (BM, BK, warps)\n")
    for block, per_sm, warps in AMAX_SWEEP:
        ms = timer(partial(cast._launch_amax, x, block, per_sm, warps))
        rows.append({"sweep": "amax", "m": m, "k": k, "block": block, "programs_per_sm": per_sm,
                     "num_warps": warps, "ms": ms, "gb_s": nbytes / ms / 1e6})  # fmt: skip
        emit(f"amax      {block:>6} {per_sm:>3} {warps:>3}  {ms:.4f} ms  {rows[-1]['gb_s']:7.0f} GB/s")
    for soft in (False, True):
        for bm, bk, warps in CAST_SWEEP:
            ms = timer(partial(cast._launch_cast_dual, x, scale, torch.float8_e4m3fn, soft, bm, bk, warps))
            rows.append({"sweep": "cast_dual", "m": m, "k": k, "block_m": bm, "block_k": bk, "num_warps": warps,
                         "soft_cast": soft, "ms": ms, "gb_s": (nbytes + 2 * x.numel()) / ms / 1e6})  # fmt: skip
            emit(f"cast_dual {bm:>4} {bk:>4} {warps:>3} soft={soft!s:5}  {ms:.4f} ms  {rows[-1]['gb_s']:7.0f} GB/s")
    return rows


ACCUM_TOKENS = 16384
ACCUM_LAYERS = ((2048, 6144), (2048, 2048), (2048, 5632), (5632, 2048))  # (K, N): qkv, out, gate/up, down
ACCUM_COLUMNS = ("layer K x N", "GEMM", "fast accum ms", "full accum ms", "full / fast", "bf16 ms")


def _accum_gemms(k, n, tokens):
    """(GEMM, [M, K'] A dims, [K', N'] B dims, A's float8) of a linear's three GEMMs."""
    e4m3, e5m2 = FP8_DTYPES["e4m3"], FP8_DTYPES["e5m2"]
    return (("output", (tokens, k), (k, n), e4m3), ("grad_input", (tokens, n), (n, k), e5m2),
            ("grad_weight", (n, tokens), (tokens, k), e5m2))  # fmt: skip


def bench_accum(device, timer, small, emit) -> list[dict]:
    """_scaled_mm with and without fast accumulation (and bf16 mm) per GEMM; rows for the json."""
    tokens, layers = (64, ((32, 48),)) if small else (ACCUM_TOKENS, ACCUM_LAYERS)
    one, rows = torch.ones((), device=device), []
    emit(f"\n### FP8 GEMMs, fast vs full accumulation (M = {tokens} tokens)\n")
    emit(f"| {' | '.join(ACCUM_COLUMNS)} |\n|{'---|' * len(ACCUM_COLUMNS)}")
    for k, n in layers:
        for gemm, (m, kk), (_, cols), a_dtype in _accum_gemms(k, n, tokens):
            a = torch.randn(m, kk, device=device).to(a_dtype)
            b = torch.randn(cols, kk, device=device).to(FP8_DTYPES["e4m3"]).t()  # column-major
            a_hp, b_hp = a.to(torch.bfloat16), b.to(torch.bfloat16)
            ms = {fast: timer(partial(torch._scaled_mm, a, b, one, one, out_dtype=torch.bfloat16,
                                      use_fast_accum=fast)) for fast in (True, False)}  # fmt: skip
            bf16 = timer(partial(torch.mm, a_hp, b_hp))
            emit(f"| {k} x {n} | {gemm} | {ms[True]:.4f} | {ms[False]:.4f} | "
                 f"{ms[False] / ms[True]:.3f} | {bf16:.4f} |")  # fmt: skip
            rows.append({"k": k, "n": n, "gemm": gemm, "fast_ms": ms[True], "full_ms": ms[False], "bf16_ms": bf16})
    return rows


def _fmt(ms, nbytes):
    return ("-", "-") if ms is None else (f"{ms:.4f}", f"{nbytes / ms / 1e6:.0f}")


def bench_shape(m, k, device, timers, small, emit) -> list[dict]:
    """The table of one bf16 x [m, k]: every case under every timer; rows for the json."""
    rows = []
    emit(f"\n### x [{m}, {k}] bf16 (GB/s: the bytes the op must move / time)\n")
    emit(f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}")
    for name, dtype, ours_fn, ind_fn, nbytes, same in bench_cases(m, k, device, small):
        for timer_name, timer in timers.items():
            ours, ind = timer(ours_fn), None if ind_fn is None else timer(ind_fn)
            speedup = "-" if ind is None else f"{ind / ours:.2f}x"
            cells = [name, dtype, timer_name, *_fmt(ours, nbytes), *_fmt(ind, nbytes), speedup]
            emit(f"| {' | '.join(cells)} | {'yes' if same else 'NO'} |")
            rows.append({"m": m, "k": k, "op": name, "float8": dtype, "timer": timer_name, "ours_ms": ours,
                         "inductor_ms": ind, "bytes": nbytes, "bitwise": bool(same)})  # fmt: skip
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes on CPU, perf_counter timer")
    p.add_argument("--sweep", action="store_true", help="also time block configs (CUDA)")
    p.add_argument("--accum", action="store_true", help="also time FP8 GEMMs, fast vs full accumulation")
    add_out_argument(p, "bench_kernels")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    if device.type == "cpu" and not args.small:
        p.error("no CUDA GPU: run with --small (a CPU smoke test)")
    if device.type == "cuda" and not triton_support.triton_available(device):
        p.error(f"{torch.cuda.get_device_name(device)}: the kernels need triton and an sm89+ GPU")
    timers = _timers(args.small)
    lines, rows = [], []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    triton_version = getattr(triton_support.triton, "__version__", "absent")
    emit(f"device: {device_name(device)}, torch {torch.__version__}, triton {triton_version}")
    for m, k in SMALL_SHAPES if args.small else SHAPES:
        rows += bench_shape(m, k, device, timers, args.small, emit)
        if args.sweep and device.type == "cuda":
            rows += sweep_shape(m, k, device, timers["graph"], emit)
        write_results(args.out, "bench_kernels", "\n".join(lines) + "\n", {"rows": rows})
    if args.accum:
        rows += bench_accum(device, timers["graph" if device.type == "cuda" else "perf_counter"], args.small, emit)
        write_results(args.out, "bench_kernels", "\n".join(lines) + "\n", {"rows": rows})
    return 0 if all(r["bitwise"] for r in rows if "bitwise" in r) else 1


if __name__ == "__main__":
    raise SystemExit(main())
