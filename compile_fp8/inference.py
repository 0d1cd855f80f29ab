"""FP8 inference: weights stored once as `Float8Tensor`, activations cast per call.

    model = compile_fp8(model, Float8Config(mode="inference"))            # tensorwise, dynamic
    model = compile_fp8(model, Float8Config(mode="inference", recipe="rowwise"))

Each eligible linear layer (the rules of training, `api.py`) gets, once, a frozen `Float8Tensor`
weight: e4m3 data [N, K] plus its float32 scale, one per tensor or one per output row. That is
1 byte per element instead of 2 (bf16): half the parameter bytes, and no per-step weight cast.
A plain nn.Linear becomes a `Float8InferenceLinear` whose forward reads the weight's data and
scale through two buffers that are the same tensors (cheap torch.compile guards, see the class);
Conv1D and nn.Linear subclasses get an instance `forward` instead. Either forward runs::

    M > weight_only_max_m (prefill):       the `_scaled_mm` path
        input_fp8  = saturate(input * input_scale).to(e4m3)    # [M, K], scale [] or [M, 1]
        output     = input_fp8 @ weight_fp8.T                   # [M, K] @ [K, N] -> [M, N]
                     (gemm.scaled_mm: row-major A, column-major B, fast accumulation)
    M <= weight_only_max_m (decode):       the weight-only path (`fp8_gemv.py`)
        output     = input @ (weight_fp8 / weight_scale).T      # dequantized in registers
    M <= weight_only_max_m, static scale:  the same kernel on float8 x (`fp8_gemv.fp8_small_mm`)
        input_fp8  = saturate(input * input_scale).to(e4m3)    # fused into x's producer
        output     = input_fp8 @ weight_fp8.T                   # float8 MMAs, both scales after
    both add the bias on the float32 accumulator, before the one rounding (as torchao does)

Recipes map to granularities: "tensorwise" casts weight and activation with one scale each;
"rowwise" (and "rowwise_with_gw_hp", whose output GEMM is the same) scales each weight row
(output channel) and each activation row (token). The activation scale is dynamic (this call's
amax) or, with `scaling="static"`, comes from `calibrate(model, batches)`: the buffer
`fp8_amax_input` holds the calibrated amax (saved in `state_dict()`), and the non-persistent
buffer `fp8_scale_input` the scale computed from it (and `amax_margin`) once, whenever the amax is
set (`refresh_ready`: after calibrate, load_state_dict, conversion), so the forward reads it and
runs no scale arithmetic (under torch.compile that was one scalar kernel per layer per call).
Uncalibrated layers run dynamic.

# [Note] Inference scales
The inference scales follow torchao's float8 inference (`Float8DynamicActivationFloat8-
WeightConfig`) so a user switching between the two gets the same numbers: the inverse scale is
`amax / finfo.max` computed in the tensor's own dtype (bf16 amax -> a bf16-rounded quotient),
then float32; `scale` (hp -> fp8, the package's direction) is its float64 reciprocal. Training
scales (`scaling.py`) divide `finfo.max / amax` in float64 instead, as torchao's training does.

Gradients: the weights are frozen (requires_grad=False; a weight set to require grad is an
error at the next forward). Backward still reaches the layer's input and bias, straight through
the activation cast, with the dequantized weight: `grad_input = grad_out @ dequant(weight)`.

A model trained with `compile_fp8` converts too: its master weights are quantized and its
training state (hooks, scaling buffers, forward) is dropped. Converting an inference model
again is an error. `state_dict()` holds the Float8Tensors (they load with
`torch.load(weights_only=True)`); `load_state_dict` takes such a checkpoint, or a plain
high-precision one, which it quantizes.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8_gemv, group
from .api import _skip_reason, linears_to_convert, training_weight
from .config import E4M3, Float8Config, recipe_spec
from .conv1d import is_conv1d
from .gemm import choose_emulate, scaled_mm
from .kernels import launch_statically
from .linear import CALIBRATING_ATTR, READY_ATTR, is_fp8_buffer
from .scaling import EPS, amax, saturated_cast
from .tensor import Float8Tensor

INFERENCE_ATTR = "_compile_fp8_inference"  # the layer's InferenceSpec
INNER_WEIGHT = ("fp8_weight_data", "fp8_weight_scale")  # Float8InferenceLinear's views of its weight
INPUT_AMAX = "fp8_amax_input"  # scaling="static": calibrated max |input|, float32 scalar
# scaling="static": the input scale of INPUT_AMAX (float32 scalar), kept by `refresh_ready`; not
# saved (non-persistent), and not an `is_fp8_buffer` (those are the checkpointed fp8_amax_*)
INPUT_SCALE = "fp8_scale_input"
_LOADED_ATTR = "_compile_fp8_loaded_keys"  # keys the load pre-hook took (see _load_weight)
# compile_fp8's training-state hooks on a layer trained with it (removed on conversion)
_TRAINING_HOOK_MODULES = ("compile_fp8.api", "compile_fp8.linear")


@dataclass(frozen=True)
class InferenceSpec:
    """What a converted layer runs: small, hashable, a constant to torch.compile."""

    granularity: str  # "tensorwise" or "rowwise"
    scaling: str  # "dynamic" or "static"
    weight_only_max_m: int
    emulate: bool
    amax_margin: float = 1.0


# ---- scales and quantization (see [Note] Inference scales) ----------------------------------


def inference_scale(hp: torch.Tensor, granularity: str) -> torch.Tensor:
    """float32 hp -> fp8 scale of `hp`: [] (tensorwise) or one per row, [..., 1] (rowwise)."""
    return inverse_to_scale(amax(hp, -1 if granularity == "rowwise" else None))


def inverse_to_scale(amax_hp: torch.Tensor) -> torch.Tensor:
    """`1 / (amax / finfo.max)`: the quotient rounded to amax's dtype (torchao's), the
    reciprocal in float64 so eager and inductor round it alike."""
    fmax = torch.finfo(E4M3).max
    inv_scale = _round_like_eager(amax_hp.to(torch.float32) / fmax, amax_hp.dtype)
    inv_scale = inv_scale.clamp(min=EPS / fmax)  # an all-zero tensor: a finite scale
    return (1.0 / inv_scale.to(torch.float64)).to(torch.float32)


def _round_like_eager(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `x` rounded to `dtype` (eager's `bf16 / float` result), as float32.

    Inductor computes bf16 arithmetic in float32 and may drop a `.to(bf16).to(float32)` round
    trip, so bf16 is rounded on the bits (to nearest, ties to even: what the cast does); then
    eager == compile. Other dtypes use the casts (float16: inductor may keep float32 there).
    """
    if dtype == torch.float32:
        return x
    if dtype != torch.bfloat16:
        return x.to(dtype).to(torch.float32)
    bits = x.view(torch.int32)  # positive finite values: bf16 keeps the top 16 bits
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -0x10000
    return bits.view(torch.float32)


