"""The forward of a layer converted for inference: a frozen float8 weight, activations cast per call.

A plain nn.Linear becomes a `Float8InferenceLinear` (a class forward: torch.compile guards a
class's method more cheaply than a per-instance one, which matters when a decode step's host
time is the bottleneck); Conv1D and nn.Linear subclasses keep their class and get an instance
`forward`. Either runs::

    M > weight_only_max_m (prefill):       the `_scaled_mm` path
        input_fp8  = saturate(input * input_scale).to(e4m3)    # [M, K], scale [] or [M, 1]
        output     = input_fp8 @ weight_fp8.T                   # [M, K] @ [K, N] -> [M, N]
                     (gemm.scaled_mm: row-major A, column-major B, fast accumulation)
    M <= weight_only_max_m (decode), weight-only (kernels/small_m_gemm.py):
        output     = input @ (weight_fp8 / weight_scale).T      # dequantized in registers
    M <= weight_only_max_m, float8 x (the same kernel, `fp8_small_mm`):
        input_fp8  = saturate(input * input_scale).to(e4m3)    # fused into x's producer
        output     = input_fp8 @ weight_fp8.T                   # float8 MMAs, both scales after
    both add the bias on the float32 accumulator, before the one rounding (as torchao does)

`Float8Config.small_m_activation` picks the small-M flavour: "auto" casts x to float8 where the
layer has a calibrated static input scale (the cast is then one multiply, fused into the kernel
that produces x) and keeps x in high precision otherwise (a dynamic cast's amax pass would cost
what the float8 MMAs save); "hp" / "fp8" force one.

Gradients: the weights are frozen (a weight set to require grad is an error at the next
forward). Backward still reaches the layer's input and bias, straight through the activation
cast, with the dequantized weight: `grad_input = grad_out @ dequant(weight)`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import E4M3
from ..gemm import scaled_mm
from ..kernels import small_m_gemm
from ..kernels.triton_support import triton_available
from ..layers import apply_autocast, layer_state, record_amax
from ..scaling import saturated_cast
from .scales import inference_scale
from .state import DERIVED, INPUT_AMAX, INPUT_SCALE, WEIGHT_SCALE, InferenceSpec, InferenceState

SCALE_BUFFERS = (WEIGHT_SCALE, INPUT_SCALE, *DERIVED.values())  # float32 whatever the model's dtype


def linear_forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward of a converted layer: weight [N, K] float8."""
    return _fp8_linear(module, input, _frozen_weight(module))


def conv1d_forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """transformers Conv1D.forward of a converted layer: weight [K, N], the transpose of a
    row-major [N, K] (`scales.quantize_weight`)."""
    return _fp8_linear(module, input, _frozen_weight(module).t())


