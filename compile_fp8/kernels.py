"""Triton kernels for the memory-bound steps of a tensorwise cast: amax, and the dual-layout cast.

Every FP8 linear casts two big tensors per step: the input in forward and grad_output in
backward. Each cast is two passes over the high-precision tensor::

    amax      = max |x|                                   # read x once
    x_fp8     = clamp(x.float() * scale, -fmax, fmax).to(float8)     # [M, K] row-major
    x_fp8_col = the same values, column-major (the storage of x_fp8.t(): [K, M] contiguous)

Both layouts are needed: `_scaled_mm` takes A row-major and B column-major (`gemm.py`, [Note]
_scaled_mm layout rules), and each of these tensors is the A of one GEMM and the B of another.

Why hand-written kernels: on an H200 (torch 2.11, triton 3.6; a device copy moves ~4.3 TB/s,
read + write) inductor's kernels for M=16384, K=8192, bf16 (256 MB) run far from bandwidth:

    amax        read 256 MB                     0.180 ms   ~1.4 TB/s
    dual cast   read 256 MB, write 2 x 128 MB   0.238 ms   ~2.1 TB/s

The kernels below, same GPU and shape (scripts/bench_kernels.py, CUDA-graph timing; inductor's
code timed the same way in brackets): amax 0.064 ms, ~4.2 TB/s (0.178 ms); dual cast 0.138 ms,
~3.9 TB/s (0.198 ms); the whole dynamic cast compiled, amax -> scale -> dual cast, 0.205 ms
(0.372 ms). A copy of x runs at ~4.2 TB/s.

`amax` below is a grid-stride reduction: each program keeps an elementwise running max over
many blocks (one wide load per block), reduces it once, and does one `atomic_max`. |x| >= 0, and
non-negative floats order like their int32 bit patterns, so the whole reduction runs on the bits:
integer max is exact, and NaN (bits above inf's 0x7f800000) propagates without special cases.

`cast_dual` loads one 2-D tile of x, scales, clamps and casts it once, and stores it twice: as is
into the row-major output and transposed (`tl.trans`, through shared memory) into the
column-major one, so both stores are coalesced.

# [Note] float8 cast numerics
The values are bit-identical to `scaling.saturated_cast`: upcast to float32, multiply by the
float32 scale (one rounding), clamp to +-finfo(float8).max, cast round-to-nearest-even. On the GPU
the cast is the hardware's `cvt.rn.satfinite` (sm89+). Triton's CPU interpreter rounds float8
ties away from zero and drops mantissa carries, so under TRITON_INTERPRET=1 the kernel casts in
software instead (`_fp8_bits`: c10's algorithm, integer round-half-even for normals, the
float-add trick for subnormals). NaN stays NaN (the clamp propagates it: e4m3fn 0x7f, e5m2 0x7f,
sign kept in software, the hardware may drop it); +-inf saturates to +-max like the torch cast.
float32 inputs are cast by the torch code even on the GPU (`CAST_KERNEL_DTYPES` says why).

Each op is a `torch.library.triton_op`: eager calls launch the kernel, and under torch.compile
inductor sees the kernel itself and schedules it with the graph (fullgraph works). The public
`amax` / `cast_dual` dispatch to the ops on CUDA (sm89+, triton importable) and to plain torch
code with identical results elsewhere. The torch fallbacks are
`scaling.py`'s own functions; `autograd.py` uses these entry points when
`Float8Config(cast_kernels="triton")`.
"""

from __future__ import annotations

import os

import torch

from .scaling import amax as tensor_amax
from .scaling import saturated_cast

try:
    import triton
    import triton.language as tl
except ImportError:  # CI installs no triton: the torch fallbacks run everywhere
    triton = None

# float8 dtype -> (mantissa bits, exponent bias); the kernels take these as constexprs.
FP8_FORMATS = {torch.float8_e4m3fn: (3, 7), torch.float8_e5m2: (2, 15)}
HP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# float32 x: on the H200 (triton 3.6) the kernel's column-major output came out wrong whenever
# K % 16 == 0 (the row-major one was right; the interpreter is right), so float32 inputs take
# the torch code (inside the op: compiled, inductor fuses it as before).
CAST_KERNEL_DTYPES = (torch.bfloat16, torch.float16)

