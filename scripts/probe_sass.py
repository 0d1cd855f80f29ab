"""Probe: which machine instructions does the small-M kernel's loop run on Hopper? Needs no GPU.

Compiles `fp8_gemv._weight_only_kernel` for sm_90a with the Triton installed here (its bundled
`ptxas` and `nvdisasm`), with the specializations a real launch gets (unit strides as constants,
16-byte-divisible pointers and sizes), and counts the SASS opcodes of the whole kernel. This is
how the F2F conversions of triton's e4m3 -> bf16 lowering were found (64 per thread and K tile
at 16 x 32 x 256 tiles, docs/benchmarks.md "Dynamic scales at decode"); `fp8_gemv._dequantize`
removed them.

    .venv/bin/python scripts/probe_sass.py                        # weight-only, bf16 x
    .venv/bin/python scripts/probe_sass.py --x fp8 --block-n 64 --block-k 512 --swap-ab
    .venv/bin/python scripts/probe_sass.py --dump /tmp/sass       # also write the .ptx and .sass
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re

X_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8e4nv"}  # --x -> triton's pointer type
POINTERS = ("x_ptr", "w_ptr", "scale_ptr", "x_scale_ptr", "bias_ptr", "out_ptr")


def compile_weight_only(x: str = "bf16", block_n: int = 32, block_k: int = 256, split_k: int = 1,
                        swap_ab: bool = False, k: int = 2048, num_warps: int = 4, num_stages: int = 3,
                        arch: int = 90):  # fmt: skip
    """The compiled kernel (triton's CompiledKernel: .asm["ptx"], ["sass"]) for M <= 16 rows of x
    of type `x` ("bf16", "fp16": weight-only; "fp8": float8 x), tensorwise scales, no bias."""
    if x not in X_TYPES:
        raise ValueError(f"x={x!r}; allowed: {tuple(X_TYPES)}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from compile_fp8 import fp8_gemv

    out_type = "fp16" if x == "fp16" else "bf16"
    signature = {name: "*fp32" for name in POINTERS}
    signature.update(x_ptr=f"*{X_TYPES[x]}", w_ptr="*fp8e4nv", out_ptr=f"*{out_type}")
    for name in ("M", "N", "K", "stride_xm", "stride_wn", "stride_om", "stride_os"):
        signature[name] = "i32"
    constants = dict(stride_xk=1, stride_wk=1, stride_on=1, K_TILES=triton.cdiv(triton.cdiv(k, block_k), split_k),
                     SPLIT_K=split_k, ROWWISE=False, HAS_BIAS=False, FP32_DOT=False, SWAP_AB=swap_ab,
                     X_FP8=x == "fp8", X_ROWWISE=False, X_CAST=False, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k)  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    params = fp8_gemv._weight_only_kernel.arg_names
    missing = set(params) ^ set(signature)
    if missing:  # the kernel's parameters changed: keep this probe in step
        raise RuntimeError(f"probe_sass does not match _weight_only_kernel's parameters: {sorted(missing)}")
    signature = {name: signature[name] for name in params}
    divisible = (*POINTERS, "N", "K", "stride_xm", "stride_wn", "stride_om", "stride_os")
    source = ASTSource(
        fn=fp8_gemv._weight_only_kernel, signature=signature,
        constexprs={(params.index(n),): v for n, v in constants.items()},
        attrs={(params.index(n),): [["tt.divisibility", 16]] for n in divisible},
    )  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip


def opcode_counts(sass: str) -> collections.Counter:
    """Opcode (without modifiers) -> count, from triton's SASS listing."""
    counts = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"^\S*\t(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match:
            counts[match.group(1)] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--x", default="bf16", choices=tuple(X_TYPES))
    p.add_argument("--block-n", type=int, default=32)
    p.add_argument("--block-k", type=int, default=256)
    p.add_argument("--split-k", type=int, default=1)
    p.add_argument("--swap-ab", action="store_true")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=3)
    p.add_argument("--top", type=int, default=20, help="opcodes to list")
    p.add_argument("--dump", help="folder to write the kernel's .ptx and .sass to")
    args = p.parse_args()
    kernel = compile_weight_only(args.x, args.block_n, args.block_k, args.split_k, args.swap_ab,
                                 num_warps=args.num_warps, num_stages=args.num_stages)  # fmt: skip
    sass = kernel.asm["sass"]
    counts = opcode_counts(sass)
    print(f"_weight_only_kernel, x {args.x}, tiles 16 x {args.block_n} x {args.block_k}, split_k {args.split_k}, "
          f"swap_ab {args.swap_ab}, sm_90a: {sum(counts.values())} instructions")  # fmt: skip
    for opcode, n in counts.most_common(args.top):
        print(f"  {opcode:<12} {n}")
    if args.dump:
        out = pathlib.Path(args.dump)
        out.mkdir(parents=True, exist_ok=True)
        (out / "weight_only.ptx").write_text(kernel.asm["ptx"])
        (out / "weight_only.sass").write_text(sass)
        print(f"wrote {out}/weight_only.ptx and .sass")


if __name__ == "__main__":
    main()
