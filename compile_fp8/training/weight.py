"""The training weight: a Parameter that keeps the high-precision master weight and runs FP8.

After conversion `linear.weight` is a `Float8TrainingWeight`: a wrapper subclass around the
master weight (fp32 or bf16, whatever the model had). It changes exactly one thing:

* `F.linear(input, weight, bias)` (what `nn.Linear.forward` calls) is caught in
  `__torch_function__` and runs `autograd.Float8LinearFn`, the three FP8 GEMMs.

Everything else sees the master weight: `__torch_dispatch__` unwraps every other op, so the
optimizer (SGD, AdamW foreach/fused) updates it in place, `weight * 2` is a plain tensor, and
`state_dict()` (through a hook of `convert.py`) stores the plain tensor under the original key. A
few ops keep the wrapper, so that `param.detach()`, `.data`, `copy.deepcopy` and `.to(device)`
return a training weight again.

Mutable scaling state (static scales, amax histories) must not live inside this subclass:
mutating a subclass's inner tensor in a compiled region is broken in torch. It goes to module
buffers instead.

Under FSDP2 (`fully_shard`) each rank's shard is a training weight too (inside a DTensor), and
its `fsdp_pre_all_gather` / `fsdp_post_all_gather` decide what is all-gathered: float8 bytes
for tensorwise, the high-precision shard otherwise (`fsdp.py`).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

from ..config import RecipeSpec
from ..gemm import choose_emulate
from ..tensor import wrapper_like
from .fsdp import (
    check_fsdp_module,
    fp8_gathered_weight,
    fp8_shard,
    gather_amax,
    gathers_fp8,
    pad_rows,
    padded_rows,
)
from .linear_fn import float8_linear, route_linear


class Float8TrainingWeight(torch.Tensor):
    """A master weight whose `F.linear` runs in FP8 with `recipe`."""

    _hp: torch.Tensor
    _recipe: RecipeSpec
    _emulate_request: bool | None
    _emulate: bool

    @staticmethod
    def __new__(cls, hp: torch.Tensor, recipe: RecipeSpec, emulate_request: bool | None = None):
        return wrapper_like(cls, hp, hp.dtype, hp.requires_grad)

    def __init__(self, hp: torch.Tensor, recipe: RecipeSpec, emulate_request: bool | None = None):
        assert not isinstance(hp, Float8TrainingWeight)
        self._hp = hp
        self._recipe = recipe
        self._emulate_request = emulate_request
        # resolved here, eagerly, so compiled code sees a constant (and `.to(device)` re-resolves)
        self._emulate = choose_emulate(hp.device, emulate_request)

    def __repr__(self) -> str:
        return f"Float8TrainingWeight({self._recipe.name}, master={self._hp!r})"

    @property
    def hp(self) -> torch.Tensor:
        """The high-precision master weight (the tensor the optimizer updates)."""
        return self._hp

    def describe(self, scaling: str = "dynamic") -> str:
        path = " (emulated)" if self._emulate else ""
        return f"fp8 {self._recipe.name} {scaling}{path}"

    # ---- torch.compile ---------------------------------------------------------------------

    def __tensor_flatten__(self):
        return ["_hp"], (self._recipe, self._emulate_request)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, metadata, outer_size, outer_stride):
        recipe, emulate_request = metadata
        return Float8TrainingWeight(inner_tensors["_hp"], recipe, emulate_request)

    def _stable_hash_for_caching(self) -> str:
        # AOT autograd's cache key: the metadata plus the inner tensor's layout, not its values
        hp = self._hp
        return repr((type(self).__name__, self._recipe, self._emulate_request, _layout(hp)))

    def __reduce_ex__(self, protocol):
        # pickling a whole model: the weight pickles as its training weight again
        return Float8TrainingWeight, (self._hp, self._recipe, self._emulate_request)

    # ---- FSDP2 all-gather extension points (fsdp.py has the math) --------------------------

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """What this rank's shard sends: float8 bytes and the global scale (tensorwise), or the
        high-precision shard (rowwise recipes). Padded to FSDP's equal shard size."""
        check_fsdp_module(module)
        param_dtype = getattr(mp_policy, "param_dtype", None)
        shard_hp = self._hp if param_dtype is None else self._hp.to(param_dtype)
        rows = padded_rows(self, outer_size, mesh)
        if not gathers_fp8(self._recipe):
            return (pad_rows(shard_hp, rows),), None
        shard_u8, scale = fp8_shard(shard_hp, self._recipe, gather_amax(self, shard_hp, mesh), rows)
        return (shard_u8,), scale

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The full weight for forward/backward: a `Float8GatheredWeight` of the gathered bytes
        (tensorwise), or a training weight around the gathered high-precision weight."""
        if gathers_fp8(self._recipe):
            return fp8_gathered_weight(
                all_gather_outputs, metadata, param_dtype, self._recipe, self._emulate, out
            )
        if out is not None:
            return None  # FSDP refilled the buffer that `out` wraps
        (hp,) = all_gather_outputs
        return Float8TrainingWeight(hp, self._recipe, self._emulate_request), (hp,)

    # ---- dispatch --------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return route_linear(cls, func, args, kwargs, _run_fp8_linear)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _KEEP_WRAPPED or _materializes_meta(func, args):
            x = args[0]
            out = func(x._hp, *args[1:], **kwargs)
            return Float8TrainingWeight(out, x._recipe, x._emulate_request)
        unwrapped_args, unwrapped_kwargs = tree_map_only(cls, _unwrap, (args, kwargs))
        out = func(*unwrapped_args, **unwrapped_kwargs)
        if isinstance(args[0], cls) and out is unwrapped_args[0]:
            return args[0]  # an in-place op on the weight returns the weight itself
        return out


aten = torch.ops.aten
# Ops whose result is the same weight in another place or another Python object, and those
# FSDP2 uses to make a rank's padded shard (new_zeros, slice, view, as_strided, pin_memory):
# the shard must stay a training weight, or FSDP would gather and compute in high precision.
_KEEP_WRAPPED = {
    aten.detach.default,
    aten.alias.default,
    aten.clone.default,
    aten._to_copy.default,
    aten.new_zeros.default,
    aten.slice.Tensor,
    aten.view.default,
    aten.as_strided.default,
    aten._pin_memory.default,
}


def _materializes_meta(func, args) -> bool:
    """`empty_like` of a meta weight: `module.to_empty(device=...)` materializing a model built
    on the meta device. It stays a training weight, its emulation choice resolved anew for the
    real device (a meta weight has no values, so nothing else empty_likes it)."""
    return func is aten.empty_like.default and args[0].device.type == "meta"


def _layout(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device.type, t.requires_grad)


def _unwrap(x: Float8TrainingWeight) -> torch.Tensor:
    return x._hp


def _run_fp8_linear(input, weight: Float8TrainingWeight, bias):
    return float8_linear(input, weight, bias, weight._recipe, weight._emulate)


def training_weight(param) -> "Float8TrainingWeight | None":
    """The training weight behind `param`: itself, or (FSDP2) its DTensor's local shard."""
    local = getattr(param, "_local_tensor", param)  # a DTensor holds this rank's shard there
    return local if isinstance(local, Float8TrainingWeight) else None