def quantize_weight(hp: torch.Tensor, granularity: str, transposed: bool = False) -> Float8Tensor:
    """A Float8Tensor of `hp` [N, K] (or, `transposed`, of a Conv1D's [K, N], stored as the
    transpose of a row-major [N, K], so rowwise scales still run per output channel)."""
    with torch.no_grad():
        if transposed:
            return quantize_weight(hp.t(), granularity).t()
        return Float8Tensor.from_hp(hp, granularity=granularity, scale=inference_scale(hp, granularity))


def parameter_bytes(module: nn.Module) -> int:
    """Bytes the parameters of `module` take: a Float8Tensor (or any traceable tensor subclass,
    e.g. torchao's) counts its inner tensors (float8 data and scale). Shared ones count once."""
    seen = {id(p): p for p in module.parameters()}
    return sum(_tensor_bytes(p) for p in seen.values())


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


# ---- the forward ----------------------------------------------------------------------------


def linear_forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward of a converted layer: weight [N, K] Float8Tensor."""
    weight = _frozen_weight(module)
    return _fp8_linear(module, input, weight.fp8_data, weight.scale)


def _inner_forward(module: "Float8InferenceLinear", input: torch.Tensor) -> torch.Tensor:
    """Float8InferenceLinear.forward: the weight's float8 data and scale read from the layer's
    INNER_WEIGHT buffers (the same tensors, `_bind_inner`). Eager calls check the weight first
    (frozen, still the buffers' tensors); compiled graphs read only the buffers, so
    torch.compile guards two plain tensors per layer instead of a tensor subclass."""
    if not torch.compiler.is_compiling():
        if module._buffers.get(INNER_WEIGHT[0]) is not _frozen_weight(module).fp8_data:
            _bind_inner(module)  # the weight was replaced behind nn.Module's back
    data, scale = (getattr(module, name) for name in INNER_WEIGHT)
    return _fp8_linear(module, input, data, scale)


def _bind_inner(module: nn.Module) -> None:
    """Point the INNER_WEIGHT buffers at the weight's float8 data and scale (no copy); a weight
    that is no Float8Tensor any more leaves none (the forward then says what happened)."""
    weight = module._parameters.get("weight")
    for name, inner in zip(INNER_WEIGHT, ("fp8_data", "scale")):
        if isinstance(weight, Float8Tensor):
            module._buffers[name] = getattr(weight, inner)
            module._non_persistent_buffers_set.add(name)
        else:
            module._buffers.pop(name, None)


def conv1d_forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """transformers Conv1D.forward of a converted layer: weight [K, N] = a transposed [N, K]."""
    weight = _frozen_weight(module)
    # .t() of the stored [K, N] view: the row-major [N, K] data and its [N, 1] (or []) scale
    return _fp8_linear(module, input, weight.fp8_data.t(), weight.scale.t())


def _frozen_weight(module) -> Float8Tensor:
    weight = module.weight
    if not isinstance(weight, Float8Tensor):
        raise RuntimeError(
            f"compile_fp8: {module!r} was converted for FP8 inference, then its weight was replaced "
            f"by a {type(weight).__name__}; convert the model once its weights are in place"
        )
    if weight.requires_grad:
        raise RuntimeError(
            f"compile_fp8: the FP8 inference weight of {module!r} requires grad, but inference "
            "weights are frozen float8 data (gradients reach the input, never the weight). "
            "Train with Float8Config(mode='training'), or call weight.requires_grad_(False)"
        )
    return weight


def _fp8_linear(module, input, weight_fp8, weight_scale):
    spec: InferenceSpec = getattr(module, INFERENCE_ATTR)
    if spec.scaling == "static" and getattr(module, CALIBRATING_ATTR):
        return _calibrating_forward(module, input, weight_fp8, weight_scale)
    input = _autocast(input)
    input_scale = _static_input_scale(module, spec)
    x = input.reshape(-1, input.shape[-1])  # [*, K] -> [M, K]
    bias = module.bias
    out = _InferenceLinearFn.apply(x, weight_fp8, weight_scale, bias, input_scale, spec)
    return out.reshape(*input.shape[:-1], out.shape[-1])  # [M, N] -> [*, N]


def _autocast(input):
    """F.linear's autocast: this forward replaces F.linear, so it applies the cast itself."""
    device = input.device.type
    if torch.is_autocast_enabled(device):
        return input.to(torch.get_autocast_dtype(device))
    return input


def _static_input_scale(module, spec: InferenceSpec) -> Optional[torch.Tensor]:
    """The static layer's input scale: its INPUT_SCALE buffer itself (computed when the amax was
    set, see `refresh_ready`; no arithmetic here), or None for dynamic."""
    if spec.scaling != "static" or not getattr(module, READY_ATTR):
        return None  # dynamic (an uncalibrated static layer too: never a NaN from an unset scale)
    return getattr(module, INPUT_SCALE)


def _scale_of_amax(stored: torch.Tensor, spec: InferenceSpec) -> torch.Tensor:
    """The input scale of a stored amax (with the spec's margin): float32, amax's shape."""
    return inverse_to_scale(stored * spec.amax_margin if spec.amax_margin != 1.0 else stored)


def fp8_linear_2d(x, weight_fp8, weight_scale, bias, input_scale, spec: InferenceSpec) -> torch.Tensor:
    """[M, K] @ [K, N] + bias -> [M, N] in x's dtype, by the path M chooses (module docstring)."""
    small_m = x.shape[0] <= spec.weight_only_max_m
    if small_m and not (_float8_x_at_small_m(input_scale) and fp8_gemv.triton_available(x.device)):
        return fp8_gemv.weight_only_linear(x, weight_fp8, weight_scale, bias)  # bias in its epilogue
    if input_scale is None:
        input_scale = inference_scale(x, spec.granularity)  # [] or [M, 1]
    x_fp8 = saturated_cast(x, input_scale, E4M3)
    if small_m:  # our kernel, float8 x float8
        return fp8_gemv.fp8_small_m_linear(x_fp8, input_scale, weight_fp8, weight_scale, bias, x.dtype)
    # weight [N, K] row-major -> B = weight.T [K, N], column-major: no copy; scale [N, 1] -> [1, N]
    # bias on the float32 accumulator in the GEMM's epilogue (one rounding), as torchao does
    return scaled_mm(
        x_fp8, input_scale, weight_fp8.t(), weight_scale.t(), x.dtype,
        use_fast_accum=True, emulate=spec.emulate, bias=bias,
    )  # fmt: skip


def _float8_x_at_small_m(input_scale: Optional[torch.Tensor]) -> bool:
    """Small M: cast x to float8 (else weight-only)? `fp8_gemv.SMALL_M_ACTIVATION`; "auto": where
    the scale is static (calibrated), so the cast costs no amax pass."""
    choice = fp8_gemv.small_m_activation()
    return choice == "fp8" or (choice == "auto" and input_scale is not None)


class _InferenceLinearFn(torch.autograd.Function):
    """The FP8 output GEMM plus bias; backward: straight through the activation cast."""

    @staticmethod
    def forward(ctx, x, weight_fp8, weight_scale, bias, input_scale, spec):
        ctx.save_for_backward(weight_fp8, weight_scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return fp8_linear_2d(x, weight_fp8, weight_scale, bias, input_scale, spec)

    @staticmethod
    def backward(ctx, grad_out):
        weight_fp8, weight_scale = ctx.saved_tensors
        weight_hp = (weight_fp8.to(torch.float32) / weight_scale).to(grad_out.dtype)  # [N, K]
        grad_input = grad_out @ weight_hp  # [M, N] @ [N, K] -> [M, K]
        grad_bias = None if ctx.bias_dtype is None else grad_out.sum(0).to(ctx.bias_dtype)
        return grad_input, None, None, grad_bias, None, None


def _calibrating_forward(module, input, weight_fp8, weight_scale):
    """`calibrate`: high precision (the dequantized weight), recording the running max |input|."""
    buffer = getattr(module, INPUT_AMAX)
    buffer.copy_(torch.maximum(buffer, amax(input.detach()).float()))
    weight_hp = (weight_fp8.to(torch.float32) / weight_scale).to(input.dtype)  # [N, K]
    return F.linear(input, weight_hp, module.bias)


def refresh_ready(module: nn.Module) -> bool:
    """After the input amax changed (calibrate, load_state_dict; by hand: call this too): the
    layer is ready once the amax is non-zero, and its INPUT_SCALE is recomputed."""
    _update_input_scale(module)
    ready = bool(getattr(module, INPUT_AMAX) > 0)
    setattr(module, READY_ATTR, ready)
    return ready


@torch.no_grad()
def _update_input_scale(module: nn.Module) -> None:
    """INPUT_SCALE := the scale of INPUT_AMAX, in place (compiled graphs and CUDA graphs that
    captured the buffer read the new value); a new buffer only where the amax moved to another
    device or dtype (e.g. load_state_dict(assign=True) into a model built on meta)."""
    scale = _scale_of_amax(getattr(module, INPUT_AMAX), getattr(module, INFERENCE_ATTR))
    current = module._buffers.get(INPUT_SCALE)
    same = current is not None and (current.device, current.dtype, current.shape) == (
        scale.device, scale.dtype, scale.shape,
    )  # fmt: skip
    if same and not current.is_meta:
        current.copy_(scale)
    else:
        module.register_buffer(INPUT_SCALE, scale, persistent=False)


def is_static_layer(module: nn.Module) -> bool:
    spec = getattr(module, INFERENCE_ATTR, None)
    return spec is not None and spec.scaling == "static"


# ---- conversion -----------------------------------------------------------------------------


def convert_for_inference(model: nn.Module, config: Float8Config, module_filter_fn) -> None:
    """Replace every eligible layer's weight by a Float8Tensor, in place (module docstring)."""
    granularity = recipe_spec(config.recipe).output.b.granularity
    launch_statically()  # the weight-only kernel (decode) is a user-defined Triton kernel
    if not group.install():  # the decode passes; each checks its switch when it runs
        warnings.warn(
            "compile_fp8: torch._inductor.config.pre_grad_custom_pass is already set, so sibling "
            "small-M linears are not grouped into one launch (compile_fp8.group); the model runs "
            "correctly, each linear in its own launch",
            stacklevel=3,
        )
    layers = linears_to_convert(
        model,
        lambda module, fqn, owners: _inference_skip_reason(module, fqn, owners, module_filter_fn, config),
        lambda module: nn.Parameter(
            quantize_weight(_master_weight(module.weight), granularity, transposed=is_conv1d(module)),
            requires_grad=False,
        ),
    )
    for module, weight in layers:
        spec = InferenceSpec(
            granularity, config.scaling, config.weight_only_max_m,
            choose_emulate(module.weight.device, config.emulate), config.amax_margin,
        )  # fmt: skip
        _drop_training_state(module)
        module.weight = weight
        _attach(module, spec)


def _inference_skip_reason(module, fqn, owners, module_filter_fn, config) -> Optional[str]:
    if hasattr(module.weight, "_local_tensor"):
        return "skipped: weight is a DTensor (FSDP2 / tensor parallel); convert the unsharded model"
    reason = _skip_reason(module, fqn, owners, module_filter_fn, config)
    if reason is None and isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return (
            f"skipped: {type(module).__name__} overrides forward; mode='inference' replaces "
            "nn.Linear.forward"
        )
    return reason


def _master_weight(weight: nn.Parameter) -> torch.Tensor:
    """The high-precision weight: a plain Parameter's data, or a trained model's master."""
    trained = training_weight(weight)
    return (trained.hp if trained is not None else weight).detach()


def _drop_training_state(module: nn.Module) -> None:
    """Undo what a training conversion attached (a layer trained with compile_fp8)."""
    hook_dicts = (
        module._state_dict_hooks, module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks,
    )  # fmt: skip
    for hooks in hook_dicts:
        for handle_id, hook in list(hooks.items()):
            fn = getattr(hook, "hook", hook)  # pre-hooks are wrapped (_WrappedHook)
            if getattr(fn, "__module__", None) in _TRAINING_HOOK_MODULES:
                del hooks[handle_id]
    for name in [n for n in module._buffers if is_fp8_buffer(n) or n == INPUT_SCALE]:
        del module._buffers[name]
        module._non_persistent_buffers_set.discard(name)
    for name in ("_compile_fp8_recipe", "_fp8_config", READY_ATTR, CALIBRATING_ATTR, "forward"):
        module.__dict__.pop(name, None)


class Float8InferenceLinear(nn.Linear):
    """The class of a converted plain `nn.Linear` (Conv1D and nn.Linear subclasses keep their
    class and get a per-instance `forward` instead).

    Why a class, and the INNER_WEIGHT buffers: torch.compile checks its guards on every call, on
    the CPU, before the compiled graph runs. A per-instance forward (a `functools.partial`) adds
    ~6 guards per layer, and a Float8Tensor weight ~10 (the subclass, its metadata, then its
    two tensors), where a bf16 weight has one; AOTAutograd then unwraps every subclass input on
    every call too. That made a compiled 16 x 1 decode step of the 956M model host-bound on the
    H200 (~0.9 ms of CPU per call, against 0.2 ms for bf16; docs/inference.md, "Host overhead").
    The forward reads the weight's float8 data and scale from two non-persistent buffers that
    are the very same tensors (no copy, not in `state_dict`), re-pointed whenever the weight is
    replaced (`weight = ...`, `load_state_dict(assign=True)`, `.to()`, unpickling). Importable
    by name, so deepcopy and pickling keep it."""

    forward = _inner_forward

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "weight":
            _bind_inner(self)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # converts the weight and the buffers separately
        _bind_inner(self)  # ... so the buffers are the converted weight's tensors again
        return out

    def __setstate__(self, state):  # unpickled: the weight's tensors were rebuilt on their own
        super().__setstate__(state)
        _bind_inner(self)


def _attach(module: nn.Module, spec: InferenceSpec) -> None:
    setattr(module, INFERENCE_ATTR, spec)
    if type(module) is nn.Linear:
        module.__class__ = Float8InferenceLinear
        _bind_inner(module)
    else:  # Conv1D, or a subclass of nn.Linear: its other methods stay
        forward = conv1d_forward if is_conv1d(module) else linear_forward
        module.forward = functools.partial(forward, module)  # deepcopy / pickle keep it bound
    if spec.scaling == "static":
        zeros = torch.zeros((), dtype=torch.float32, device=module.weight.device)
        module.register_buffer(INPUT_AMAX, zeros)
        _update_input_scale(module)  # of amax 0: unused until calibrated (works on meta too)
        setattr(module, READY_ATTR, False)
        setattr(module, CALIBRATING_ATTR, False)
    module._register_load_state_dict_pre_hook(_load_weight, with_module=True)
    module.register_load_state_dict_post_hook(_after_load)


def check_not_inference_model(model: nn.Module, mode: str) -> None:
    """A model holding FP8 inference weights cannot be converted again (either mode)."""
    frozen = [n for n, p in model.named_parameters() if isinstance(p, Float8Tensor)]
    if frozen:
        again = "converted for inference twice" if mode == "inference" else "trained"
        raise ValueError(
            f"model already holds FP8 inference weights ({len(frozen)}, e.g. {frozen[0]!r}) from "
            f"compile_fp8(model, Float8Config(mode='inference')); it cannot be {again}: convert "
            "the high-precision (or compile_fp8-trained) model once"
        )


def describe(module: nn.Module) -> str:
    """fp8_layers' text for a converted layer, e.g. "fp8 rowwise inference dynamic"."""
    spec: InferenceSpec = getattr(module, INFERENCE_ATTR)
    if not isinstance(module.weight, Float8Tensor):
        return (
            "skipped: weight replaced by a plain tensor after conversion (e.g. `module.weight = "
            "...`); convert the model once its weights are in place"
        )
    scaling = spec.scaling
    if scaling == "static" and not getattr(module, READY_ATTR):
        scaling += " (uncalibrated: dynamic until calibrate())"
    path = " (emulated)" if spec.emulate else ""
    return f"fp8 {spec.granularity} inference {scaling}{path}"


# ---- checkpoints ----------------------------------------------------------------------------


def _load_weight(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """`load_state_dict`: take the weight entry here (nn.Module would `copy_` into the
    Float8Tensor, which has no copy_): a Float8Tensor checkpoint, or a plain one, quantized."""
    spec: InferenceSpec = getattr(module, INFERENCE_ATTR)
    _fill_missing_amax(module, state_dict, prefix, spec)
    key = prefix + "weight"
    if key not in state_dict or not isinstance(module.weight, Float8Tensor):
        return
    value = state_dict.pop(key)
    setattr(module, _LOADED_ATTR, key)  # _after_load takes it off the missing keys
    loaded, why_not = _as_frozen_weight(value, module, spec)
    if why_not:
        errors.append(f"compile_fp8: {key}: {why_not}")
    elif local_metadata.get("assign_to_params_buffers", False) or module.weight.is_meta:
        module.weight = nn.Parameter(loaded, requires_grad=False)
    else:
        with torch.no_grad():  # in place: ties and compiled graphs keep the same tensors
            module.weight.fp8_data.copy_(loaded.fp8_data)
            module.weight.scale.copy_(loaded.scale)


def _as_frozen_weight(value, module, spec: InferenceSpec):
    """(Float8Tensor like module.weight, None) or (None, why it does not fit)."""
    weight = module.weight
    if tuple(value.shape) != tuple(weight.shape):
        return None, f"shape {list(value.shape)} in the checkpoint, {list(weight.shape)} in the model"
    if not isinstance(value, Float8Tensor):
        return quantize_weight(value.to(weight.device), spec.granularity, is_conv1d(module)), None
    if value.fp8_data.dtype != weight.fp8_data.dtype or value.scale.shape != weight.scale.shape:
        return None, (
            f"the checkpoint holds a {value.granularity} {value.fp8_data.dtype} FP8 weight, the "
            f"model a {weight.granularity} {weight.fp8_data.dtype} one: convert with the recipe "
            "the checkpoint was saved with"
        )
    return value, None


def _fill_missing_amax(module, state_dict, prefix, spec):
    if spec.scaling != "static" or prefix + INPUT_AMAX in state_dict:
        return
    state_dict[prefix + INPUT_AMAX] = torch.zeros_like(getattr(module, INPUT_AMAX))
    warnings.warn(
        f"compile_fp8: checkpoint has no {INPUT_AMAX} for {prefix.rstrip('.') or 'the model'}: "
        "its static input scale is uncalibrated (dynamic until calibrate(model, batches))",
        UserWarning,
        stacklevel=2,
    )


def _after_load(module, incompatible_keys):
    key = module.__dict__.pop(_LOADED_ATTR, None)
    if key in incompatible_keys.missing_keys:
        incompatible_keys.missing_keys.remove(key)
    if is_static_layer(module):
        refresh_ready(module)
