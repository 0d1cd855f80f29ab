"""Triton kernels for the memory-bound steps of a tensorwise cast: amax, and the dual-layout cast.

Every FP8 linear casts two big tensors per step: the input in forward and grad_output in
backward. Each cast is two passes over the high-precision tensor::

    amax      = max |x|                                   # read x once
    x_fp8     = clamp(x.float() * scale, -fmax, fmax).to(float8)     # [M, K] row-major
    x_fp8_col = the same values, column-major (the storage of x_fp8.t(): [K, M] contiguous)

Both layouts are needed: `_scaled_mm` takes A row-major and B column-major (`gemm.py`, [Note]
_scaled_mm layout rules), and each of these tensors is the A of one GEMM and the B of another.
Inductor's own kernels for these steps run well below the GPU's copy bandwidth; these run near
it (docs/benchmarks.md has the measurements, `scripts/bench_kernels.py` the benchmark).

`amax` is a grid-stride reduction: each program keeps an elementwise running max over many
blocks (one wide load per block), reduces it once, and does one `atomic_max`. |x| >= 0, and
non-negative floats order like their int32 bit patterns, so the whole reduction runs on the bits:
integer max is exact, and NaN (bits above inf's 0x7f800000) propagates without special cases.

`cast_dual` loads one 2-D tile of x, scales, clamps and casts it once (`triton_support.to_fp8`,
[Note] float8 cast numerics there), and stores it twice: as is into the row-major output and
transposed (`tl.trans`, through shared memory) into the column-major one, so both stores are
coalesced. float32 inputs are cast by the torch code even on the GPU (`CAST_KERNEL_DTYPES`).

The public `amax` / `cast_dual` dispatch to the ops on CUDA (sm89+, triton importable) and to
`scaling.py`'s functions, the same results, elsewhere. `training/linear_fn.py` uses them when
`Float8Config(cast_kernels="triton")`.
"""

from __future__ import annotations

import torch

from ..scaling import amax as tensor_amax
from ..scaling import saturated_cast
from .triton_support import FP8_FORMATS, interpreting, sm_count, tl, triton, triton_available

if triton is not None:
    from .triton_support import to_fp8
HP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# float32 x: with triton 3.6 on sm90 the kernel's column-major output comes out wrong when
# K % 16 == 0 (the row-major one is right; the interpreter is right), so float32 inputs take the
# torch code (inside the op: compiled, inductor fuses it as before).
CAST_KERNEL_DTYPES = (torch.bfloat16, torch.float16)

# Tuning (tiles that won a sweep on an H200, `scripts/bench_kernels.py --sweep`): elements per
# load for amax, programs per SM, and the cast tile [BLOCK_M, BLOCK_K] of x with its warps.
AMAX_CONFIG = {"block": 8192, "programs_per_sm": 4, "num_warps": 8}
CAST_CONFIG = {"block_m": 64, "block_k": 64, "num_warps": 4}


# ---- torch fallbacks: the reference numerics -----------------------------------------------


