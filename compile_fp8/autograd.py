"""The FP8 linear as one autograd function: three GEMMs, each with its own casts.

For `output = input @ weight.T` (input [*, K] flattened to [M, K], weight [N, K]):

    forward      output      = input    @ weight.T   # [M, K] @ [K, N] -> [M, N]
    backward     grad_input  = grad_out @ weight     # [M, N] @ [N, K] -> [M, K]
                 grad_weight = grad_out.T @ input    # [N, M] @ [M, K] -> [N, K]

Each operand is cast as the recipe (`config.RecipeSpec`) says for that GEMM: activations and
weights in e4m3 (more mantissa), gradients in e5m2 (more range) for tensorwise. A rowwise scale
always runs along the contracted dim, so the same tensor gets different scales in different
GEMMs (input: per token in the output GEMM, per feature in grad_weight's).

The high-precision input and weight are saved for backward and re-cast there, as torchao does;
with dynamic tensorwise scaling the re-cast reproduces the forward's bits exactly.
`gemm.scaled_mm` puts each operand in the layout `_scaled_mm` needs.
"""

from __future__ import annotations

import torch

from .config import CastSpec, GemmSpec, RecipeSpec
from .gemm import scaled_mm
from .scaling import cast_to_fp8


def _gemm(a_hp: torch.Tensor, b_hp: torch.Tensor, spec: GemmSpec, pow2: bool, emulate: bool):
    """[M, K] @ [K, N] -> [M, N], casting A and B as `spec` says (or not at all)."""
    out_dtype = a_hp.dtype
    if not spec.a.is_fp8:
        return torch.mm(a_hp, b_hp.to(out_dtype))
    a_fp8, a_scale = _cast(a_hp, spec.a, rowwise_dim=1, pow2=pow2)  # scale [M, 1] or []
    b_fp8, b_scale = _cast(b_hp, spec.b, rowwise_dim=0, pow2=pow2)  # scale [1, N] or []
    return scaled_mm(a_fp8, a_scale, b_fp8, b_scale, out_dtype, spec.use_fast_accum, emulate)


def _cast(hp: torch.Tensor, spec: CastSpec, rowwise_dim: int, pow2: bool):
    return cast_to_fp8(hp, spec, rowwise_dim, pow2)


class Float8LinearFn(torch.autograd.Function):
    """`input @ weight.T` with FP8 GEMMs in forward and backward (bias is added outside)."""

    @staticmethod
    def forward(ctx, input_hp, weight_hp, recipe: RecipeSpec, emulate: bool):
        ctx.save_for_backward(input_hp, weight_hp)
        ctx.recipe, ctx.emulate = recipe, emulate
        input_2d = input_hp.reshape(-1, input_hp.shape[-1])
        # ---- output = input @ weight.T:  [M, K] @ [K, N] -> [M, N]
        output = _gemm(input_2d, weight_hp.t(), recipe.output, recipe.pow2_scales, emulate)
        return output.reshape(*input_hp.shape[:-1], output.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        input_hp, weight_hp = ctx.saved_tensors
        recipe, emulate, pow2 = ctx.recipe, ctx.emulate, ctx.recipe.pow2_scales
        grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        input_2d = input_hp.reshape(-1, input_hp.shape[-1])
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            # ---- grad_input = grad_out @ weight:  [M, N] @ [N, K] -> [M, K]
            grad_input = _gemm(grad_out_2d, weight_hp, recipe.grad_input, pow2, emulate)
            grad_input = grad_input.reshape(*input_hp.shape[:-1], grad_input.shape[-1])
        if ctx.needs_input_grad[1]:
            # ---- grad_weight = grad_out.T @ input:  [N, M] @ [M, K] -> [N, K]
            grad_weight = _gemm(grad_out_2d.t(), input_2d, recipe.grad_weight, pow2, emulate)
        return grad_input, grad_weight, None, None


def float8_linear(input_hp, weight_hp, bias, recipe: RecipeSpec, emulate: bool):
    """F.linear with FP8 GEMMs; the bias is added afterwards in high precision (as torchao)."""
    output = Float8LinearFn.apply(input_hp, weight_hp, recipe, emulate)
    if bias is not None:
        output = output + bias.to(output.dtype)
    return output
