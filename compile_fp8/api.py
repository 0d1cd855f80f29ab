"""The public entry points: `compile_fp8(model)` and `fp8_layers(model)`.

`compile_fp8` walks the model once and, for every eligible `nn.Linear` (subclasses too), swaps
`linear.weight` for a `Float8TrainingWeight` Parameter holding the same master tensor. Module
classes, parameter names and `state_dict()` keys do not change. A linear stays in high precision,
with its reason recorded for `fp8_layers`, when

* `module_filter_fn(module, fqn)` says no;
* `in_features` or `out_features` is not a multiple of 16 (`_scaled_mm` cannot take it; one
  UserWarning per conversion names all such layers);
* its weight is not floating point, or is shared with a module that is not a Linear (a weight
  shared by several Linears is converted once, for all of them: ties stay ties).
* `Float8Config(layer_filter="auto")` and FP8 ran slower than bf16 at its shape on the H200
  (`layer_choice.py`; the default "all" converts every other layer).

transformers' `Conv1D` (GPT-2's projections: a linear layer with its weight stored [in, out]) is
converted the same way, with dynamic scaling (`conv1d.py`).

Then it returns `torch.compile(model, **compile_kwargs)` (or the model, with `compile=False`).

The model may then be sharded with FSDP2 (`fully_shard`): a weight is then a DTensor whose local
shard is the training weight; `fp8_layers`, the checkpoint hooks and
`precompute_float8_dynamic_scale_for_fsdp` look through it (see fsdp.py).
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .config import Float8Config, recipe_spec
from .conv1d import conv1d_skip_reason, features, is_conv1d, is_linear_like, use_fp8_forward
from .fsdp import (
    NEXT_AMAX_ATTR,
    all_reduce_max,
    forget_amaxes,
    gather_description,
    gathers_fp8,
    local_amax,
)
from .gemm import ALIGN
from .kernels import launch_statically
from .layer_choice import SKIP_PREFIX, slow_layer_reason
from .linear import (
    attach_scaling_state,
    check_scaling_config,
    describe_scaling,
    is_fp8_buffer,
)
from .weight import Float8TrainingWeight

logger = logging.getLogger("compile_fp8")

SKIP_ATTR = "_compile_fp8_skip_reason"
RECIPE_ATTR = "_compile_fp8_recipe"  # (RecipeSpec, emulate request) of a converted layer
FilterFn = Callable[[nn.Module, str], bool]


def compile_fp8(
    model: nn.Module,
    config: Optional[Float8Config] = None,
    *,
    module_filter_fn: Optional[FilterFn] = None,
    compile: bool = True,
    **compile_kwargs,
) -> nn.Module:
    """Convert `model`'s linear layers to FP8, in place, and torch.compile it: FP8 training, or
    with `Float8Config(mode="inference")` frozen float8 weights (`inference.py`).

    Returns `torch.compile(model, **compile_kwargs)`, or the converted model if `compile=False`
    (for FSDP2, activation checkpointing or your own compile call). See `fp8_layers` for what
    happened to each layer.
    """
    config = _check_args(model, config, module_filter_fn)
    if config.mode == "inference":
        from .inference import convert_for_inference  # lazy: inference.py builds on this module

        convert_for_inference(model, config, module_filter_fn)
    else:
        _convert_linears(model, config, module_filter_fn)
    return torch.compile(model, **compile_kwargs) if compile else model


def fp8_layers(model: nn.Module) -> dict[str, str]:
    """For every nn.Linear (by fqn in the unwrapped model): its FP8 recipe, or why it is skipped.

    Under FSDP2 the recipe is followed by what its all-gather moves, e.g.
    "fp8 rowwise dynamic (FSDP all-gather in bf16)".
    """
    model = unwrap_compiled(model)
    gather_dtypes = _fsdp_param_dtypes(model)
    report = {}
    for fqn, module in model.named_modules():
        if is_linear_like(module):
            report[fqn] = _describe(module, gather_dtypes)
    return report


@torch.no_grad()
def precompute_float8_dynamic_scale_for_fsdp(model: nn.Module) -> None:
    """FSDP2: every FP8-gathered weight's amax in one all-reduce, for the next forward.

    Call it right after `opt.step()` (as torchao's function of the same name). Without it each
    weight all-reduces its own amax when it is gathered; the scales are the same either way.
    """
    weights = [w for w in _sharded_weights(unwrap_compiled(model)) if gathers_fp8(w[1]._recipe)]
    if not weights:
        return
    by_mesh: dict = {}  # one collective per mesh (FSDP applied to every module with one mesh: one)
    for mesh, weight in weights:
        by_mesh.setdefault(mesh, []).append(weight)
    for mesh, group in by_mesh.items():
        amaxes = all_reduce_max(torch.stack([local_amax(w._hp) for w in group]), mesh)
        for weight, amax in zip(group, amaxes):
            setattr(weight, NEXT_AMAX_ATTR, amax)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside `torch.compile(module)` (`_orig_mod`), or `model` itself."""
    return getattr(model, "_orig_mod", model)


def plain_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` without the static/delayed scaling buffers (`fp8_amax_*`): the
    checkpoint the unconverted model has, for `load_state_dict(strict=True)` anywhere."""
    state = unwrap_compiled(model).state_dict()
    return {k: v for k, v in state.items() if not is_fp8_buffer(k)}


def _describe(module: nn.Linear, gather_dtypes: dict) -> str:
    if getattr(module, "_compile_fp8_inference", None) is not None:
        from .inference import describe  # lazy: inference.py builds on this module

        return describe(module)
    weight = training_weight(module.weight)
    if weight is None and getattr(module, RECIPE_ATTR, None) is not None:
        return (
            "skipped: weight replaced by a plain tensor after conversion (e.g. `module.weight = "
            "...`); convert the model once its weights are in place"
        )
    if weight is None:
        return getattr(module, SKIP_ATTR, "skipped: not converted (compile_fp8 was not called on it)")
    text = weight.describe(describe_scaling(module))
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        text += f" ({type(module).__name__} overrides forward: FP8 only where it calls F.linear)"
    if weight is not module.weight:  # an FSDP2 shard
        dtype = gather_dtypes.get(id(module.weight)) or weight.dtype
        text += " " + gather_description(weight._recipe, dtype)
    return text


