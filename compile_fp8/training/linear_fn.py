"""The FP8 linear as one autograd function: three GEMMs, each with its own casts.

For `output = input @ weight.T` (input [*, K] flattened to [M, K], weight [N, K]):

    forward      output      = input    @ weight.T   # [M, K] @ [K, N] -> [M, N]
    backward     grad_input  = grad_out @ weight     # [M, N] @ [N, K] -> [M, K]
                 grad_weight = grad_out.T @ input    # [N, M] @ [M, K] -> [N, K]

Each operand is cast as the recipe (`config.RecipeSpec`) says for that GEMM: activations and
weights in e4m3 (more mantissa), gradients in e5m2 (more range) for tensorwise. A rowwise scale
always runs along the contracted dim, so the same tensor gets different scales in different
GEMMs (input: per token in the output GEMM, per feature in grad_weight's).

What backward keeps of input and weight: where an operand's backward cast is its forward cast
(tensorwise: the same float8 dtype and the scale computed in forward), the float8 copy the
forward GEMM used, and backward only re-lays it out for its GEMM (a transposed copy of one byte
per element, where torchao re-reads the two-byte high-precision tensor and casts it again: the
same bits, half the saved memory). Where the casts differ (rowwise scales run along another dim
in each GEMM) the high-precision tensor, re-cast in backward. Under torch.compile, AOTAutograd's
partitioner has the last word on what is kept: where the high-precision tensor is kept anyway
(a norm's input, attention's output, SwiGLU's gate and up) it may re-cast from that instead of
keeping the float8 copy (traced on CPU with `_scaled_mm`, the compiled step of the repository's
LM keeps the same tensors as torchao's); `SAVE_FLOAT8_INPUTS` makes it keep a statically scaled
input's float8 copy instead (more memory, less backward work; docs/benchmarks.md). With
`Float8Config(cast_kernels="triton")` both layouts are written by one kernel in forward
(`_dual_cast_*`, with the kernels of `kernels/cast.py`).
`gemm.scaled_mm` puts each operand in the layout `_scaled_mm` needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import CastSpec, GemmSpec, RecipeSpec, same_tensorwise_cast
from ..gemm import scaled_mm
from ..kernels import cast as cast_kernels
from ..layers import apply_autocast
from ..scaling import (
    amax,
    amax_to_scale,
    cast_to_fp8,
    delayed_scale,
    push_amax,
    saturated_cast,
    saved_not_recomputed,
    stored_amax_to_scale,
)

# Where the forward cast a linear's input with a known scale (static scaling), keep that float8
# copy for the weight-gradient GEMM (True) or let the partitioner choose (False: it usually
# re-casts in backward from a high-precision tensor kept anyway, e.g. a norm's input, and so
# saves the float8 copy's memory). Read while tracing: a compile cache keyed without it may
# serve a graph traced under the other setting.
SAVE_FLOAT8_INPUTS = False


@dataclass(frozen=True)
class GradScaling:
    """Where grad_output's scale comes from in backward (constant metadata of the function).

    dynamic: this step's amax. static: `grad_amax` (a calibrated scalar). delayed: `grad_amax` is
    an amax history; the scale comes from it (`seeded`: from it alone; otherwise from this
    step's amax while it is empty), then this step's amax is pushed.
    """

    kind: str = "dynamic"
    amax_from: str = "max"
    margin: float = 1.0
    seeded: bool = False


DYNAMIC_GRADS = GradScaling()


def _gemm(a_hp, b_hp, spec: GemmSpec, pow2: bool, emulate: bool, a_scale, b_scale, out_dtype):
    """[M, K] @ [K, N] -> [M, N] in `out_dtype`, casting A and B as `spec` says (or not at all;
    an operand already in the spec's float8 dtype is taken as cast with its scale).

    `a_scale` / `b_scale`: a fixed (static, delayed or forward-saved) scale; None: dynamic.
    """
    if not spec.a.is_fp8:
        return torch.mm(a_hp, b_hp.to(out_dtype))
    a_fp8, a_scale = _cast(a_hp, spec.a, 1, pow2, a_scale)  # scale [M, 1] or []
    b_fp8, b_scale = _cast(b_hp, spec.b, 0, pow2, b_scale)  # scale [1, N] or []
    return scaled_mm(a_fp8, a_scale, b_fp8, b_scale, out_dtype, spec.use_fast_accum, emulate)


def _cast(hp: torch.Tensor, spec: CastSpec, rowwise_dim: int, pow2: bool, scale=None):
    if hp.dtype == spec.dtype:  # already float8: an FSDP all-gather cast it with `scale`
        return hp, scale
    if scale is None:
        return cast_to_fp8(hp, spec, rowwise_dim, pow2)
    return saturated_cast(hp, scale, spec.dtype), scale


def _cast_once(hp: torch.Tensor, scale, forward: CastSpec, backward: CastSpec) -> torch.Tensor:
    """`hp` cast to float8 with `scale` where its forward and backward casts are the same
    tensorwise cast (`_cast` then passes the float8 copy through in both GEMMs); else `hp`."""
    if scale is None or hp.dtype == forward.dtype or not same_tensorwise_cast(forward, backward):
        return hp
    return saturated_cast(hp, scale, forward.dtype)


def _shared_scale(hp: torch.Tensor, first: CastSpec, second: CastSpec, pow2: bool):
    """One dynamic tensorwise scale for an operand that two GEMMs cast alike (None otherwise).

    The same amax gives the same scale, so computing it once (and saving it for backward)
    changes no bit; it saves re-reading the tensor for a second amax.
    """
    if same_tensorwise_cast(first, second):
        return amax_to_scale(amax(hp), first.dtype, pow2)
    return None


def _grad_out_scale(grad_out, grad_amax, grading: GradScaling, recipe: RecipeSpec):
    """grad_output's scale for this backward (None: dynamic, cast_to_fp8 computes it)."""
    dtype = recipe.grad_input.a.dtype
    if grading.kind == "dynamic":
        return _shared_scale(grad_out, recipe.grad_input.a, recipe.grad_weight.a, recipe.pow2_scales)
    if grading.kind == "static":
        return stored_amax_to_scale(grad_amax, dtype, grading.margin)
    amax_now = amax(grad_out)
    scale = delayed_scale(grad_amax, amax_now, dtype, grading.amax_from, grading.margin, grading.seeded)
    push_amax(grad_amax, amax_now)  # a buffer mutated in backward: supported by AOT autograd
    return scale


class Float8LinearFn(torch.autograd.Function):
    """`input @ weight.T` with FP8 GEMMs in forward and backward (bias is added outside).

    `input_scale` / `weight_scale`: fixed tensorwise scales (static or delayed scaling), saved
    for backward so the re-cast there uses the forward's scale; None: dynamic.
    `weight_fp8`: the weight already cast with `weight_scale` (an FSDP float8 all-gather,
    `fsdp.py`): both weight GEMMs use it as is; `weight_hp` is then only the autograd input
    that receives grad_weight.
    """

    @staticmethod
    def forward(
        ctx, input_hp, weight_hp, recipe: RecipeSpec, emulate: bool,
        input_scale=None, weight_scale=None, grad_amax=None, grading: GradScaling = DYNAMIC_GRADS,
        weight_fp8=None,
    ):  # fmt: skip
        ctx.recipe, ctx.emulate, ctx.grading = recipe, emulate, grading
        ctx.dual_cast = recipe.dual_cast and weight_fp8 is None
        if ctx.dual_cast:
            return _dual_cast_forward(ctx, input_hp, weight_hp, input_scale, weight_scale, grad_amax)
        input_2d = input_hp.reshape(-1, input_hp.shape[-1])
        pow2 = recipe.pow2_scales
        if input_scale is None:  # dynamic: computed here once if backward casts alike
            input_scale = _shared_scale(input_2d, recipe.output.a, recipe.grad_weight.b, pow2)
        weight = weight_hp if weight_fp8 is None else weight_fp8  # [N, K], hp or float8
        if weight_scale is None:
            weight_scale = _shared_scale(weight, recipe.output.b, recipe.grad_input.b, pow2)
        # one cast serves both GEMMs of an operand: cast here, keep the float8 copy for backward
        input_2d = _cast_once(input_2d, input_scale, recipe.output.a, recipe.grad_weight.b)
        if SAVE_FLOAT8_INPUTS and input_2d.dtype == recipe.output.a.dtype:
            input_2d = saved_not_recomputed(input_2d)
        weight = _cast_once(weight, weight_scale, recipe.output.b, recipe.grad_input.b)
        ctx.save_for_backward(input_2d, weight, input_scale, weight_scale, grad_amax)
        ctx.input_shape = input_hp.shape
        # ---- output = input @ weight.T:  [M, K] @ [K, N] -> [M, N]
        output = _gemm(input_2d, weight.t(), recipe.output, pow2, emulate, input_scale, weight_scale,
                       input_hp.dtype)  # fmt: skip
        return output.reshape(*input_hp.shape[:-1], output.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.dual_cast:
            return _dual_cast_backward(ctx, grad_out)
        input_2d, weight, input_scale, weight_scale, grad_amax = ctx.saved_tensors
        recipe, emulate, pow2 = ctx.recipe, ctx.emulate, ctx.recipe.pow2_scales
        grad_out_2d, out_dtype = grad_out.reshape(-1, grad_out.shape[-1]), grad_out.dtype
        go_scale = _grad_out_scale(grad_out_2d, grad_amax, ctx.grading, recipe)
        # one float8 grad_out for both GEMMs where they cast it alike (tensorwise)
        grad_out_2d = _cast_once(grad_out_2d, go_scale, recipe.grad_input.a, recipe.grad_weight.a)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            # ---- grad_input = grad_out @ weight:  [M, N] @ [N, K] -> [M, K]
            grad_input = _gemm(grad_out_2d, weight, recipe.grad_input, pow2, emulate, go_scale,
                               weight_scale, out_dtype)  # fmt: skip
            grad_input = grad_input.reshape(*ctx.input_shape[:-1], grad_input.shape[-1])
        if ctx.needs_input_grad[1]:
            # ---- grad_weight = grad_out.T @ input:  [N, M] @ [M, K] -> [N, K]
            grad_weight = _gemm(grad_out_2d.t(), input_2d, recipe.grad_weight, pow2, emulate,
                                go_scale, input_scale, out_dtype)  # fmt: skip
        return grad_input, grad_weight, None, None, None, None, None, None, None


# ---- the dual-cast path (Float8Config(cast_kernels="triton"), tensorwise) -------------------
#
# Every operand of tensorwise is the A of one GEMM and the B of another, with one scale: cast it
# once into both layouts (kernels.cast_dual) and keep the float8 copies, not high-precision ones,
# for backward. Same bits as the path above (scales from the same amax, same casts).


def _dual_cast(hp_2d, scale, float8_dtype):
    """(row-major fp8, column-major fp8, scale) of `hp_2d`; `scale=None`: dynamic."""
    if scale is None:
        scale = amax_to_scale(cast_kernels.amax(hp_2d), float8_dtype)
    row, col = cast_kernels.cast_dual(hp_2d, scale, float8_dtype)
    return row, col, scale


def _dual_cast_forward(ctx, input_hp, weight_hp, input_scale, weight_scale, grad_amax):
    recipe, e4m3 = ctx.recipe, ctx.recipe.output.a.dtype
    input_fp8, input_fp8_col, input_scale = _dual_cast(
        input_hp.reshape(-1, input_hp.shape[-1]), input_scale, e4m3
    )
    weight_fp8, weight_fp8_col, weight_scale = _dual_cast(_plain(weight_hp), weight_scale, e4m3)
    ctx.save_for_backward(input_fp8_col, weight_fp8_col, input_scale, weight_scale, grad_amax)
    ctx.input_shape = input_hp.shape
    # ---- output = input @ weight.T:  [M, K] @ [K, N] -> [M, N]; weight_fp8.t() is column-major
    output = scaled_mm(input_fp8, input_scale, weight_fp8.t(), weight_scale, input_hp.dtype,
                       recipe.output.use_fast_accum, ctx.emulate)  # fmt: skip
    return output.reshape(*input_hp.shape[:-1], output.shape[-1])


def _dual_cast_backward(ctx, grad_out):
    input_fp8_col, weight_fp8_col, input_scale, weight_scale, grad_amax = ctx.saved_tensors
    recipe, emulate, out_dtype = ctx.recipe, ctx.emulate, grad_out.dtype
    grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
    fixed = None if ctx.grading.kind == "dynamic" else _grad_out_scale(
        grad_out_2d, grad_amax, ctx.grading, recipe)  # fmt: skip
    go_fp8, go_fp8_col, go_scale = _dual_cast(grad_out_2d, fixed, recipe.grad_input.a.dtype)
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0]:
        # ---- grad_input = grad_out @ weight:  [M, N] @ [N, K] -> [M, K]
        grad_input = scaled_mm(go_fp8, go_scale, weight_fp8_col, weight_scale, out_dtype,
                               recipe.grad_input.use_fast_accum, emulate)  # fmt: skip
        grad_input = grad_input.reshape(*ctx.input_shape[:-1], grad_input.shape[-1])
    if ctx.needs_input_grad[1]:
        # ---- grad_weight = grad_out.T @ input:  [N, M] @ [M, K] -> [N, K]; go_fp8_col.t() is row-major
        grad_weight = scaled_mm(go_fp8_col.t(), go_scale, input_fp8_col, input_scale, out_dtype,
                                recipe.grad_weight.use_fast_accum, emulate)  # fmt: skip
    return grad_input, grad_weight, None, None, None, None, None, None, None


def _plain(weight):
    """The master weight as a plain tensor: a training weight's `hp` (its `view` stays wrapped,
    since FSDP2 views a rank's shard and needs it to stay a training weight)."""
    return getattr(weight, "hp", weight)


def float8_linear(
    input_hp, weight, bias, recipe: RecipeSpec, emulate: bool,
    input_scale=None, weight_scale=None, grad_amax=None, grading: GradScaling = DYNAMIC_GRADS,
    weight_fp8=None,
):  # fmt: skip
    """F.linear with FP8 GEMMs; the bias is added afterwards in high precision (as torchao).

    `weight_fp8`: `weight` already cast with `weight_scale` (see `Float8LinearFn`)."""
    input_hp = apply_autocast(input_hp)
    output = Float8LinearFn.apply(
        input_hp, weight, recipe, emulate, input_scale, weight_scale, grad_amax, grading, weight_fp8
    )
    if bias is not None:
        output = output + bias.to(output.dtype)
    return output


def route_linear(cls, func, args, kwargs, run_fp8):
    """`__torch_function__` body of the weight subclasses: `F.linear(input, weight, bias)` with a
    `cls` weight runs `run_fp8(input, weight, bias)`; every other call runs as usual."""
    kwargs = kwargs or {}
    if func is F.linear or func is torch._C._nn.linear:
        input, weight, bias = _linear_args(*args, **kwargs)
        if isinstance(weight, cls) and not isinstance(input, cls):
            with torch._C.DisableTorchFunctionSubclass():
                return run_fp8(input, weight, bias)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _linear_args(input, weight, bias=None):
    return input, weight, bias