def amax_reference(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 scalar (exact: the max of values that float32 holds exactly)."""
    return tensor_amax(x).to(torch.float32)


cast_reference = saturated_cast  # the numerics the kernel reproduces bit for bit


def cast_dual_reference(x, scale, float8_dtype):
    """(row-major [M, K], column-major [M, K]) float8 copies of `x`, in plain torch."""
    x_fp8 = cast_reference(x, scale, float8_dtype)
    return x_fp8, x_fp8.t().contiguous().t()


# ---- public entry points ---------------------------------------------------------------------


def amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over all elements, a float32 scalar; NaN if x holds a NaN, inf if it holds +-inf."""
    if triton_available(x.device) and x.dtype in HP_DTYPES and x.numel() > 0:
        return torch.ops.compile_fp8.amax(x)
    return amax_reference(x)


def cast_dual(
    x: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [M, K] scaled, saturated and cast to float8, written row-major and column-major.

    Returns `(x_fp8, x_fp8_col)`, both [M, K]; `x_fp8_col` has strides (1, M), i.e. it is the
    `.t()` of a contiguous [K, M] tensor. `scale` is a float32 scalar tensor.
    """
    if x.dim() != 2:
        raise ValueError(f"cast_dual takes a 2-D x [M, K], got {tuple(x.shape)}; flatten it first")
    if float8_dtype not in FP8_FORMATS:
        raise ValueError(f"float8_dtype={float8_dtype} is not one of {list(FP8_FORMATS)}")
    if triton_available(x.device) and x.dtype in CAST_KERNEL_DTYPES and x.numel() > 0:
        return torch.ops.compile_fp8.cast_dual(x, scale, float8_dtype)
    return cast_dual_reference(x, scale, float8_dtype)


# ---- Triton kernels and ops ------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _amax_body(x_ptr, out_bits_ptr, n, iters, BLOCK: tl.constexpr):
        """One program: running max over blocks pid, pid + P, ... of the flat x; one atomic."""
        pid = tl.program_id(0).to(tl.int64)
        programs = tl.num_programs(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(iters):  # iters = cdiv(blocks, P): the last round is partly masked
            offs = (pid + i * programs) * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
            # |x| as int32 bits (sign bit cleared): ordered like the values, NaN above inf.
            bits = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
            acc = tl.maximum(acc, bits)
        tl.atomic_max(out_bits_ptr, tl.max(acc, axis=0))

    @triton.jit
    def _amax_kernel(x_ptr, out_bits_ptr, n, iters, BLOCK: tl.constexpr):
        _amax_body(x_ptr, out_bits_ptr, n, iters, BLOCK)

    @triton.jit
    def _amax_kernel_interpreted(x_ptr, out_bits_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        # The interpreter (triton 3.6, numpy >= 2.3) cannot loop to a runtime bound.
        _amax_body(x_ptr, out_bits_ptr, n, ITERS, BLOCK)

    @triton.jit
    def _cast_dual_kernel(
        x_ptr, scale_ptr, row_ptr, col_ptr, M, K,
        FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, SOFT_CAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One [BLOCK_M, BLOCK_K] tile of x -> the same tile of row [M, K] and of col [K, M]."""
        pid = tl.program_id(0)
        tiles_k = tl.cdiv(K, BLOCK_K)
        pid_m, pid_k = pid // tiles_k, pid % tiles_k
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)

        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        scale = tl.load(scale_ptr)
        x_fp8 = to_fp8(x, scale, FMAX, MANT, BIAS, SOFT_CAST)  # [BLOCK_M, BLOCK_K]
        tl.store(row_ptr + offs_m[:, None] * K + offs_k[None, :], x_fp8, mask=mask)
        # col [K, M] contiguous: the transposed tile, stored along M (coalesced)
        col_offs = offs_k[:, None] * M + offs_m[None, :]  # [BLOCK_K, BLOCK_M]
        tl.store(col_ptr + col_offs, tl.trans(x_fp8), mask=tl.trans(mask))

    def _launch_amax(x: torch.Tensor, block: int, programs_per_sm: int, num_warps: int):
        x = x.contiguous()
        out = torch.zeros((), dtype=torch.float32, device=x.device)
        n = x.numel()
        blocks = triton.cdiv(n, block)
        programs = max(1, min(blocks, programs_per_sm * sm_count(x.device)))
        kernel = _amax_kernel_interpreted if interpreting() else _amax_kernel
        iters = triton.cdiv(blocks, programs)
        torch.library.wrap_triton(kernel)[(programs,)](
            x, out.view(torch.int32), n, iters, BLOCK=block, num_warps=num_warps
        )
        return out

    def _launch_cast_dual(x, scale, float8_dtype, soft_cast, block_m, block_k, num_warps):
        x = x.contiguous()
        m, k = x.shape
        row = torch.empty((m, k), dtype=float8_dtype, device=x.device)
        col = torch.empty_strided((m, k), (1, m), dtype=float8_dtype, device=x.device)
        mant, bias = FP8_FORMATS[float8_dtype]
        grid = (triton.cdiv(m, block_m) * triton.cdiv(k, block_k),)
        torch.library.wrap_triton(_cast_dual_kernel)[grid](
            x, scale, row, col, m, k,
            FMAX=torch.finfo(float8_dtype).max, MANT=mant, BIAS=bias, SOFT_CAST=soft_cast,
            BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
        )  # fmt: skip
        return row, col

    @torch.library.triton_op("compile_fp8::amax", mutates_args=())
    def _amax_op(x: torch.Tensor) -> torch.Tensor:
        return _launch_amax(x, **AMAX_CONFIG)

    @torch.library.triton_op("compile_fp8::cast_dual", mutates_args=())
    def _cast_dual_op(
        x: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype not in CAST_KERNEL_DTYPES:  # float32: see CAST_KERNEL_DTYPES
            return cast_dual_reference(x, scale, float8_dtype)
        return _launch_cast_dual(x, scale, float8_dtype, interpreting(), **CAST_CONFIG)

    # triton_op uses the function itself as the fake kernel (the kernel launch is a no-op on
    # fake tensors); these say the output shapes and layouts without tracing it.
    @_amax_op.register_fake
    def _(x):
        return x.new_empty((), dtype=torch.float32)

    @_cast_dual_op.register_fake
    def _(x, scale, float8_dtype):
        m, k = x.shape
        row = x.new_empty((m, k), dtype=float8_dtype)
        return row, x.new_empty_strided((m, k), (1, m), dtype=float8_dtype)
