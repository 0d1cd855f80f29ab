"""Which layers run FP8, why the others do not, and the one state object a layer carries.

compile_fp8 converts *linear-like* layers: `nn.Linear` (subclasses too) and transformers'
`Conv1D` (GPT-2's projections: the same function with its weight stored [in, out]). A layer
either converts or stays in high precision for exactly one `SkipReason`, decided by rules that
training and inference share (`shared_skip_reason`, `forward_skip_reason`) plus a few of each
mode's own.

# [Note] A layer's FP8 state
Everything compile_fp8 knows about a layer lives in one object, `layer_state(module)`, stored
in the module's `__dict__` under `STATE_ATTR` (so it is deep-copied and pickled with the
module, and `state_dict()` never sees it):

    None                      compile_fp8 never looked at the layer
    Skipped(reason)           left in high precision, with its SkipReason
    ConvertedLayer subclass   converted: what it runs and its scaling state
                              (training.state.TrainingState, inference.state.InferenceState)

Tensors that change (amaxes, histories, input scales) are module buffers, so `state_dict()`,
`.to()` and torch.compile handle them; the state object holds plain Python values only.
"""

from __future__ import annotations

import enum
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .gemm import ALIGN
from .scaling import amax

STATE_ATTR = "_compile_fp8"  # the module attribute that holds its LayerState (see the Note)
FilterFn = Callable[[nn.Module, str], bool]
Owners = dict  # id(parameter) -> [(fqn of the parameter, module holding it)]

# layer dtypes torch._scaled_mm can write and compile_fp8 converts
FP8_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---- what a linear-like layer is ----------------------------------------------------------


def conv1d_class() -> Optional[type]:
    """transformers' Conv1D, if transformers is imported (else no model can hold one)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear_like(module: nn.Module) -> bool:
    """The layers compile_fp8 converts: nn.Linear (subclasses too) and transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.nx, module.nf


def overrides_linear_forward(module: nn.Module) -> bool:
    """A user's nn.Linear subclass with its own forward (not one of the classes a conversion
    gives a plain nn.Linear: those set `CONVERTED_FORWARD`)."""
    cls = type(module)
    return (isinstance(module, nn.Linear) and cls.forward is not nn.Linear.forward
            and not getattr(cls, "CONVERTED_FORWARD", False))  # fmt: skip


# ---- state ----------------------------------------------------------------------------------


class LayerState:
    """What compile_fp8 decided for one linear-like layer (see [Note] A layer's FP8 state)."""

    def describe(self, module: nn.Module, gather_dtypes: dict) -> str:
        """`fp8_layers`' text for the layer ("fp8 ..." or "skipped: ...")."""
        raise NotImplementedError


class SkipKind(enum.Enum):
    FILTERED = "module_filter_fn"
    UNALIGNED = "dimensions _scaled_mm cannot take"
    DTYPE = "a weight dtype _scaled_mm cannot take"
    TIED = "weight tied to another kind of module"
    FORWARD = "a forward the conversion cannot run"
    SLOW = "layer_filter='auto'"
    SHARDED = "weight already sharded"


# Kinds the user did not ask for: one UserWarning per conversion names each such layer.
WARNED_KINDS = (SkipKind.UNALIGNED, SkipKind.DTYPE, SkipKind.TIED, SkipKind.FORWARD, SkipKind.SHARDED)


@dataclass(frozen=True)
class SkipReason:
    kind: SkipKind
    detail: str

    def __str__(self) -> str:
        return f"skipped: {self.detail}"


@dataclass
class Skipped(LayerState):
    reason: SkipReason

    def describe(self, module, gather_dtypes) -> str:
        return str(self.reason)


