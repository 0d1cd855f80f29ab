"""FSDP2: the training weight all-gathered in FP8, with the scale of the unsharded run.

FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps on each of W ranks a dim-0 shard of every
parameter and all-gathers the full weight before a layer runs (in forward, and again in backward
if it resharded after forward). `Float8TrainingWeight` implements FSDP2's two extension points
(`fsdp_pre_all_gather`, `fsdp_post_all_gather`) with the functions below, so that for the
tensorwise recipe what travels is float8, one byte per element::

    each rank, shard_hp [N/W, K] of the master weight (in mp_policy.param_dtype if one is set):
        amax      = all_reduce(max |shard_hp|, MAX)             # = max |weight|, exactly
        scale     = finfo(e4m3).max / amax                      # the unsharded run's scale
        shard_u8  = saturate(shard_hp * scale).to(e4m3).view(uint8)        # [N/W, K] bytes
    FSDP all-gathers the bytes                                  # uint8 [N, K]; gloo has no float8
    weight    = Float8GatheredWeight(bytes.view(e4m3), scale)   # [N, K], what F.linear gets

A max is exact and independent of order, so the scale and every float8 byte equal those that
the unsharded run casts: its `F.linear` runs the same three GEMMs (`autograd.Float8LinearFn`)
with this data in place of the weight's cast (no second cast), forward and backward, bit for
bit. The weight gradient comes out in high precision and FSDP reduce-scatters it as usual.

# [Note] What each recipe all-gathers
A weight feeds two GEMMs: the output GEMM (as B = weight.T) and grad_input's (as B = weight).
One float8 copy can serve both only if the recipe casts it alike in both, with one scale:
tensorwise does (e4m3, one scale). The rowwise recipes do not: the output GEMM scales each row
of the weight [N, K] (rows lie within a shard), grad_input's scales each column (or, for
rowwise_with_gw_hp, the whole tensor), and a column spans every shard. Gathering both float8
copies would keep the numerics but move 2 bytes per element, what bf16 moves, so those recipes
all-gather the high-precision weight (FSDP's default bytes) and cast it after the gather, as the
unsharded run does; `fp8_layers` says "FSDP all-gather in <dtype>" for them.

# [Note] Batched amax all-reduce
By default each FP8-gathered weight runs its own one-element all-reduce in its pre-all-gather,
in forward; an all-gather in backward (after `reshard_after_forward`) reuses that forward's amax
(the weight cannot change between a forward and its backward), so it costs no collective.
`precompute_float8_dynamic_scale_for_fsdp(model)` (below), called right after `opt.step()`,
computes every weight's amax in one all-reduce; the next forward all-gather of each weight uses
it instead of its own. The scale is the same either way (the same max), only the number of
collectives differs.

These amaxes live in one `GatherAmaxes` object on the rank's local sharded weight: they are read
only in FSDP's hooks, which run eagerly, never inside a compiled region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RecipeSpec, same_tensorwise_cast
from ..layers import ConvertedLayer, layer_state
from ..scaling import amax_to_scale, saturated_cast
from ..tensor import wrapper_like
from .linear_fn import float8_linear, route_linear


@dataclass
class GatherAmaxes:
    """The amaxes a sharded weight remembers between all-gathers ([Note] Batched amax all-reduce)."""

    next: Optional[torch.Tensor] = None  # from precompute_float8_dynamic_scale_for_fsdp
    forward: Optional[torch.Tensor] = None  # the last forward all-gather's, for backward


def gather_amaxes(weight) -> GatherAmaxes:
    """The rank's local weight's GatherAmaxes (made on first use: only sharded weights have one)."""
    return weight.__dict__.setdefault("_gather_amaxes", GatherAmaxes())


def gathers_fp8(recipe: RecipeSpec) -> bool:
    """Whether a weight of `recipe` all-gathers in float8 (see [Note] What each recipe all-gathers)."""
    return same_tensorwise_cast(recipe.output.b, recipe.grad_input.b)


def gather_description(recipe: RecipeSpec, gather_dtype: torch.dtype) -> str:
    """The "(FSDP all-gather in ...)" part of `fp8_layers` for a sharded weight."""
    if gathers_fp8(recipe):
        return f"(FSDP all-gather in {_dtype_name(recipe.output.b.dtype)})"
    return f"(FSDP all-gather in {_dtype_name(gather_dtype)})"


_DTYPE_NAMES = {
    torch.float8_e4m3fn: "fp8 e4m3",
    torch.float8_e5m2: "fp8 e5m2",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_fsdp_module(module: nn.Module) -> None:
    """Static and delayed scaling are not supported under FSDP2: say so before any math runs."""
    state = layer_state(module)
    scaling = state.stateful_scaling if isinstance(state, ConvertedLayer) else None
    if scaling is not None:
        raise NotImplementedError(
            f"compile_fp8: FSDP2 (fully_shard) of a layer with Float8Config(scaling={scaling!r}) "
            f"is not supported ({module}): its amax buffers would be measured per rank and "
            "diverge. Use scaling='dynamic' (the default) with FSDP2."
        )


# ---- pre-all-gather: on each rank, from its shard ---------------------------------------------


def padded_rows(shard: torch.Tensor, outer_size: torch.Size, mesh) -> int:
    """Rows of FSDP's padded shard: torch.chunk's chunk size, ceil(N / W), for a dim-0 shard
    (the default); a shard along another dim (`shard_placement_fn`) is even and unpadded."""
    if tuple(shard.shape[1:]) != tuple(outer_size[1:]):
        return shard.shape[0]
    return -(-outer_size[0] // mesh.size())


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad dim 0 to `rows` (FSDP all-gathers equal-sized shards; the last may be short).

    Zeros change no amax, and both float8 formats encode +0.0 as the byte 0x00."""
    if x.shape[0] == rows:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