def apply_keeping_fp8(module: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """`nn.Module._apply` (behind `.to()`, `.cuda()`, `.bfloat16()`, ...) for a converted layer:
    the float8 weight and the float32 scales move to the new device but keep their dtypes (a
    plain `_apply` would cast every floating-point tensor, float8 included, to the new dtype)."""
    kept = {name: t for name, t in module.named_buffers(recurse=False) if name in SCALE_BUFFERS}
    kept["weight"] = module.weight.detach()  # _apply swaps the Parameter's data in place
    nn.Module._apply(module, fn, recurse)
    device = module.weight.device
    for name, tensor in kept.items():
        if name == "weight":  # the same Parameter object: ties stay ties
            module.weight.data = tensor.to(device)
        else:
            module._buffers[name] = tensor.to(device)
    return module


class Float8InferenceLinear(nn.Linear):
    """The class of a converted plain `nn.Linear` (importable by name: deepcopy and pickling
    keep it)."""

    CONVERTED_FORWARD = True
    forward = linear_forward
    _apply = apply_keeping_fp8


def _frozen_weight(module) -> torch.Tensor:
    weight = module.weight
    if weight.dtype != E4M3:
        raise RuntimeError(
            f"compile_fp8: {module!r} was converted for FP8 inference, then its weight was replaced "
            f"by a {weight.dtype} tensor; convert the model once its weights are in place"
        )
    if weight.requires_grad:
        raise RuntimeError(
            f"compile_fp8: the FP8 inference weight of {module!r} requires grad, but inference "
            "weights are frozen float8 data (gradients reach the input, never the weight). "
            "Train with Float8Config(mode='training'), or call weight.requires_grad_(False)"
        )
    return weight


def _fp8_linear(module, input, weight_fp8):
    """weight_fp8 [N, K] (row-major, or the transpose of a Conv1D's [K, N])."""
    state: InferenceState = layer_state(module)
    if state.calibrating:
        return _calibrating_forward(module, input, weight_fp8)
    input = apply_autocast(input)
    input_scale = getattr(module, DERIVED[INPUT_SCALE]) if state.ready else None  # None: dynamic
    weight_scale = getattr(module, DERIVED[WEIGHT_SCALE])  # [] or [N, 1]
    x = input.reshape(-1, input.shape[-1])  # [*, K] -> [M, K]
    out = _InferenceLinearFn.apply(x, weight_fp8, weight_scale, module.bias, input_scale, state.spec)
    return out.reshape(*input.shape[:-1], out.shape[-1])  # [M, N] -> [*, N]


def fp8_linear_2d(x, weight_fp8, weight_scale, bias, input_scale, spec: InferenceSpec) -> torch.Tensor:
    """[M, K] @ [K, N] + bias -> [M, N] in x's dtype, by the path M chooses (module docstring).
    `weight_scale`, `input_scale`: quantization scales (hp -> fp8); `input_scale` None: dynamic."""
    small_m = x.shape[0] <= spec.weight_only_max_m
    if small_m and not (_float8_x_at_small_m(input_scale, spec) and triton_available(x.device)):
        return small_m_gemm.weight_only_linear(x, weight_fp8, weight_scale, bias)  # bias in its epilogue
    if input_scale is None:
        input_scale = inference_scale(x, spec.granularity)  # [] or [M, 1]
    x_fp8 = saturated_cast(x, input_scale, E4M3)
    if small_m:  # our kernel, float8 x float8
        return small_m_gemm.fp8_small_m_linear(x_fp8, input_scale, weight_fp8, weight_scale, bias, x.dtype)
    # weight [N, K] row-major -> B = weight.T [K, N], column-major: no copy; scale [N, 1] -> [1, N]
    # bias on the float32 accumulator in the GEMM's epilogue (one rounding), as torchao does
    return scaled_mm(
        x_fp8, input_scale, weight_fp8.t(), weight_scale.t(), x.dtype,
        use_fast_accum=True, emulate=spec.emulate, bias=bias,
    )  # fmt: skip


def _float8_x_at_small_m(input_scale: Optional[torch.Tensor], spec: InferenceSpec) -> bool:
    """Small M: cast x to float8 (else weight-only)? "auto": where the scale is static."""
    choice = spec.small_m_activation
    return choice == "fp8" or (choice == "auto" and input_scale is not None)


class _InferenceLinearFn(torch.autograd.Function):
    """The FP8 output GEMM plus bias; backward: straight through the activation cast."""

    @staticmethod
    def forward(ctx, x, weight_fp8, weight_scale, bias, input_scale, spec):
        ctx.save_for_backward(weight_fp8, weight_scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return fp8_linear_2d(x, weight_fp8, weight_scale, bias, input_scale, spec)

    @staticmethod
    def backward(ctx, grad_out):
        weight_fp8, weight_scale = ctx.saved_tensors
        weight_hp = (weight_fp8.to(torch.float32) / weight_scale).to(grad_out.dtype)  # [N, K]
        grad_input = grad_out @ weight_hp  # [M, N] @ [N, K] -> [M, K]
        grad_bias = None if ctx.bias_dtype is None else grad_out.sum(0).to(ctx.bias_dtype)
        return grad_input, None, None, grad_bias, None, None


def _calibrating_forward(module, input, weight_fp8):
    """`calibrate`: high precision (the dequantized weight), recording the running max |input|."""
    record_amax(getattr(module, INPUT_AMAX), input)
    weight_hp = (weight_fp8.to(torch.float32) / getattr(module, DERIVED[WEIGHT_SCALE])).to(input.dtype)
    return F.linear(input, weight_hp, module.bias)