@dataclass(kw_only=True)
class ConvertedLayer(LayerState):
    """A converted layer. `ready`: its static or delayed scales have values (from `calibrate`,
    a checkpoint or a training step); `calibrating`: inside `calibrate` (high-precision forward
    that records amaxes)."""

    ready: bool = False
    calibrating: bool = False

    @property
    def is_static(self) -> bool:
        """Fixed scales from `calibrate` (scaling="static")."""
        return False

    @property
    def takes_calibration(self) -> bool:
        """`calibrate` records amaxes for this layer (static scales, delayed histories' seed)."""
        return self.is_static

    @property
    def stateful_scaling(self) -> Optional[str]:
        """The scaling mode, where the layer keeps scales between calls ("static", "delayed");
        None where every scale comes from the tensor at hand (dynamic)."""
        return None

    @property
    def calibrates_grads(self) -> bool:
        """`calibrate` must run backward for this layer (static or delayed gradient scales)."""
        return False

    def amax_buffer_names(self) -> tuple[str, ...]:
        """The module buffers `calibrate` zeroes and then records into."""
        return ()

    def refresh(self, module: nn.Module) -> bool:
        """Recompute `ready` (and whatever follows from the scaling buffers) after they changed."""
        return self.ready

    def begin_calibration(self, module: nn.Module) -> None:
        """`calibrate` starts: amax buffers from zero, the high-precision recording forward on."""
        for name in self.amax_buffer_names():
            getattr(module, name).zero_()
        self.calibrating = True

    def end_calibration(self, module: nn.Module) -> bool:
        """`calibrate` ends (also when a batch raised): flags and scales follow the buffers."""
        self.calibrating = False
        return self.refresh(module)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a `torch.compile(module)` wrapper (`_orig_mod`), or `model` itself."""
    return getattr(model, "_orig_mod", model)


def layer_state(module: nn.Module) -> Optional[LayerState]:
    return module.__dict__.get(STATE_ATTR)


def set_layer_state(module: nn.Module, state: Optional[LayerState]) -> None:
    if state is None:
        module.__dict__.pop(STATE_ATTR, None)
    else:
        module.__dict__[STATE_ATTR] = state


def converted_layers(model: nn.Module, kind: type = ConvertedLayer) -> list[tuple[str, nn.Module, LayerState]]:
    """(fqn, module, state) of every layer whose state is a `kind`."""
    found = []
    for fqn, module in model.named_modules():
        state = layer_state(module)
        if isinstance(state, kind):
            found.append((fqn, module, state))
    return found


def replaced_weight_text() -> str:
    """fp8_layers' text (and errors') for a converted layer whose weight was swapped since."""
    return (
        "skipped: weight replaced by a plain tensor after conversion (e.g. `module.weight = "
        "...`); convert the model once its weights are in place"
    )


# ---- the rules ------------------------------------------------------------------------------


def weight_owners(model: nn.Module) -> Owners:
    """id(parameter) -> every (fqn, module) holding it directly (ties show up as several)."""
    owners: dict[int, list] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((f"{fqn}.{name}".lstrip("."), module))
    return owners


def shared_skip_reason(module, fqn: str, owners: Owners, filter_fn: Optional[FilterFn]) -> Optional[SkipReason]:
    """The rules of both modes: the user's filter, alignment, dtype, ties."""
    if filter_fn is not None and not filter_fn(module, fqn):
        return SkipReason(SkipKind.FILTERED, "module_filter_fn")
    for name, size in zip(("in_features", "out_features"), features(module)):
        if size % ALIGN:
            return SkipReason(SkipKind.UNALIGNED, f"{name}={size} is not a multiple of {ALIGN}")
    weight = module.weight
    if weight.dtype not in FP8_WEIGHT_DTYPES:
        return SkipReason(
            SkipKind.DTYPE,
            f"weight dtype {weight.dtype} (torch._scaled_mm takes bfloat16, float16 or float32 layers)",
        )
    kind = is_conv1d(module)  # a tie is shared only by layers that use the weight alike
    others = [n for n, m in owners.get(id(weight), []) if not is_linear_like(m) or is_conv1d(m) != kind]
    if others:
        return SkipReason(SkipKind.TIED, f"weight is tied to {others[0]} (not a {'Conv1D' if kind else 'Linear'})")
    return None