def training_weight(param) -> Optional[Float8TrainingWeight]:
    """The training weight behind `param`: itself, or (FSDP2) its DTensor's local shard."""
    local = getattr(param, "_local_tensor", param)  # a DTensor holds this rank's shard there
    return local if isinstance(local, Float8TrainingWeight) else None


def _sharded_weights(model: nn.Module) -> list:
    """(FSDP's 1-D shard mesh, local training weight) of every FSDP2-sharded FP8 weight."""
    found = []
    for param in model.parameters():
        weight = training_weight(param)
        if weight is not None and weight is not param:
            mesh = param.device_mesh
            found.append((mesh if mesh.ndim == 1 else mesh[mesh.mesh_dim_names[-1]], weight))
    return found


def _fsdp_param_dtypes(model: nn.Module) -> dict:
    """id(sharded parameter) -> FSDP's all-gather dtype (mp_policy.param_dtype), where set.

    FSDP2 has no public getter for its mixed-precision policy: this reads its module state and
    returns {} if that changes (fp8_layers then names the master weight's dtype).
    """
    dtypes = {}
    for module in model.modules():
        try:
            group = module._get_fsdp_state()._fsdp_param_group
            for fsdp_param in group.fsdp_params if group is not None else ():
                dtypes[id(fsdp_param.sharded_param)] = group.mp_policy.param_dtype
        except AttributeError:
            continue
    return dtypes


# ---- argument checks ------------------------------------------------------------------------


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
    from .inference import check_not_inference_model  # lazy: inference.py builds on this module

    check_not_inference_model(model, config.mode)
    converted = [n for n, p in model.named_parameters() if training_weight(p) is not None]
    if converted and config.mode == "training":  # inference quantizes a trained model's masters
        raise ValueError(
            f"model is already converted by compile_fp8 ({len(converted)} FP8 weights, e.g. "
            f"{converted[0]!r}); call compile_fp8 once, on the plain model"
        )
    return config


# ---- conversion ---------------------------------------------------------------------------


def _convert_linears(model: nn.Module, config: Float8Config, module_filter_fn) -> None:
    recipe = recipe_spec(config.recipe, dual_cast=config.cast_kernels == "triton")
    if config.cast_kernels == "triton":
        launch_statically()
    layers = linears_to_convert(
        model,
        lambda module, fqn, owners: _skip_reason(module, fqn, owners, module_filter_fn, config),
        lambda module: _to_training_weight(module.weight, recipe, config.emulate),
    )
    for module, weight in layers:
        module.weight = weight
        _add_state_dict_hooks(module, (recipe, config.emulate))
        if is_conv1d(module):
            use_fp8_forward(module)
        if config.scaling != "dynamic":
            attach_scaling_state(module, config)
    logger.info("compile_fp8: %d FP8 weight(s), recipe %s", len({id(w) for _, w in layers}), config.recipe)
    if config.layer_filter == "auto":
        slow = [fqn for fqn, m in model.named_modules() if getattr(m, SKIP_ATTR, "").startswith(SKIP_PREFIX)]
        logger.info("compile_fp8: layer_filter='auto' keeps %d layer(s) in high precision, FP8 being slower "
                    "at their shapes (fp8_layers(model) gives each one's measured ratio): %s",
                    len(slow), ", ".join(slow[:8]) + (", ..." if len(slow) > 8 else "") or "none")  # fmt: skip
    if config.scaling == "static" and layers:
        warnings.warn(
            "compile_fp8: scaling='static' layers run with dynamic scaling until you call "
            "calibrate(model, batches)",
            UserWarning,
            stacklevel=3,
        )


