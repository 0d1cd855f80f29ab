"""Inference conversion: every eligible linear's weight quantized to float8 once, in place.

    convert_for_inference(model, config, module_filter_fn)

Each chosen layer gets a frozen float8 e4m3 weight (1 byte per element instead of bf16's 2, and
no per-step weight cast), its dequantization scale, an input scale if static, and its
`InferenceState` (`state.py` has the buffers; `scales.py` how scales are computed). A plain
`nn.Linear` becomes a `Float8InferenceLinear`; Conv1D and nn.Linear subclasses get an instance
forward (`linear.py`). Recipes map to granularities: "tensorwise" scales weight and activation
with one scale each; "rowwise" (and "rowwise_with_gw_hp", whose output GEMM is the same) each
weight row (output channel) and each activation row (token).

Checkpoints: `state_dict()` holds plain tensors only, in the layout FP8 serving stacks read
(`weight` float8, `weight_scale`, `input_scale`), so `torch.save`, safetensors and
`save_pretrained` work. `load_state_dict` takes such a checkpoint, or a plain high-precision
one, which it quantizes; an input scale missing from the checkpoint leaves the layer
uncalibrated (dynamic), with a warning.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import nn

from ..config import E4M3, Float8Config, recipe_spec
from ..gemm import choose_emulate
from ..kernels.triton_support import launch_statically
from ..layers import (
    FilterFn,
    SkipKind,
    SkipReason,
    converted_layers,
    fill_missing_buffers,
    forward_skip_reason,
    is_conv1d,
    layer_state,
    linears_to_convert,
    overrides_linear_forward,
    set_layer_state,
    shared_skip_reason,
)
from . import passes
from .linear import Float8InferenceLinear, apply_keeping_fp8, conv1d_forward, linear_forward
from .scales import quantize_weight
from .state import INPUT_SCALE, WEIGHT_SCALE, InferenceSpec, InferenceState


def convert_for_inference(model: nn.Module, config: Float8Config, filter_fn: Optional[FilterFn]) -> None:
    granularity = recipe_spec(config.recipe).output.b.granularity
    launch_statically()  # the small-M kernel (decode) is a user-defined Triton kernel
    if not passes.install():
        warnings.warn(
            "compile_fp8: torch._inductor.config.pre_grad_custom_pass is already set, so sibling "
            "small-M linears are not grouped into one launch; the model runs correctly, each "
            "linear in its own launch",
            stacklevel=3,
        )
    layers = linears_to_convert(
        model,
        lambda module, fqn, owners: _skip_reason(module, fqn, owners, filter_fn, config),
        lambda module: _quantized(module, granularity),
    )
    for module, (weight, inv_scale) in layers:
        emulate = choose_emulate(module.weight.device, config.emulate)
        spec = InferenceSpec(granularity, config.scaling, config.weight_only_max_m, emulate,
                             config.amax_margin, config.small_m_activation)  # fmt: skip
        _attach(module, weight, inv_scale, InferenceState(spec=spec, conv1d=is_conv1d(module)))


def _skip_reason(module, fqn, owners, filter_fn, config: Float8Config) -> Optional[SkipReason]:
    if hasattr(module.weight, "_local_tensor"):
        return SkipReason(SkipKind.SHARDED, "weight is a DTensor (FSDP2 / tensor parallel); convert the unsharded model")
    reason = shared_skip_reason(module, fqn, owners, filter_fn) or forward_skip_reason(module, config.scaling)
    if reason is None and overrides_linear_forward(module):
        return SkipReason(
            SkipKind.FORWARD, f"{type(module).__name__} overrides forward; mode='inference' replaces nn.Linear.forward"
        )
    return reason


def _quantized(module: nn.Module, granularity: str) -> tuple[nn.Parameter, torch.Tensor]:
    weight_fp8, inv_scale = quantize_weight(module.weight.detach(), granularity, transposed=is_conv1d(module))
    return nn.Parameter(weight_fp8, requires_grad=False), inv_scale


def _attach(module: nn.Module, weight: nn.Parameter, inv_scale: torch.Tensor, state: InferenceState) -> None:
    module.weight = weight
    module.register_buffer(WEIGHT_SCALE, inv_scale)
    if state.is_static:
        module.register_buffer(INPUT_SCALE, torch.zeros((), dtype=torch.float32, device=weight.device))
    set_layer_state(module, state)
    state.refresh(module)
    if type(module) is nn.Linear:
        module.__class__ = Float8InferenceLinear
    else:  # Conv1D, or a subclass of nn.Linear: its other methods stay
        forward = conv1d_forward if state.conv1d else linear_forward
        module.forward = functools.partial(forward, module)  # deepcopy / pickle keep it bound
        module._apply = functools.partial(apply_keeping_fp8, module)
    module._register_load_state_dict_pre_hook(_load_checkpoint, with_module=True)
    module.register_load_state_dict_post_hook(_after_load)


def check_not_inference_model(model: nn.Module, mode: str) -> None:
    """A model converted for inference cannot be converted again (either mode)."""
    layers = converted_layers(model, InferenceState)
    if layers:
        again = "converted for inference twice" if mode == "inference" else "trained"
        raise ValueError(
            f"model already holds FP8 inference weights ({len(layers)} layers, e.g. {layers[0][0]!r}) "
            f"from compile_fp8(model, Float8Config(mode='inference')); it cannot be {again}: convert "
            "the high-precision (or compile_fp8-trained) model once"
        )


def parameter_bytes(module: nn.Module) -> int:
    """Bytes the parameters of `module` take: a tensor subclass (e.g. torchao's float8 weights)
    counts its inner tensors. Shared parameters count once."""
    seen = {id(p): p for p in module.parameters()}
    return sum(_tensor_bytes(p) for p in seen.values())


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


# ---- checkpoints ----------------------------------------------------------------------------


def _load_checkpoint(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Before nn.Module loads the layer's entries: quantize a high-precision weight, check an
    FP8 one's scale, and fill a missing input scale (uncalibrated)."""
    state: InferenceState = layer_state(module)
    key, scale_key = prefix + "weight", prefix + WEIGHT_SCALE
    value = state_dict.get(key)
    if value is not None and value.dtype != E4M3 and tuple(value.shape) == tuple(module.weight.shape):
        granularity = state.spec.granularity
        state_dict[key], state_dict[scale_key] = quantize_weight(value.to(module.weight.device), granularity,
                                                                 transposed=state.conv1d)  # fmt: skip
    scale = state_dict.get(scale_key)
    if scale is not None and tuple(scale.shape) != tuple(getattr(module, WEIGHT_SCALE).shape):
        del state_dict[scale_key]  # reported here, not again as nn.Module's size mismatch
        state_dict.pop(key, None)
        errors.append(
            f"compile_fp8: {scale_key}: the checkpoint holds a {_granularity(scale)} FP8 weight, the "
            f"model a {state.spec.granularity} one: convert with the recipe the checkpoint was saved with"
        )
    if state.is_static:
        fill_missing_buffers(module, state_dict, prefix, (INPUT_SCALE,),
                             "its static input scale is uncalibrated (dynamic until calibrate(model, batches))")  # fmt: skip


def _granularity(scale: torch.Tensor) -> str:
    return "tensorwise" if scale.numel() == 1 else "rowwise"


def _after_load(module, incompatible_keys):
    layer_state(module).refresh(module)
