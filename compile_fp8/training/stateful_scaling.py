"""Static and delayed scaling: the layer's forward that reads stored scales, and its buffers.

Dynamic scaling needs no state: the training weight's `F.linear` hook computes every scale from
this step's amax. Static and delayed scaling keep amaxes between steps, and mutable state must
not live inside the weight subclass (torch mishandles mutation of a subclass's inner tensor in a
compiled region), so it lives in plain buffers on the converted `nn.Linear` (names in
`state.py`), saved in `state_dict()` (`plain_state_dict(model)` drops them). Such a layer runs
`stateful_forward`: it reads the buffers and passes fixed scales to the FP8 linear function; the
histories are updated in place inside the compiled graph (forward for input and weight, backward
for grad_output). A plain `nn.Linear` becomes a `StatefulScalingLinear` (an nn.Linear subclass
whose forward is that function, importable by name so deepcopy and pickling keep it): one
class-level forward lets every block of a regionally compiled model share one graph. A subclass
of nn.Linear keeps its class and gets the forward as an instance attribute (a
`functools.partial`, bound to its module through deepcopy and pickling), which dynamo guards per
instance: one graph per block there.

A static layer is uncalibrated (`state.ready` False) until `calibrate`: it then runs dynamic
scaling (never a NaN from an unset scale), and calibrating flips that flag: one recompile.
Calibration also ties layers that read the same tensor (gate and up of a SwiGLU) to one input
amax buffer or history, so the compiled step casts that tensor once (`shared_inputs.py`).

A delayed layer is *seeded* (`state.ready`) once each of its three histories holds an amax. A
seeded layer takes every scale from its history alone: no cast waits for a reduction of the
tensor it casts (this step's amax is only pushed, for the next step). On the H200 that runs at
dynamic scaling's speed: inductor fuses the casts into their producers either way, and the
amax passes remain (docs/benchmarks.md). Before that, a `where` inside the
graph takes the current amax while a history is empty (`scaling.delayed_scale`). What seeds
it: `calibrate(model, batches, loss_fn=...)` before training, a checkpoint with its histories,
or else the first optimizer step (a global optimizer step hook looks at the unseeded layers
after each of the first `SEED_STEPS` steps, then removes itself); the flag flips outside the
graph, so the step after it compiles once more.

Histories move only in training forwards (grad mode on): an evaluation under `torch.no_grad()`
reads them and records nothing. A delayed layer cannot be recomputed by activation
checkpointing (its forward moves its own history); eager checkpointing raises a RuntimeError
that says so.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import nn

from ..config import E4M3, Float8Config
from ..layers import fill_missing_buffers, layer_state, record_amax
from ..scaling import amax, delayed_scale, push_amax, read_before_update, stored_amax_to_scale
from .linear_fn import DYNAMIC_GRADS, GradScaling, float8_linear
from .shared_inputs import record_input
from .state import TrainingState

def attach_scaling_state(module: nn.Linear, state: TrainingState) -> None:
    """Add the buffers, the forward and the checkpoint hooks of static/delayed scaling."""
    config = state.config
    length = config.history_len if config.scaling == "delayed" else None
    for name in state.amax_buffer_names():
        shape = () if length is None else (length,)
        module.register_buffer(name, torch.zeros(shape, dtype=torch.float32, device=module.weight.device))
    if type(module) is nn.Linear:
        module.__class__ = StatefulScalingLinear
    else:
        module.forward = functools.partial(stateful_forward, module)
    module._register_load_state_dict_pre_hook(_fill_missing_buffers, with_module=True)
    module.register_load_state_dict_post_hook(_ready_after_load)
    if config.scaling == "delayed":
        _seed_watch.add(module, state)


def detach_scaling_state(module: nn.Module, state: TrainingState) -> None:
    """Undo `attach_scaling_state` (the layer is converted for inference)."""
    for name in state.amax_buffer_names():
        module._buffers.pop(name, None)
    if type(module) is StatefulScalingLinear:
        module.__class__ = nn.Linear
    module.__dict__.pop("forward", None)
    _seed_watch.discard(module)
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
        return _static_forward(module, input, config, state.input_scale_from or module)
    _refuse_checkpoint_recompute(module)
    # evaluation (no_grad, inference_mode) records nothing, so an evaluation pass never changes
    # what the training run does next
    return _delayed_forward(module, input, state, torch.is_grad_enabled())


class StatefulScalingLinear(nn.Linear):
    """The class of a plain `nn.Linear` converted with static or delayed scaling."""

    CONVERTED_FORWARD = True
    forward = stateful_forward


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


def _static_forward(module, input, config: Float8Config, input_amax_owner: nn.Module):
    """`input_amax_owner`: `module`, or a layer that reads the same input (`shared_inputs.py`)."""
    margin = config.amax_margin
    input_scale = stored_amax_to_scale(input_amax_owner.fp8_amax_input, E4M3, margin)
    weight_scale = stored_amax_to_scale(_static_weight_amax(module, config), E4M3, margin)
    if config.static_grads:
        grading = GradScaling("static", margin=margin)
        return _fp8_linear(module, input, input_scale, weight_scale, module.fp8_amax_grad_output, grading)
    return _fp8_linear(module, input, input_scale, weight_scale, None, DYNAMIC_GRADS)


def _static_weight_amax(module, config: Float8Config) -> torch.Tensor:
    """The weight amax the cast uses: the stored one (`static_weights=True`); this forward's
    (False); the stored one, measured by the previous training forward ("previous"). With False
    and "previous" a training forward stores this weight's amax (checkpoints then hold it)."""
    stored, record = module.fp8_amax_weight, torch.is_grad_enabled()
    if config.static_weights is True:
        return stored
    if config.static_weights == "previous":
        # read before the update below; the cast (and its backward) use the previous amax
        previous = read_before_update(stored)
        if record:  # evaluation measures nothing it would not use
            stored.copy_(amax(module.weight).to(torch.float32).detach())
        return previous
    weight_amax = amax(module.weight).to(torch.float32)
    if record:
        stored.copy_(weight_amax.detach())
    return weight_amax


