"""Compile the small-M kernel for Hopper (sm_90a) without a GPU and count its SASS opcodes.

Used by tests/test_scripts.py. `compile_weight_only` compiles
`compile_fp8.kernels.small_m_kernels._weight_only_kernel` with the Triton installed here (its
bundled `ptxas` and `nvdisasm`), with the specializations a real launch gets (unit strides as
constants, 16-byte-divisible pointers and sizes); `opcode_counts` counts the opcodes of the
whole kernel's SASS listing. This is how a test holds the weight-only kernel's e4m3 -> bf16
dequantization (`small_m_kernels._dequantize`) free of F2F conversions.

To look at a kernel by hand, from the repository root (float8 x: `compile_weight_only("fp8",
block_n=64, block_k=512, swap_ab=True)`)::

    .venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); import sass_tools as t; \\
        print(t.opcode_counts(t.compile_weight_only().asm['sass']).most_common(20))"
"""

from __future__ import annotations

import collections
import re

X_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8e4nv"}  # x -> triton's pointer type
POINTERS = ("x_ptr", "w_ptr", "scale_ptr", "x_scale_ptr", "bias_ptr", "out_ptr")
INTS = ("M", "N", "K", "stride_xm", "stride_wn", "stride_om", "stride_os")


def _signature(x: str, constants: dict, params: list[str]) -> dict:
    """The kernel's argument types in parameter order: pointers, i32 sizes and strides, constexprs."""
    signature = {name: "*fp32" for name in POINTERS}
    out_type = "fp16" if x == "fp16" else "bf16"
    signature.update(x_ptr=f"*{X_TYPES[x]}", w_ptr="*fp8e4nv", out_ptr=f"*{out_type}")
    signature.update({name: "i32" for name in INTS})
    signature.update({name: "constexpr" for name in constants})
    mismatch = set(params) ^ set(signature)
    if mismatch:  # the kernel's parameters changed: keep this helper in step
        raise RuntimeError(f"sass_tools does not match _weight_only_kernel's parameters: {sorted(mismatch)}")
    return {name: signature[name] for name in params}


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

    from compile_fp8.kernels.small_m_kernels import _weight_only_kernel

    constants = dict(stride_xk=1, stride_wk=1, stride_on=1, K_TILES=triton.cdiv(triton.cdiv(k, block_k), split_k),
                     SPLIT_K=split_k, ROWWISE=False, HAS_BIAS=False, FP32_DOT=False, SWAP_AB=swap_ab,
                     X_FP8=x == "fp8", X_ROWWISE=False, X_CAST=False, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k)  # fmt: skip
    params = _weight_only_kernel.arg_names
    signature = _signature(x, constants, params)
    divisible = (*POINTERS, "N", "K", "stride_xm", "stride_wn", "stride_om", "stride_os")
    source = ASTSource(
        fn=_weight_only_kernel, signature=signature,
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
