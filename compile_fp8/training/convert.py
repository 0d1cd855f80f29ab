"""Training conversion: every eligible linear's weight becomes a `Float8TrainingWeight`.

    convert_for_training(model, config, module_filter_fn)      # in place

Each chosen layer's `weight` Parameter is replaced by a Parameter wrapping the same master
tensor (tied layers share one new Parameter: ties stay ties), and the layer gets its
`TrainingState`. Dynamic scaling needs nothing more: `F.linear` on the weight runs the FP8
linear function. Static and delayed scaling add their buffers and forward
(`stateful_scaling.py`), a Conv1D its forward (`conv1d.py`). Module classes, parameter names and
`state_dict()` keys stay: a state_dict hook stores the master weight as a plain tensor, and a
load hook re-wraps a Parameter that `load_state_dict(assign=True)` replaced.

`release_for_inference(model)` undoes all of it, for a trained model converted for inference.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from torch import nn

from ..config import Float8Config, RecipeSpec, recipe_spec
from ..kernels.triton_support import launch_statically
from ..layers import (
    FilterFn,
    SkipKind,
    SkipReason,
    Skipped,
    converted_layers,
    features,
    forward_skip_reason,
    is_conv1d,
    layer_state,
    linears_to_convert,
    set_layer_state,
    shared_skip_reason,
)
from .conv1d import use_fp8_forward
from .fsdp import forget_amaxes
from .layer_choice import slow_layer_reason
from .state import TrainingState
from .stateful_scaling import attach_scaling_state, detach_scaling_state, remove_hooks
from .weight import Float8TrainingWeight, training_weight

logger = logging.getLogger("compile_fp8")


def convert_for_training(model: nn.Module, config: Float8Config, filter_fn: Optional[FilterFn]) -> None:
    recipe = recipe_spec(config.recipe, dual_cast=config.cast_kernels == "triton", fast_accum=config.fast_accum)
    if config.cast_kernels == "triton":
        launch_statically()
    layers = linears_to_convert(
        model,
        lambda module, fqn, owners: _skip_reason(module, fqn, owners, filter_fn, config),
        lambda module: to_training_weight(module.weight, recipe, config.emulate),
    )
    for module, weight in layers:
        module.weight = weight
        _attach(module, TrainingState(config=config, recipe=recipe))
    logger.info("compile_fp8: %d FP8 weight(s), recipe %s", len({id(w) for _, w in layers}), config.recipe)
    if config.layer_filter == "auto":
        _log_slow_layers(model)
    if config.scaling == "static" and layers:
        warnings.warn(
            "compile_fp8: scaling='static' layers run with dynamic scaling until you call "
            "calibrate(model, batches)",
            UserWarning,
            stacklevel=3,
        )


def _skip_reason(module, fqn, owners, filter_fn, config: Float8Config) -> Optional[SkipReason]:
    reason = shared_skip_reason(module, fqn, owners, filter_fn)
    if reason is None and config.layer_filter == "auto":
        reason = slow_layer_reason(*features(module), config.recipe)
    return reason or forward_skip_reason(module, config.scaling)


def _log_slow_layers(model: nn.Module) -> None:
    states = ((fqn, layer_state(m)) for fqn, m in model.named_modules())
    slow = [fqn for fqn, state in states if isinstance(state, Skipped) and state.reason.kind is SkipKind.SLOW]
    logger.info("compile_fp8: layer_filter='auto' keeps %d layer(s) in high precision, FP8 being slower "
                "at their shapes (fp8_layers(model) gives each one's measured ratio): %s",
                len(slow), ", ".join(slow[:8]) + (", ..." if len(slow) > 8 else "") or "none")  # fmt: skip


def to_training_weight(weight: nn.Parameter, recipe: RecipeSpec, emulate) -> nn.Parameter:
    wrapped = Float8TrainingWeight(weight.detach(), recipe, emulate)
    return nn.Parameter(wrapped, requires_grad=weight.requires_grad)


def _attach(module: nn.Module, state: TrainingState) -> None:
    if isinstance(layer_state(module), TrainingState):
        return  # a module reached twice (shared submodule)
    set_layer_state(module, state)
    module.register_state_dict_post_hook(_plain_weight_in_state_dict)
    module.register_load_state_dict_post_hook(_rewrap_after_assign)
    if is_conv1d(module):
        use_fp8_forward(module)
    if state.stateful_scaling:
        attach_scaling_state(module, state)


def release_for_inference(model: nn.Module) -> None:
    """Undo the training conversion of every layer (a trained model converted for inference):
    each FP8 weight becomes a plain Parameter of its master tensor again (ties stay ties)."""
    plain: dict[int, nn.Parameter] = {}  # id(training Parameter) -> its plain Parameter
    for _, module, state in converted_layers(model, TrainingState):
        weight, master = module.weight, training_weight(module.weight)
        if master is not None and id(weight) not in plain:
            plain[id(weight)] = nn.Parameter(master.hp.detach(), weight.requires_grad)
        if id(weight) in plain:
            module.weight = plain[id(weight)]
        remove_hooks(module._state_dict_hooks, _plain_weight_in_state_dict)
        remove_hooks(module._load_state_dict_post_hooks, _rewrap_after_assign)
        detach_scaling_state(module, state)
        set_layer_state(module, None)


# ---- checkpoints --------------------------------------------------------------------------


def _plain_weight_in_state_dict(module, state_dict, prefix, local_metadata):
    """Store the master weight as a plain tensor under the original key.

    With `keep_vars=True` the entry is the Parameter itself and is left alone: FSDP and
    distributed checkpointing need the live parameter. Under FSDP2 the entry is a DTensor of
    the rank's shard: it becomes a DTensor of the plain shard (same storage, so an in-place
    `torch.distributed.checkpoint.load` into it writes the master weight).
    """
    key = prefix + "weight"
    value = state_dict.get(key)
    weight = training_weight(value)
    if weight is None or isinstance(value, nn.Parameter):
        return
    state_dict[key] = weight.hp if weight is value else _with_local(value, weight.hp)


def _rewrap_after_assign(module, incompatible_keys):
    """`load_state_dict(..., assign=True)` replaces the Parameter: make it FP8 again.

    Under FSDP2 the local shard is re-wrapped inside its DTensor; any amax remembered for the
    next all-gather is forgotten (the weight just changed)."""
    param, state = module.weight, layer_state(module)
    weight = training_weight(param)
    if weight is not None:
        forget_amaxes(weight)
    elif hasattr(param, "_local_tensor"):
        local = to_training_weight(param._local_tensor, state.recipe, state.config.emulate)
        module.weight = nn.Parameter(_with_local(param, local.data), requires_grad=param.requires_grad)
    else:
        module.weight = to_training_weight(param, state.recipe, state.config.emulate)


def _with_local(dtensor, local: torch.Tensor):
    """A DTensor like `dtensor` (mesh, placements, global shape) holding `local` as its shard."""
    from torch.distributed.tensor import DTensor  # lazy: only FSDP2 users have DTensors

    return DTensor.from_local(
        local, dtensor.device_mesh, dtensor.placements, run_check=False,
        shape=dtensor.shape, stride=dtensor.stride(),
    ).detach()  # fmt: skip