def linears_to_convert(model: nn.Module, skip_reason, make_weight) -> list[tuple[nn.Module, nn.Parameter]]:
    """(layer, its new weight) for every linear-like layer that `skip_reason(layer, fqn, owners)`
    lets through (None); `owners` maps id(parameter) to every (fqn, module) holding it.
    `make_weight(layer)` runs once per weight: tied layers get the same new Parameter.

    Every other layer keeps its reason for `fp8_layers`; one UserWarning (pointing at the caller of
    `compile_fp8`) names the layers whose dimensions `_scaled_mm` cannot take.
    """
    owners = _weight_owners(model)
    chosen, unaligned = [], []
    for fqn, module in model.named_modules():
        if not is_linear_like(module):
            continue
        reason = skip_reason(module, fqn, owners)
        if reason is None:
            chosen.append(module)
            continue
        setattr(module, SKIP_ATTR, reason)
        if "multiple of" in reason:
            unaligned.append(f"{fqn} ({reason[len('skipped: '):]})")
    if unaligned:
        warnings.warn(
            f"compile_fp8: {len(unaligned)} linear layer(s) stay in high precision because "
            f"torch._scaled_mm needs dimensions that are multiples of {ALIGN}: "
            + ", ".join(unaligned),
            UserWarning,
            stacklevel=4,  # here <- the converter <- compile_fp8 <- the user's line
        )
    converted: dict[int, nn.Parameter] = {}  # id(original weight) -> its new Parameter
    for module in chosen:
        if id(module.weight) not in converted:
            converted[id(module.weight)] = make_weight(module)
    return [(module, converted[id(module.weight)]) for module in chosen]


def _to_training_weight(weight: nn.Parameter, recipe, emulate) -> nn.Parameter:
    wrapped = Float8TrainingWeight(weight.detach(), recipe, emulate)
    return nn.Parameter(wrapped, requires_grad=weight.requires_grad)


def _weight_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> every (fqn, module) holding it directly (ties show up as several)."""
    owners: dict[int, list] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((f"{fqn}.{name}".lstrip("."), module))
    return owners


def _skip_reason(module: nn.Module, fqn, owners, module_filter_fn, config) -> Optional[str]:
    if module_filter_fn is not None and not module_filter_fn(module, fqn):
        return "skipped: module_filter_fn"
    for name, size in zip(("in_features", "out_features"), features(module)):
        if size % ALIGN:
            return f"skipped: {name}={size} is not a multiple of {ALIGN}"
    weight = module.weight
    if not weight.is_floating_point():
        return f"skipped: weight dtype {weight.dtype} is not floating point"
    kind = is_conv1d(module)  # a tie is shared only by layers that use the weight alike
    others = [n for n, m in owners.get(id(weight), []) if not is_linear_like(m) or is_conv1d(m) != kind]
    if others:
        return f"skipped: weight is tied to {others[0]} (not a {'Conv1D' if kind else 'Linear'})"
    if config.layer_filter == "auto":
        slow = slow_layer_reason(*features(module), config.recipe)
        if slow:
            return slow
    if kind:
        return conv1d_skip_reason(module, config.scaling)
    why_not = check_scaling_config(config, module)
    if why_not:
        return f"skipped: {why_not}; scaling={config.scaling!r} needs nn.Linear.forward"
    return None


# ---- checkpoints --------------------------------------------------------------------------


def _add_state_dict_hooks(module: nn.Linear, recipe_and_emulate) -> None:
    if getattr(module, RECIPE_ATTR, None) is not None:
        return  # a module reached twice (shared submodule)
    setattr(module, RECIPE_ATTR, recipe_and_emulate)
    module.register_state_dict_post_hook(_plain_weight_in_state_dict)
    module.register_load_state_dict_post_hook(_rewrap_after_assign)


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
    state_dict[key] = weight._hp if weight is value else _with_local(value, weight._hp)


def _rewrap_after_assign(module, incompatible_keys):
    """`load_state_dict(..., assign=True)` replaces the Parameter: make it FP8 again.

    Under FSDP2 the local shard is re-wrapped inside its DTensor; any amax remembered for the
    next all-gather is forgotten (the weight just changed)."""
    param = module.weight
    weight = training_weight(param)
    if weight is not None:
        forget_amaxes(weight)
    elif hasattr(param, "_local_tensor"):
        local = _to_training_weight(param._local_tensor, *getattr(module, RECIPE_ATTR))
        module.weight = nn.Parameter(_with_local(param, local.data), requires_grad=param.requires_grad)
    else:
        module.weight = _to_training_weight(param, *getattr(module, RECIPE_ATTR))


def _with_local(dtensor, local: torch.Tensor):
    """A DTensor like `dtensor` (mesh, placements, global shape) holding `local` as its shard."""
    from torch.distributed.tensor import DTensor  # lazy: only FSDP2 users have DTensors

    return DTensor.from_local(
        local, dtensor.device_mesh, dtensor.placements, run_check=False,
        shape=dtensor.shape, stride=dtensor.stride(),
    ).detach()  # fmt: skip
