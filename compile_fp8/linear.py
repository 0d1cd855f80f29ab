"""Static and delayed scaling: the Linear's scaling state as buffers, and the forward that uses it.

Dynamic scaling needs no state: the training weight's `F.linear` hook computes every scale from
this step's amax. Static and delayed scaling keep amaxes between steps, and mutable state must
not live inside the weight subclass (torch mishandles mutation of a subclass's inner tensor in a
compiled region), so it lives in plain buffers on the converted `nn.Linear`, under these names:

    scaling="static"    fp8_amax_input, fp8_amax_weight           float32 scalars from calibrate()
                        fp8_amax_grad_output                      (only with static_grads=True)
    scaling="delayed"   fp8_amax_history_input, fp8_amax_history_weight,
                        fp8_amax_history_grad_output              float32 [history_len], newest first

They are saved in `state_dict()`; `plain_state_dict(model)` drops them. Such a layer's `forward`
is an instance attribute (a `functools.partial` of `scaled_forward`, so deepcopy and pickling
keep it bound to the right module) that reads the buffers and passes fixed scales to the FP8
autograd function; the histories are updated in place inside the compiled graph (forward for
input and weight, backward for grad_output).

A static layer is uncalibrated (`_fp8_ready` False) until `calibrate`: it then runs dynamic
scaling (never a NaN from an unset scale), and calibrating flips that Python flag: one
recompile. A delayed layer needs no flag: while a history is empty (the first step) its scale
comes from the current amax, chosen by a `where` inside the graph (`scaling.delayed_scale`), so
the first step and every later one run one compiled graph.

Histories move only in training forwards (grad mode on): an evaluation under `torch.no_grad()`
reads them and records nothing. A delayed layer cannot be recomputed by activation
checkpointing (its forward moves its own history); eager checkpointing raises a RuntimeError
that says so.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import DYNAMIC_GRADS, GradScaling, float8_linear
from .config import E4M3, Float8Config
from .scaling import amax, delayed_scale, push_amax, stored_amax_to_scale

OPERANDS = ("input", "weight", "grad_output")
CONFIG_ATTR = "_fp8_config"
READY_ATTR = "_fp8_ready"
CALIBRATING_ATTR = "_fp8_calibrating"


def buffer_names(config: Float8Config) -> tuple[str, ...]:
    """The buffers a layer converted with `config` carries (see module docstring)."""
    if config.scaling == "static":
        operands = OPERANDS if config.static_grads else OPERANDS[:2]
        return tuple(f"fp8_amax_{op}" for op in operands)
    if config.scaling == "delayed":
        return tuple(f"fp8_amax_history_{op}" for op in OPERANDS)
    return ()


def is_fp8_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith("fp8_amax_")


def uses_scaled_forward(module: nn.Module) -> bool:
    config = getattr(module, CONFIG_ATTR, None)
    return config is not None and config.scaling != "dynamic"


def attach_scaling_state(module: nn.Linear, config: Float8Config) -> None:
    """Add the buffers, the forward and the checkpoint hooks of static/delayed scaling."""
    device = module.weight.device
    length = config.history_len if config.scaling == "delayed" else None
    for name in buffer_names(config):
        shape = () if length is None else (length,)
        module.register_buffer(name, torch.zeros(shape, dtype=torch.float32, device=device))
    setattr(module, CONFIG_ATTR, config)
    setattr(module, READY_ATTR, False)
    setattr(module, CALIBRATING_ATTR, False)
    module.forward = functools.partial(scaled_forward, module)
    module._register_load_state_dict_pre_hook(_fill_missing_buffers, with_module=True)
    module.register_load_state_dict_post_hook(_ready_after_load)


def refresh_ready(module: nn.Module) -> bool:
    """Set `_fp8_ready` from the buffers: every amax recorded (static) / every history begun."""
    config = getattr(module, CONFIG_ATTR)
    ready = all(bool((getattr(module, n) > 0).any()) for n in buffer_names(config))
    setattr(module, READY_ATTR, ready)
    return ready


def describe_scaling(module: nn.Module) -> str:
    """The scaling part of `fp8_layers`' text for this layer."""
    config = getattr(module, CONFIG_ATTR, None)
    if config is None or config.scaling == "dynamic":
        return "dynamic"
    if config.scaling == "delayed":
        warm = "" if refresh_ready(module) else ", dynamic until the first training step"
        return f"delayed (history {config.history_len}, {config.amax_from}{warm})"
    grads = "static grads" if config.static_grads else "dynamic grads"
    state = grads if getattr(module, READY_ATTR) else "uncalibrated: dynamic until calibrate()"
    return f"static ({state})"


# ---- the forward ----------------------------------------------------------------------------


def scaled_forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward for a static- or delayed-scaled layer."""
    if getattr(module, CALIBRATING_ATTR):
        return _calibrating_forward(module, input)
    config: Float8Config = getattr(module, CONFIG_ATTR)
    if config.scaling == "static":
        if not getattr(module, READY_ATTR):
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


def _static_forward(module, input, config):
    margin = config.amax_margin
    input_scale = stored_amax_to_scale(module.fp8_amax_input, E4M3, margin)
    weight_scale = stored_amax_to_scale(module.fp8_amax_weight, E4M3, margin)
    if config.static_grads:
        grading = GradScaling("static", margin=margin)
        return _fp8_linear(module, input, input_scale, weight_scale, module.fp8_amax_grad_output, grading)
    return _fp8_linear(module, input, input_scale, weight_scale, None, DYNAMIC_GRADS)


def _delayed_forward(module, input, config, record=True):
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
        ctx.amax_buffer.copy_(torch.maximum(ctx.amax_buffer, amax(grad_out).float()))
        return grad_out, None


def _calibrating_forward(module, input):
    """High-precision forward that records the running max of |input| and |weight|."""
    weight_hp = module.weight * 1  # a plain, autograd-connected high-precision copy
    for name, value in (("fp8_amax_input", input), ("fp8_amax_weight", weight_hp)):
        buffer = getattr(module, name)
        buffer.copy_(torch.maximum(buffer, amax(value.detach()).float()))
    output = F.linear(input, weight_hp, module.bias)
    if getattr(module, CONFIG_ATTR).static_grads and torch.is_grad_enabled():
        output = _RecordGradAmax.apply(output, module.fp8_amax_grad_output)
    return output


# ---- checkpoints --------------------------------------------------------------------------


def _fill_missing_buffers(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """A checkpoint without the scaling buffers (a plain one) loads, with a warning."""
    absent = [n for n in buffer_names(getattr(module, CONFIG_ATTR)) if prefix + n not in state_dict]
    for name in absent:
        state_dict[prefix + name] = torch.zeros_like(getattr(module, name))
    if absent:
        warnings.warn(
            f"compile_fp8: checkpoint has no {', '.join(absent)} for {prefix.rstrip('.') or 'the model'}: "
            "its FP8 scales are uncalibrated (static: run calibrate(model, batches); delayed: the "
            "next training step re-starts the history)",
            UserWarning,
            stacklevel=2,
        )


def _ready_after_load(module, incompatible_keys):
    refresh_ready(module)


def check_scaling_config(config: Float8Config, module: nn.Linear) -> str | None:
    """Why `module` cannot take static/delayed scaling (None: it can)."""
    if config.scaling != "dynamic" and type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} overrides forward"
    return None