def _delayed_forward(module, input, state: TrainingState, record: bool):
    """`record`: push this step's amaxes (training); `state.ready`: scales from the histories
    alone. The input's history is the tie leader's where `calibrate` tied this layer."""
    config, seeded = state.config, state.ready
    margin, how = config.amax_margin, config.amax_from
    input_history = (state.input_scale_from or module).fp8_amax_history_input
    histories = (input_history, module.fp8_amax_history_weight)
    amaxes = (amax(input), amax(module.weight)) if record or not seeded else (None, None)
    input_scale, weight_scale = (
        delayed_scale(history, amax_now, E4M3, how, margin, seeded)
        for history, amax_now in zip(histories, amaxes)
    )
    if record:
        for history in _input_histories_to_push(module, state):
            push_amax(history, amaxes[0])
        push_amax(module.fp8_amax_history_weight, amaxes[1])
    grading = GradScaling("delayed", how, margin, seeded)
    return _fp8_linear(
        module, input, input_scale, weight_scale, module.fp8_amax_history_grad_output, grading
    )


def _input_histories_to_push(module, state: TrainingState) -> list:
    """Its own input history, unless tied layers read it later in the step (a tie's leader);
    and the leader's, for the tied layer that reads last (`shared_inputs.py`)."""
    histories = [] if state.input_pushed_by is not None else [module.fp8_amax_history_input]
    leader = state.input_scale_from
    if leader is not None and layer_state(leader).input_pushed_by is module:
        histories.append(leader.fp8_amax_history_input)
    return histories


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
    record_input(module, input)  # which layers read one tensor (shared_inputs.py)
    record_amax(state.amax_slot(module, "input"), input)
    record_amax(state.amax_slot(module, "weight"), weight_hp)
    output = F.linear(input, weight_hp, module.bias)
    if state.calibrates_grads and torch.is_grad_enabled():
        output = _RecordGradAmax.apply(output, state.amax_slot(module, "grad_output"))
    return output


# ---- delayed scaling: seeded after the first optimizer step -------------------------------

SEED_STEPS = 3  # optimizer steps after which a layer still unseeded (never trained) is left be


class _SeedWatch:
    """Delayed layers not seeded yet; after each optimizer step (a global post hook, held only
    while there are such layers), each whose histories have all begun is marked ready."""

    def __init__(self):
        self.layers: "weakref.WeakKeyDictionary[nn.Module, TrainingState]" = weakref.WeakKeyDictionary()
        self.handle = None
        self.steps_left = SEED_STEPS

    def add(self, module: nn.Module, state: TrainingState) -> None:
        self.layers[module] = state
        self.steps_left = SEED_STEPS
        if self.handle is None:
            self.handle = register_optimizer_step_post_hook(self.after_step)

    def discard(self, module: nn.Module) -> None:
        self.layers.pop(module, None)

    def after_step(self, optimizer, args, kwargs) -> None:
        for module, state in list(self.layers.items()):
            if state.ready or state.refresh(module):
                del self.layers[module]
        self.steps_left -= 1
        if (not self.layers or self.steps_left <= 0) and self.handle is not None:
            self.handle.remove()
            self.handle = None
            self.layers.clear()


_seed_watch = _SeedWatch()


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
