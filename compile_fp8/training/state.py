"""The FP8 state of a layer converted for training (layers.py, [Note] A layer's FP8 state).

A training layer runs its recipe's three FP8 GEMMs (`linear_fn.py`) through its
`Float8TrainingWeight`. Dynamic scaling needs nothing else. Static and delayed scaling keep
amaxes between steps in module buffers (`stateful_scaling.py`), named here:

    scaling="static"    fp8_amax_input, fp8_amax_weight           float32 scalars from calibrate()
                        fp8_amax_grad_output                      (only with static_grads=True)
                        (a layer tied to another that reads the same input reads that one's
                        fp8_amax_input: `input_scale_from`, `shared_inputs.py`)
    scaling="delayed"   fp8_amax_history_input, fp8_amax_history_weight,
                        fp8_amax_history_grad_output              float32 [history_len], newest first
                        (tied layers read the leader's fp8_amax_history_input, which the last
                        of them pushes: `input_pushed_by`, `shared_inputs.py`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..config import Float8Config, RecipeSpec
from ..layers import ConvertedLayer, layer_state, overrides_linear_forward, replaced_weight_text
from .fsdp import gather_description
from . import shared_inputs
from .weight import training_weight

OPERANDS = ("input", "weight", "grad_output")
AMAX_PREFIX = "fp8_amax_"  # every checkpointed scaling buffer's name starts so
_WEIGHT_AMAX_TEXT = {True: "", False: ", weight amax in step", "previous": ", weight amax of the previous step"}


def buffer_names(config: Float8Config) -> tuple[str, ...]:
    """The buffers a layer converted with `config` carries (see the module docstring)."""
    if config.scaling == "static":
        operands = OPERANDS if config.static_grads else OPERANDS[:2]
        return tuple(f"{AMAX_PREFIX}{op}" for op in operands)
    if config.scaling == "delayed":
        return tuple(f"{AMAX_PREFIX}history_{op}" for op in OPERANDS)
    return ()


def is_scaling_buffer(key: str) -> bool:
    """A state_dict key of a static/delayed scaling buffer (what `plain_state_dict` drops)."""
    return key.rsplit(".", 1)[-1].startswith(AMAX_PREFIX)


@dataclass(kw_only=True)
class TrainingState(ConvertedLayer):
    config: Float8Config
    recipe: RecipeSpec
    input_scale_from: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    """A layer that reads the same input tensor and whose input amax buffer (static) or history
    (delayed) this layer's forward reads instead of its own (equal values), so both share one
    float8 cast (`shared_inputs.py`; set by `calibrate`)."""
    input_pushed_by: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    """Delayed, a tie's leader: the tied layer that pushes this layer's input history, after every
    tied layer has read it in the step (this layer then does not push it itself)."""

    @property
    def is_static(self) -> bool:
        return self.config.scaling == "static"

    @property
    def stateful_scaling(self) -> Optional[str]:
        return None if self.config.scaling == "dynamic" else self.config.scaling

    @property
    def takes_calibration(self) -> bool:
        return self.config.scaling != "dynamic"

    @property
    def calibrates_grads(self) -> bool:
        return self.config.scaling == "delayed" or (self.is_static and self.config.static_grads)

    def amax_buffer_names(self) -> tuple[str, ...]:
        return buffer_names(self.config)

    def begin_calibration(self, module: nn.Module) -> None:
        super().begin_calibration(module)
        self.input_scale_from = self.input_pushed_by = None
        shared_inputs.begin()  # every layer's begin comes before the first forward

    def end_calibration(self, module: nn.Module) -> bool:
        ready = super().end_calibration(module)
        self.input_scale_from = leader = self._input_leader(module)
        if leader is not None and self.config.scaling == "delayed":
            leader_state = layer_state(leader)
            pusher = leader_state.input_pushed_by
            if pusher is None or shared_inputs.called_later(pusher, module):
                leader_state.input_pushed_by = module  # the tied layer that reads last
        return ready

    def _input_leader(self, module: nn.Module) -> Optional[nn.Module]:
        leader = shared_inputs.tied_leader(module, buffer_names(self.config)[0])
        state = layer_state(leader) if leader is not None else None
        same_scaling = isinstance(state, TrainingState) and state.config == self.config
        return leader if same_scaling and state.input_scale_from is None else None

    def amax_slot(self, module: nn.Module, operand: str):
        """Where `calibrate` records `operand`'s amax: the static amax buffer, or the newest
        entry of the delayed history (a view: the history's first step)."""
        name = buffer_names(self.config)[OPERANDS.index(operand)]
        buffer = getattr(module, name)
        return buffer[:1] if self.config.scaling == "delayed" else buffer

    def refresh(self, module: nn.Module) -> bool:
        """Ready once every amax is recorded (static) / every history has begun (delayed)."""
        self.ready = all(bool((getattr(module, n) > 0).any()) for n in self.amax_buffer_names())
        return self.ready

    def describe(self, module: nn.Module, gather_dtypes: dict) -> str:
        weight = training_weight(module.weight)
        if weight is None:
            return replaced_weight_text()
        text = weight.describe(self._describe_scaling(module))
        if overrides_linear_forward(module):
            text += f" ({type(module).__name__} overrides forward: FP8 only where it calls F.linear)"
        if weight is not module.weight:  # an FSDP2 shard
            dtype = gather_dtypes.get(id(module.weight)) or weight.dtype
            text += " " + gather_description(weight._recipe, dtype)
        return text

    def _describe_scaling(self, module: nn.Module) -> str:
        config = self.config
        if config.scaling == "dynamic":
            return "dynamic"
        shared = ", input scale and cast shared with a layer reading the same tensor"
        shared = shared if self.input_scale_from is not None else ""
        if config.scaling == "delayed":
            warm = "" if self.refresh(module) else ", dynamic until the first optimizer step or calibrate()"
            return f"delayed (history {config.history_len}, {config.amax_from}{warm}{shared})"
        grads = "static grads" if config.static_grads else "dynamic grads"
        grads += _WEIGHT_AMAX_TEXT[config.static_weights] + shared
        state = grads if self.ready else "uncalibrated: dynamic until calibrate()"
        return f"static ({state})"
