"""GEMM: the one place that calls `torch._scaled_mm`.

`torch._scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum)` computes::

    out = (a * scale_a) @ (b * scale_b)       # [M, K] @ [K, N] -> [M, N], float32 accumulate

where `a`, `b` are float8 and `scale_a`, `scale_b` are float32 *inverse* scales (see
`scaling.py`, [Note] Scale direction): a scalar each (tensorwise), or [M, 1] and [1, N] (rowwise).

# [Note] _scaled_mm layout rules
cuBLASLt's FP8 kernels take A row-major and B column-major (B^T contiguous), and on CUDA the
contracted dim K and N must be multiples of 16. A CPU `_scaled_mm` accepts any layout, so CPU
tests cannot catch a wrong one: `scaled_mm` below always fixes the layout itself (a copy only
when the stride is wrong; under torch.compile inductor writes the cast directly in the needed
layout), and zero-pads K when it is not aligned (zeros add nothing to the dot products). Both
float8 formats encode +0.0 as the byte 0x00, so padding is done on a uint8 view.

Emulation (GPUs without FP8 tensor cores, or on request) multiplies the float8 values by the
inverse scales and runs a float32 matmul. The float8 operands and scales are the same bits as on
the real path; only the float32 accumulation order differs, so results agree to the last bits
(often exactly, not always: torch's CPU `_scaled_mm` sums in its own order). Emulation is the
default everywhere but on FP8 GPUs (CUDA sm89+): torch's CPU `_scaled_mm` is a reference kernel
whose speed depends on the CPU and the build (far slower than a float32 matmul on some machines),
while emulation runs ordinary float32 GEMMs. `Float8Config(emulate=False)` on CPU still runs it,
with a warning: that is what makes CPU results bitwise equal to torchao's.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
import torch.nn.functional as F

logger = logging.getLogger("compile_fp8")

ALIGN = 16


def _is_scalar(scale: torch.Tensor) -> bool:
    return scale.numel() == 1 and scale.dim() <= 1


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _col_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.t().is_contiguous() else x.t().contiguous().t()


def _pad_last_dim(x_fp8: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x_fp8.shape[-1] % multiple
    return F.pad(x_fp8.view(torch.uint8), (0, pad)).view(x_fp8.dtype)


def _pad_inner_dim(a_fp8, b_fp8):
    """Zero-pad the contracted dim K of [M, K] @ [K, N] up to a multiple of 16."""
    a_fp8 = _pad_last_dim(a_fp8, ALIGN)  # [M, K] -> [M, K_pad], row-major
    b_fp8 = _pad_last_dim(b_fp8.t(), ALIGN).t()  # [K, N] -> [K_pad, N], column-major
    return a_fp8, b_fp8


def _mm_emulated(a_fp8, b_fp8, a_inv_scale, b_inv_scale, out_dtype, bias=None):
    # [M, K] @ [K, N] -> [M, N] in float32, then the scales (and bias) on the accumulator, as
    # cuBLAS does: [M, 1] * [1, N] (or scalars) -> [M, N]
    a_hp = a_fp8.to(torch.float32) * a_inv_scale
    b_hp = b_fp8.to(torch.float32) * b_inv_scale
    out = torch.mm(a_hp, b_hp)
    return (out if bias is None else out + bias.to(torch.float32)).to(out_dtype)


def _mm_fp8(a_fp8, b_fp8, a_inv_scale, b_inv_scale, out_dtype, use_fast_accum, emulate, bias=None):
    if emulate:
        return _mm_emulated(a_fp8, b_fp8, a_inv_scale, b_inv_scale, out_dtype, bias)
    a_fp8, b_fp8 = _row_major(a_fp8), _col_major(b_fp8)
    if a_fp8.device.type != "cpu" and a_fp8.shape[1] % ALIGN:
        a_fp8, b_fp8 = _pad_inner_dim(a_fp8, b_fp8)
    return torch._scaled_mm(
        a_fp8,
        b_fp8,
        scale_a=a_inv_scale,
        scale_b=b_inv_scale,
        bias=bias,
        out_dtype=out_dtype,
        use_fast_accum=use_fast_accum,
    )


def scaled_mm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    use_fast_accum: bool = False,
    emulate: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, K] @ [K, N] (+ bias [N]) -> [M, N] in `out_dtype`, from float8 operands and their
    (forward) scales.

    Scales are scalars (tensorwise) or [M, 1] / [1, N] (rowwise); one of each kind is allowed
    (the scalar is broadcast). Rowwise choices follow torchao so the bits match it. `bias` is
    added on the float32 accumulator in the GEMM's epilogue (one rounding, as torchao's float8
    inference does) where the kernel writes `out_dtype` directly, and after the GEMM otherwise.
    """
    a_inv_scale, b_inv_scale = a_scale.reciprocal(), b_scale.reciprocal()
    rowwise = not (_is_scalar(a_scale) and _is_scalar(b_scale))
    if rowwise:
        # _scaled_mm takes one granularity for both operands: broadcast the scalar one.
        a_inv_scale = a_inv_scale.reshape(-1, 1).expand(a_fp8.shape[0], 1).contiguous()
        b_inv_scale = b_inv_scale.reshape(1, -1).expand(1, b_fp8.shape[1]).contiguous()
    post_inv_scale = None
    if rowwise and not use_fast_accum:
        # The rowwise kernel is slow without fast accumulation: run the tensorwise kernel with
        # unit scales and apply the [M, 1] x [1, N] scales to the output (inductor fuses it).
        post_inv_scale = a_inv_scale * b_inv_scale
        a_inv_scale = b_inv_scale = a_inv_scale.new_ones(())
    # The rowwise kernel writes bf16 only: compute in bf16, then upcast.
    mm_dtype = torch.bfloat16 if rowwise and out_dtype != torch.bfloat16 else out_dtype
    # _scaled_mm takes a bias only for a bf16/fp16 output of the kernel's own scales
    in_epilogue = bias is not None and post_inv_scale is None and mm_dtype == out_dtype != torch.float32
    out = _mm_fp8(a_fp8, b_fp8, a_inv_scale, b_inv_scale, mm_dtype, use_fast_accum, emulate,
                  bias.to(out_dtype) if in_epilogue else None)  # fmt: skip
    if post_inv_scale is not None:
        out = (out * post_inv_scale).to(mm_dtype)
    out = out.to(out_dtype)
    return out + bias.to(out_dtype) if bias is not None and not in_epilogue else out


