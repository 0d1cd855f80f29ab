"""The public entry points: `compile_fp8(model)`, `fp8_layers(model)`, `plain_state_dict(model)`.

`compile_fp8` checks its arguments, hands the model to the converter of the mode the config
asks for (training: `training/convert.py`; inference: `inference/convert.py`), and compiles it
in place, regionally where it repeats blocks (`regions.py`). It returns the same object.
Every linear-like layer it looked at then carries its state (`layers.py`, [Note] A layer's FP8
state), which `fp8_layers` reads.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import Float8Config
from .layers import FilterFn, is_linear_like, layer_state, unwrap_compiled
from . import saved_activations
from .regions import CompileChoice, check_compile_choice, compile_regions, repeated_blocks
from .inference.convert import check_not_inference_model, convert_for_inference
from .training.convert import convert_for_training, release_for_inference
from .training.distributed import fsdp_param_dtypes
from .training.state import is_scaling_buffer
from .training.weight import training_weight


def compile_fp8(
    model: nn.Module,
    config: Optional[Float8Config] = None,
    *,
    module_filter_fn: Optional[FilterFn] = None,
    compile: CompileChoice = True,
    **compile_kwargs,
) -> nn.Module:
    """Convert `model`'s linear layers to FP8 and compile it, both in place; returns `model`.

    FP8 training, or with `Float8Config(mode="inference")` frozen float8 weights. `compile=True`:
    each repeated block (e.g. the transformer layers of a ModuleList) compiled on its own,
    identical blocks sharing one graph, or the whole model if it repeats none; `"model"`: one
    whole-model compile; `False`: convert only (for FSDP2, activation checkpointing or your own
    compile call). `compile_kwargs` go to every compile call. See `fp8_layers` for what happened
    to each layer.
    """
    config = _check_args(model, config, module_filter_fn)
    check_compile_choice(compile)
    block_kwargs = None
    saved = config.saved_activations
    if saved != "hp":  # float8 saved activations: checked before the model is changed
        saved_activations.check_compile_choice(
            compile, bool(repeated_blocks(model, before_conversion=True)), model, saved
        )
        block_kwargs = saved_activations.block_compile_kwargs(compile_kwargs, saved)
    if config.mode == "inference":
        release_for_inference(model)  # a model trained with compile_fp8: plain weights first
        convert_for_inference(model, config, module_filter_fn)
    else:
        convert_for_training(model, config, module_filter_fn)
        if block_kwargs is not None:  # module_filter_fn may have left the blocks unconverted
            blocks = [block for _, block in repeated_blocks(model)]
            saved_activations.check_compile_choice(compile, bool(blocks), model, saved)
            saved_activations.warn_if_float32(blocks, saved)
    compile_regions(model, compile, compile_kwargs, block_kwargs)
    return model


def fp8_layers(model: nn.Module) -> dict[str, str]:
    """For every linear-like layer (by fqn in the unwrapped model): its FP8 recipe, or why it is
    skipped.

    Under FSDP2 the recipe is followed by what its all-gather moves, e.g.
    "fp8 rowwise dynamic (FSDP all-gather in bf16)".
    """
    model = unwrap_compiled(model)
    gather_dtypes = fsdp_param_dtypes(model)
    report = {}
    for fqn, module in model.named_modules():
        if is_linear_like(module):
            state = layer_state(module)
            if state is None:
                report[fqn] = "skipped: not converted (compile_fp8 was not called on it)"
            else:
                report[fqn] = state.describe(module, gather_dtypes)
    return report


def plain_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` without the static/delayed scaling buffers (`fp8_amax_*`): the
    checkpoint the unconverted model has, for `load_state_dict(strict=True)` anywhere."""
    state = unwrap_compiled(model).state_dict()
    return {k: v for k, v in state.items() if not is_scaling_buffer(k)}


def _check_args(model, config, module_filter_fn) -> Float8Config:
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_fp8 expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(
            "compile_fp8 got a torch.compile'd model; pass the plain module "
            "(compile_fp8 compiles it for you, or use compile=False)"
        )
    config = Float8Config() if config is None else config
    if not isinstance(config, Float8Config):
        raise TypeError(f"config must be a Float8Config, got {type(config).__name__}")
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError("module_filter_fn must be callable as module_filter_fn(module, fqn)")
    check_not_inference_model(model, config.mode)
    converted = [n for n, p in model.named_parameters() if training_weight(p) is not None]
    if converted and config.mode == "training":  # inference quantizes a trained model's masters
        raise ValueError(
            f"model is already converted by compile_fp8 ({len(converted)} FP8 weights, e.g. "
            f"{converted[0]!r}); call compile_fp8 once, on the plain model"
        )
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError(
            "compile_fp8 got a model already compiled in place (model.compile()); pass it before "
            "compiling (compile_fp8 compiles it for you, or use compile=False)"
        )
    return config