def local_amax(hp: torch.Tensor) -> torch.Tensor:
    """max |hp| in float32 (0 for an empty shard: a rank may hold no rows)."""
    if hp.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=hp.device)
    return torch.max(torch.abs(hp)).to(torch.float32)


def all_reduce_max(amaxes: torch.Tensor, mesh) -> torch.Tensor:
    """Elementwise max over the ranks of `mesh` (FSDP's 1-D shard mesh), in place."""
    torch.distributed.all_reduce(amaxes, op=torch.distributed.ReduceOp.MAX, group=mesh.get_group())
    return amaxes


def fp8_shard(shard_hp: torch.Tensor, recipe: RecipeSpec, amax: torch.Tensor, rows: int):
    """(uint8 bytes [rows, K] of the shard cast to float8, its float32 scale) from global `amax`.

    `amax` is rounded to the shard's dtype first: max commutes with rounding, so this is the
    amax the unsharded weight in that dtype has.
    """
    float8_dtype = recipe.output.b.dtype
    scale = amax_to_scale(amax.to(shard_hp.dtype), float8_dtype)
    shard_fp8 = saturated_cast(shard_hp, scale, float8_dtype)
    return pad_rows(shard_fp8.view(torch.uint8), rows), scale


def gather_amax(weight, shard_hp: torch.Tensor, mesh) -> torch.Tensor:
    """The global amax for this all-gather (see [Note] Batched amax all-reduce)."""
    remembered = gather_amaxes(weight)
    in_backward = torch._C._current_graph_task_id() != -1
    amax = remembered.forward if in_backward else None
    if amax is None:
        amax, remembered.next = remembered.next, None
    if amax is None:
        amax = all_reduce_max(local_amax(shard_hp).reshape(1), mesh)[0]
    if not in_backward:
        remembered.forward = amax
    return amax


def forget_amaxes(weight) -> None:
    """After a checkpoint load the weight changed: no remembered amax may be reused."""
    weight.__dict__.pop("_gather_amaxes", None)


# ---- post-all-gather: the full weight ------------------------------------------------------