@functools.lru_cache(maxsize=None)
def scaled_mm_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs on `device` with tensorwise and rowwise scales.

    Tried once per device on real 16 x 16 tensors (outside any fake-tensor tracing), then cached.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        a = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
        row_scale = torch.ones(16, 1, device=device)
        try:
            for scale_a, scale_b in ((row_scale[0, 0], row_scale[0, 0]), (row_scale, row_scale.t())):
                torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        except (RuntimeError, NotImplementedError) as err:
            logger.debug("torch._scaled_mm unavailable on %s: %s", device, err)
            return False
    return True


_LOGGED_PATHS: set = set()


def choose_emulate(device: torch.device, requested: bool | None) -> bool:
    """Resolve `Float8Config.emulate` for `device`, logging each (device, path) choice once.

    None: `_scaled_mm` only on a CUDA device where it runs (sm89+), emulation elsewhere."""
    device = torch.device(device)
    if device.type == "meta":
        return bool(requested)
    if requested is None:
        emulate = device.type != "cuda" or not scaled_mm_supported(device)
    else:
        emulate = requested
    if requested is False and device.type == "cpu":
        warnings.warn(
            "compile_fp8: Float8Config(emulate=False) on CPU runs torch's CPU _scaled_mm, a slow "
            "reference kernel on many CPUs; leave emulate at its default (emulation on CPU: the same "
            "casts and scales, float32 GEMMs) unless you need _scaled_mm's exact bits (e.g. to compare "
            "with torchao)",
            UserWarning,
            stacklevel=2,
        )
    key = (device.type, emulate, requested is None)
    if key not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(key)
        _log_path(device, emulate, requested)
    return emulate


def _log_path(device, emulate, requested):
    if not emulate:
        logger.info("compile_fp8: FP8 GEMMs run on torch._scaled_mm on %s", device.type)
    elif requested or device.type != "cuda":
        logger.info("compile_fp8: FP8 numerics emulated on %s (same casts and scales, float32 GEMMs)", device.type)
    else:
        logger.warning(
            "compile_fp8: torch._scaled_mm does not run on %s (FP8 needs a CUDA GPU of compute "
            "capability 8.9+); emulating FP8 numerics in float32, which is correct but slower than bf16",
            device,
        )