# Tuning (H200, see scripts/bench_kernels.py --sweep): elements per load for amax, programs per
# SM, and the cast tile [BLOCK_M, BLOCK_K] of x with its warps.
AMAX_CONFIG = {"block": 8192, "programs_per_sm": 4, "num_warps": 8}
CAST_CONFIG = {"block_m": 64, "block_k": 64, "num_warps": 4}


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels run on `device`: a CUDA (not ROCm) sm89+ GPU, triton importable.

    sm89 is where the float8 conversion instructions start. Compiles: dynamo folds
    `get_device_properties`, so the answer is a constant of the graph.
    """
    device = torch.device(device)
    if triton is None or device.type != "cuda" or torch.version.hip is not None:
        return False
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor) >= (8, 9)


def launch_statically() -> None:
    """Have inductor launch our `triton_op` kernels through its static CUDA launcher.

    Inductor launches the kernels it generates through a static launcher (a few microseconds a
    launch) but user-defined Triton kernels, ours included, through Triton's Python launcher,
    unless `torch._inductor.config.static_launch_user_defined_triton_kernels` is set (off by
    default in torch 2.11-2.13). Measured on the H200 (docs/benchmarks.md): a 16 x 1 decode of the
    956M model in compile mode "default", 80 weight-only launches, took 4.02 ms with the Python
    launcher and 3.03 ms with the static one (two processes; that mode is launch-bound and
    noisy). Called when a conversion puts our kernels in the
    model; the environment variable TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=0
    overrides it (inductor's `env_name_force`). A kernel the static launcher cannot take falls
    back to Triton's launcher.
    """
    config = torch._inductor.config
    if hasattr(config, "static_launch_user_defined_triton_kernels"):
        config.static_launch_user_defined_triton_kernels = True


def _interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    def _fp8_bits(v, MANT: tl.constexpr, BIAS: tl.constexpr):
        """float32 (|v| <= float8 max, or NaN) -> float8 bits (int32 in 0..255), c10's rounding."""
        SHIFT: tl.constexpr = 23 - MANT
        MAGIC: tl.constexpr = 24 - BIAS - MANT  # float32 ulp of 2**MAGIC: float8's subnormal step
        bits = v.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        # normal: round the 23-bit mantissa to MANT bits, half to even (a carry bumps the
        # exponent, as it should), then move the exponent from float32's bias to float8's.
        odd = (mag >> SHIFT) & 1
        normal = ((mag + ((1 << (SHIFT - 1)) - 1) + odd) >> SHIFT) - ((127 - BIAS) << MANT)
        # subnormal: a float32 add rounds |v| to a multiple of the subnormal step (half to even);
        # the low bits of the sum count the steps.
        subnormal = (mag.to(tl.float32, bitcast=True) + 2.0**MAGIC).to(tl.int32, bitcast=True)
        subnormal -= (127 + MAGIC) << 23
        out = tl.where(mag < ((128 - BIAS) << 23), subnormal, normal)
        out = tl.where(mag > 0x7F800000, 0x7F, out)  # NaN
        return out | sign

    @triton.jit
    def _to_fp8(x, scale, FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr,
                SOFT_CAST: tl.constexpr):  # fmt: skip
        """saturate(x.float() * scale) -> float8: `scaling.saturated_cast` for one tile."""
        scaled = x.to(tl.float32) * scale
        # PropagateNan.ALL: the GPU's plain min/max would turn NaN into +-max.
        scaled = tl.clamp(scaled, -FMAX, FMAX, propagate_nan=tl.PropagateNan.ALL)
        if MANT == 3:
            FP8: tl.constexpr = tl.float8e4nv
        else:
            FP8: tl.constexpr = tl.float8e5
        if SOFT_CAST:  # see [Note] float8 cast numerics
            return _fp8_bits(scaled, MANT, BIAS).to(tl.uint8).to(FP8, bitcast=True)
        return scaled.to(FP8)  # round to nearest even (cvt.rn.satfinite on sm89+)

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
        x_fp8 = _to_fp8(x, scale, FMAX, MANT, BIAS, SOFT_CAST)  # [BLOCK_M, BLOCK_K]
        tl.store(row_ptr + offs_m[:, None] * K + offs_k[None, :], x_fp8, mask=mask)
        # col [K, M] contiguous: the transposed tile, stored along M (coalesced)
        col_offs = offs_k[:, None] * M + offs_m[None, :]  # [BLOCK_K, BLOCK_M]
        tl.store(col_ptr + col_offs, tl.trans(x_fp8), mask=tl.trans(mask))

    def _sm_count(device: torch.device) -> int:
        if device.type != "cuda":
            return 4  # the interpreter: a few programs, each over several blocks
        return torch.cuda.get_device_properties(device).multi_processor_count

    def _launch_amax(x: torch.Tensor, block: int, programs_per_sm: int, num_warps: int):
        x = x.contiguous()
        out = torch.zeros((), dtype=torch.float32, device=x.device)
        n = x.numel()
        blocks = triton.cdiv(n, block)
        programs = max(1, min(blocks, programs_per_sm * _sm_count(x.device)))
        kernel = _amax_kernel_interpreted if _interpreting() else _amax_kernel
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
        return _launch_cast_dual(x, scale, float8_dtype, _interpreting(), **CAST_CONFIG)

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