def forward_skip_reason(module: nn.Module, scaling: str) -> Optional[SkipReason]:
    """A layer whose forward the conversion cannot run with `scaling`."""
    if is_conv1d(module):
        if type(module).forward is not conv1d_class().forward:
            return SkipReason(SkipKind.FORWARD, f"{type(module).__name__} overrides Conv1D.forward")
        if scaling != "dynamic":
            return SkipReason(
                SkipKind.FORWARD,
                f"scaling={scaling!r} is implemented for nn.Linear only; "
                "transformers Conv1D layers convert with scaling='dynamic'",
            )
    elif scaling != "dynamic" and overrides_linear_forward(module):
        return SkipReason(
            SkipKind.FORWARD,
            f"{type(module).__name__} overrides forward; scaling={scaling!r} needs nn.Linear.forward",
        )
    return None


SkipRule = Callable[[nn.Module, str, Owners], Optional[SkipReason]]


def linears_to_convert(model: nn.Module, skip_reason: SkipRule, make_weight) -> list[tuple[nn.Module, nn.Parameter]]:
    """(layer, its new weight) for every linear-like layer `skip_reason(layer, fqn, owners)`
    lets through (None). `make_weight(layer)` runs once per weight: tied layers get the same new
    Parameter. Every other layer gets a `Skipped` state, and one UserWarning (at the caller of
    `compile_fp8`) names those skipped for a reason the user did not choose.
    """
    owners = weight_owners(model)
    chosen, warned = [], []
    for fqn, module in model.named_modules():
        if not is_linear_like(module):
            continue
        reason = skip_reason(module, fqn, owners)
        if reason is None:
            chosen.append(module)
            continue
        set_layer_state(module, Skipped(reason))
        if reason.kind in WARNED_KINDS:
            warned.append((fqn, reason))
    _warn_skipped(warned)
    converted: dict[int, nn.Parameter] = {}  # id(original weight) -> its new Parameter
    for module in chosen:
        if id(module.weight) not in converted:
            converted[id(module.weight)] = make_weight(module)
    return [(module, converted[id(module.weight)]) for module in chosen]


def _warn_skipped(warned: Iterable[tuple[str, SkipReason]]) -> None:
    warned = list(warned)
    if not warned:
        return
    listed = ", ".join(f"{fqn or '<model>'} ({reason.detail})" for fqn, reason in warned)
    warnings.warn(
        f"compile_fp8: {len(warned)} linear layer(s) stay in high precision: {listed}",
        UserWarning,
        stacklevel=5,  # here <- linears_to_convert <- the converter <- compile_fp8 <- the user's line
    )


def apply_autocast(input: torch.Tensor) -> torch.Tensor:
    """F.linear's autocast cast, for the FP8 paths that run instead of F.linear (autocast acts
    below the hooks that bring us there): the GEMMs then write the autocast dtype, as the layer
    they replace would."""
    device = input.device.type
    if torch.is_autocast_enabled(device):
        return input.to(torch.get_autocast_dtype(device))
    return input


# ---- what every converted layer's scaling state does ----------------------------------------


@torch.no_grad()
def record_amax(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Calibration: `buffer` := max(buffer, max |value|), in place."""
    buffer.copy_(torch.maximum(buffer, amax(value.detach()).float()))


def fill_missing_buffers(module: nn.Module, state_dict: dict, prefix: str, names, consequence: str) -> None:
    """Load-state-dict pre-hook body: a checkpoint without some of the layer's scaling buffers
    (a plain one) loads, the missing ones zero, with a warning saying `consequence`."""
    absent = [n for n in names if prefix + n not in state_dict]
    for name in absent:
        state_dict[prefix + name] = torch.zeros_like(getattr(module, name))
    if absent:
        warnings.warn(
            f"compile_fp8: checkpoint has no {', '.join(absent)} for {prefix.rstrip('.') or 'the model'}: "
            f"{consequence}",
            UserWarning,
            stacklevel=3,
        )
