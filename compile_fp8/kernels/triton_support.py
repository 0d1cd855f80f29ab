"""What the Triton kernels share: whether they can run, how inductor launches them, and the
float8 cast written in Triton.

The kernels (`cast.py`: amax and the dual-layout cast for training; `small_m_gemm.py`: the
small-M GEMM for inference) are `torch.library.triton_op`s: eager calls launch the kernel, and
under torch.compile inductor sees the kernel itself and schedules it with the graph. They run
on CUDA sm89+ GPUs with triton importable, and on CPU under Triton's interpreter
(TRITON_INTERPRET=1, for the tests); everywhere else the callers run plain torch code with the
same results.

# [Note] float8 cast numerics
The values are bit-identical to `scaling.saturated_cast`: upcast to float32, multiply by the
float32 scale (one rounding), clamp to +-finfo(float8).max, cast round-to-nearest-even. On the
GPU the cast is the hardware's `cvt.rn.satfinite` (sm89+). Triton's CPU interpreter rounds
float8 ties away from zero and drops mantissa carries, so under TRITON_INTERPRET=1 the kernels
cast in software instead (`fp8_bits`: c10's algorithm, integer round-half-even for normals, the
float-add trick for subnormals). NaN stays NaN (the clamp propagates it: e4m3fn 0x7f, e5m2 0x7f,
sign kept in software, the hardware may drop it); +-inf saturates to +-max like the torch cast.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CI installs no triton: the torch fallbacks run everywhere
    triton = tl = None

# float8 dtype -> (mantissa bits, exponent bias); the kernels take these as constexprs.
FP8_FORMATS = {torch.float8_e4m3fn: (3, 7), torch.float8_e5m2: (2, 15)}


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
    default in torch 2.11-2.13); with many small launches (a decode step) the Python launcher's
    cost shows (docs/benchmarks.md). Called when a conversion puts our kernels in the model; the
    environment variable TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=0
    overrides it (inductor's `env_name_force`). A kernel the static launcher cannot take falls
    back to Triton's launcher.
    """
    config = torch._inductor.config
    if hasattr(config, "static_launch_user_defined_triton_kernels"):
        config.static_launch_user_defined_triton_kernels = True


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (4 under the interpreter: a few programs)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


if triton is not None:

    @triton.jit
    def fp8_bits(v, MANT: tl.constexpr, BIAS: tl.constexpr):
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
    def to_fp8(x, scale, FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr,
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
            return fp8_bits(scaled, MANT, BIAS).to(tl.uint8).to(FP8, bitcast=True)
        return scaled.to(FP8)  # round to nearest even (cvt.rn.satfinite on sm89+)
