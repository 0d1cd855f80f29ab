"""Inference scales and weight quantization.

# [Note] Inference scales
The inference scales follow torchao's float8 inference (`Float8DynamicActivationFloat8-
WeightConfig`) and FP8 serving checkpoints, so a user switching between them gets the same
numbers. The stored truth is the *dequantization* scale, `inv_scale = amax / finfo.max`,
computed in the tensor's own dtype (a bf16 amax gives a bf16-rounded quotient), then float32:

    weight ~= weight_fp8.float() * weight_inv_scale          # what a checkpoint's weight_scale means

The quantization scale (hp -> fp8, the package's direction, `scaling.py` [Note] Scale direction)
is derived from it, `scale = float32(1 / float64(inv_scale))`: a pure function of the stored
value, so a checkpoint round trip gives the same bits (storing the float32 reciprocal of
`scale` instead would not: about one value in six would change). Training scales
(`scaling.py`) divide `finfo.max / amax` in float64 instead, as torchao's training does.
"""

from __future__ import annotations

import torch

from ..config import E4M3
from ..scaling import EPS, amax, saturated_cast


def inverse_scale(hp: torch.Tensor, granularity: str) -> torch.Tensor:
    """float32 dequantization scale of `hp`: [] (tensorwise) or one per row, [..., 1] (rowwise)."""
    return amax_to_inverse_scale(amax(hp, -1 if granularity == "rowwise" else None))


def amax_to_inverse_scale(amax_hp: torch.Tensor) -> torch.Tensor:
    """`amax / finfo.max`, the quotient rounded to amax's dtype (torchao's), as float32."""
    fmax = torch.finfo(E4M3).max
    inv_scale = _round_like_eager(amax_hp.to(torch.float32) / fmax, amax_hp.dtype)
    return inv_scale.clamp(min=EPS / fmax)  # an all-zero tensor: a finite scale


def scale_of_inverse(inv_scale: torch.Tensor) -> torch.Tensor:
    """The quantization scale of a stored dequantization scale: the reciprocal in float64, so
    eager and inductor round it alike."""
    return (1.0 / inv_scale.to(torch.float64)).to(torch.float32)


def inference_scale(hp: torch.Tensor, granularity: str) -> torch.Tensor:
    """float32 hp -> fp8 scale of `hp` (dynamic activations): [] or [..., 1]."""
    return scale_of_inverse(inverse_scale(hp, granularity))


def _round_like_eager(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `x` rounded to `dtype` (eager's `bf16 / float` result), as float32.

    Inductor computes bf16 arithmetic in float32 and may drop a `.to(bf16).to(float32)` round
    trip, so bf16 is rounded on the bits (to nearest, ties to even: what the cast does); then
    eager == compile. Other dtypes use the casts (float16: inductor may keep float32 there).
    """
    if dtype == torch.float32:
        return x
    if dtype != torch.bfloat16:
        return x.to(dtype).to(torch.float32)
    bits = x.view(torch.int32)  # positive finite values: bf16 keeps the top 16 bits
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -0x10000
    return bits.view(torch.float32)


@torch.no_grad()
def quantize_weight(hp: torch.Tensor, granularity: str, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 weight, float32 dequantization scale) of `hp` [N, K]: the scale [] or
    [N, 1] (one per output channel). `transposed`: `hp` is a Conv1D's [K, N]; the float8 weight
    comes back [K, N] too, as the transpose of a row-major [N, K] (what `_scaled_mm` reads
    without a copy), and the scale is still [] or [N, 1]."""
    if transposed:
        weight_fp8, inv_scale = quantize_weight(hp.t(), granularity)
        return weight_fp8.t(), inv_scale
    inv_scale = inverse_scale(hp, granularity)
    return saturated_cast(hp, scale_of_inverse(inv_scale), E4M3), inv_scale
