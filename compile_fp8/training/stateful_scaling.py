"""Static and delayed scaling: the layer's forward that reads stored scales, and its buffers.

Dynamic scaling needs no state: the training weight's `F.linear` hook computes every scale from
this step's amax. Static and delayed scaling keep amaxes between steps, and mutable state must
not live inside the weight subclass (torch mishandles mutation of a subclass's inner tensor in a
compiled region), so it lives in plain buffers on the converted `nn.Linear` (names in
`state.py`), saved in `state_dict()` (`plain_state_dict(model)` drops them). Such a layer gets
`stateful_forward` as its forward (an instance attribute: a `functools.partial`, so deepcopy and
pickling keep it bound to the right module): it reads the buffers and passes fixed scales to the
FP8 linear function; the histories are updated in place inside the compiled graph (forward for
input and weight, backward for grad_output).

A static layer is uncalibrated (`state.ready` False) until `calibrate`: it then runs dynamic
scaling (never a NaN from an unset scale), and calibrating flips that flag: one recompile. A
delayed layer needs no flag: while a history is empty (the first step) its scale comes from the
current amax, chosen by a `where` inside the graph (`scaling.delayed_scale`), so the first step
and every later one run one compiled graph.

Histories move only in training forwards (grad mode on): an evaluation under `torch.no_grad()`
reads them and records nothing. A delayed layer cannot be recomputed by activation
checkpointing (its forward moves its own history); eager checkpointing raises a RuntimeError
that says so.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import E4M3, Float8Config
from ..layers import fill_missing_buffers, layer_state, record_amax
from ..scaling import amax, delayed_scale, push_amax, stored_amax_to_scale
from .linear_fn import DYNAMIC_GRADS, GradScaling, float8_linear
from .state import TrainingState

def attach_scaling_state(module: nn.Linear, state: TrainingState) -> None:
    """Add the buffers, the forward and the checkpoint hooks of static/delayed scaling."""
    config = state.config
    length = config.history_len if config.scaling == "delayed" else None
    for name in state.amax_buffer_names():
        shape = () if length is None else (length,)
        module.register_buffer(name, torch.zeros(shape, dtype=torch.float32, device=module.weight.device))
    module.forward = functools.partial(stateful_forward, module)
    module._register_load_state_dict_pre_hook(_fill_missing_buffers, with_module=True)
    module.register_load_state_dict_post_hook(_ready_after_load)


def detach_scaling_state(module: nn.Module, state: TrainingState) -> None:
    """Undo `attach_scaling_state` (the layer is converted for inference)."""
    for name in state.amax_buffer_names():
        module._buffers.pop(name, None)
    module.__dict__.pop("forward", None)
    remove_hooks(module._load_state_dict_pre_hooks, _fill_missing_buffers)
    remove_hooks(module._load_state_dict_post_hooks, _ready_after_load)


def remove_hooks(hooks: dict, fn) -> None:
    """Remove every hook `fn` from one of a module's hook dicts (pre-hooks come wrapped)."""
    for handle_id, hook in list(hooks.items()):
        if getattr(hook, "hook", hook) is fn:
            del hooks[handle_id]


# ---- the forward ----------------------------------------------------------------------------


def stateful_forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward for a static- or delayed-scaled layer."""
    state: TrainingState = layer_state(module)
    if state.calibrating:
        return _calibrating_forward(module, input, state)
    config = state.config
    if config.scaling == "static":
        if not state.ready:
            return F.linear(input, module.weight, module.bias)  # dynamic until calibrated
        return _static_forward(module, input, config)
    _refuse_checkpoint_recompute(module)
    # evaluation (no_grad, inference_mode) records nothing, so an evaluation pass never changes
    # what the training run does next
    return _delayed_forward(module, input, config, record=torch.is_grad_enabled())


def _refuse_checkpoint_recompute(module: nn.Linear) -> None:
    """Eager activation checkpointing re-runs a forward inside backward; a delayed layer's
    recomputation would read an amax history that moved since the original forward (different
    casts than the forward it replays, and the amaxes recorded twice). Say so instead."""
    if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
        return
    raise RuntimeError(
        f"compile_fp8: Float8Config(scaling='delayed') layer {module!r} was recomputed by "
        "activation checkpointing (torch.utils.checkpoint): a delayed layer keeps an amax "
        "history that its own forward updates, so the recomputed forward cannot replay the "
        "original. Use scaling='dynamic' (or 'static') for a checkpointed model, or leave the "
        "checkpointed blocks out of the delayed conversion (module_filter_fn)"
    )


def _fp8_linear(module, input, input_scale, weight_scale, grad_amax, grading):
    weight = module.weight
    return float8_linear(
        input, weight, module.bias, weight._recipe, weight._emulate,
        input_scale, weight_scale, grad_amax, grading,
    )  # fmt: skip


def _static_forward(module, input, config: Float8Config):
    margin = config.amax_margin
    input_scale = stored_amax_to_scale(module.fp8_amax_input, E4M3, margin)
    weight_scale = stored_amax_to_scale(module.fp8_amax_weight, E4M3, margin)
    if config.static_grads:
        grading = GradScaling("static", margin=margin)
        return _fp8_linear(module, input, input_scale, weight_scale, module.fp8_amax_grad_output, grading)
    return _fp8_linear(module, input, input_scale, weight_scale, None, DYNAMIC_GRADS)


def _delayed_forward(module, input, config: Float8Config, record=True):
    margin, how = config.amax_margin, config.amax_from
    amax_input, amax_weight = amax(input), amax(module.weight)
    input_scale = delayed_scale(module.fp8_amax_history_input, amax_input, E4M3, how, margin)
    weight_scale = delayed_scale(module.fp8_amax_history_weight, amax_weight, E4M3, how, margin)
    if record:
        push_amax(module.fp8_amax_history_input, amax_input)
        push_amax(module.fp8_amax_history_weight, amax_weight)
    grading = GradScaling("delayed", how, margin)
    return _fp8_linear(
        module, input, input_scale, weight_scale, module.fp8_amax_history_grad_output, grading
    )


# ---- calibration (eager, high precision) --------------------------------------------------


class _RecordGradAmax(torch.autograd.Function):
    """Identity; its backward records max |grad_output| into the module's buffer."""

    @staticmethod
    def forward(ctx, output, amax_buffer):
        ctx.amax_buffer = amax_buffer
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_out):
        record_amax(ctx.amax_buffer, grad_out)
        return grad_out, None


def _calibrating_forward(module, input, state: TrainingState):
    """High-precision forward that records the running max of |input| and |weight|."""
    weight_hp = module.weight * 1  # a plain, autograd-connected high-precision copy
    record_amax(module.fp8_amax_input, input)
    record_amax(module.fp8_amax_weight, weight_hp)
    output = F.linear(input, weight_hp, module.bias)
    if state.config.static_grads and torch.is_grad_enabled():
        output = _RecordGradAmax.apply(output, module.fp8_amax_grad_output)
    return output


# ---- checkpoints --------------------------------------------------------------------------


def _fill_missing_buffers(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """A checkpoint without the scaling buffers (a plain one) loads, with a warning."""
    names = layer_state(module).amax_buffer_names()
    fill_missing_buffers(
        module, state_dict, prefix, names,
        "its FP8 scales are uncalibrated (static: run calibrate(model, batches); delayed: the "
        "next training step re-starts the history)",
    )  # fmt: skip


def _ready_after_load(module, incompatible_keys):
    layer_state(module).refresh(module)