def fp8_gathered_weight(outputs, scale, param_dtype, recipe: RecipeSpec, emulate: bool, out=None):
    """FSDP's post-all-gather for an FP8 all-gather: wrap the gathered bytes, no copy."""
    (data_u8,) = outputs  # [W * rows, K]; FSDP narrows it to [N, K] (as_strided) afterwards
    if out is not None:
        # FSDP wrote this all-gather's bytes into the same buffer: only the scale is new
        assert isinstance(out, Float8GatheredWeight), type(out)
        out.scale = scale
        return None
    data = data_u8.view(recipe.output.b.dtype)
    return Float8GatheredWeight(data, scale, recipe, emulate, param_dtype), (data_u8,)


class Float8GatheredWeight(torch.Tensor):
    """The full weight after an FP8 all-gather: float8 data [N, K] and its tensorwise scale.

    It looks like the weight (shape, dtype = FSDP's param dtype) and is what the layer holds
    between FSDP's unshard and reshard. `F.linear` runs the training weight's three-GEMM
    function with this data and scale in place of a cast. Views FSDP takes (`as_strided`,
    `detach`) stay wrapped; any other op sees the dequantized weight (what the GEMMs compute
    with); in-place ops are refused: the gathered weight is a read-only copy.
    """

    fp8_data: torch.Tensor
    scale: torch.Tensor
    _recipe: RecipeSpec
    _emulate: bool

    @staticmethod
    def __new__(cls, fp8_data, scale, recipe: RecipeSpec, emulate: bool, dtype: torch.dtype):
        return wrapper_like(cls, fp8_data, dtype)

    def __init__(self, fp8_data, scale, recipe: RecipeSpec, emulate: bool, dtype: torch.dtype):
        self.fp8_data = fp8_data
        self.scale = scale
        self._recipe = recipe
        self._emulate = emulate

    def __repr__(self) -> str:
        return (
            f"Float8GatheredWeight({self._recipe.name}, shape={list(self.shape)}, "
            f"dtype={self.dtype}, fp8={self.fp8_data.dtype})"
        )

    def to_hp(self) -> torch.Tensor:
        """Dequantized: fp8_data / scale in the weight's dtype."""
        return (self.fp8_data.to(torch.float32) / self.scale).to(self.dtype)

    # ---- torch.compile (compile after fully_shard: the gathered weight is a graph input) ----

    def __tensor_flatten__(self):
        return ["fp8_data", "scale"], (self._recipe, self._emulate, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, metadata, outer_size, outer_stride):
        recipe, emulate, dtype = metadata
        return Float8GatheredWeight(inner_tensors["fp8_data"], inner_tensors["scale"], recipe, emulate, dtype)

    def _stable_hash_for_caching(self) -> str:
        layout = (tuple(self.shape), self.fp8_data.stride(), self.fp8_data.dtype, self.device.type)
        return repr((type(self).__name__, self._recipe, self._emulate, self.dtype, layout))

    # ---- dispatch --------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return route_linear(cls, func, args, kwargs, _run_gathered_linear)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VIEWS:
            x = args[0]
            data = func(x.fp8_data, *args[1:], **kwargs)
            return Float8GatheredWeight(data, x.scale, x._recipe, x._emulate, x.dtype)
        if func._schema.is_mutable:
            raise NotImplementedError(
                f"{func} on the FSDP-gathered FP8 weight: it is a read-only copy made for "
                "forward/backward; change the sharded parameter (outside forward) instead"
            )
        unwrap = lambda x: x.to_hp()  # noqa: E731
        args, kwargs = torch.utils._pytree.tree_map_only(cls, unwrap, (args, kwargs))
        return func(*args, **kwargs)


aten = torch.ops.aten
# What FSDP does to the gathered weight: narrow the padded buffer, make it a Parameter.
_VIEWS = {aten.as_strided.default, aten.detach.default, aten.alias.default}


def _run_gathered_linear(input, weight: Float8GatheredWeight, bias):
    return float8_linear(
        input, weight, bias, weight._recipe, weight._emulate,
        weight_scale=weight.scale, weight_fp8=weight.fp8_data,
    )  # fmt: skip
