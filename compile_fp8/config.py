"""Configuration: what the user chooses, and the per-GEMM recipe it expands to.

A linear layer runs three GEMMs (see `training/linear_fn.py`)::

    output      = input    @ weight.T     # [M, K] @ [K, N] -> [M, N]
    grad_input  = grad_out @ weight       # [M, N] @ [N, K] -> [M, K]
    grad_weight = grad_out.T @ input      # [N, M] @ [M, K] -> [N, K]

A *recipe* says, for each GEMM, how each of its two operands is cast: which float8 dtype (or
none: stay in high precision), with one scale for the whole tensor ("tensorwise") or one scale
per row of A and per column of B ("rowwise"; always along the contracted dimension, which is
what `torch._scaled_mm` can take), and whether cuBLAS may use fast (lower-precision)
accumulation. The recipes reproduce torchao's `Float8LinearConfig.from_recipe_name` numerics:

* ``tensorwise``: e4m3 input and weight, e5m2 gradients, tensorwise scales; fast accumulation for
  the output GEMM only (`Float8Config(fast_accum="all")`: in every FP8 GEMM).
* ``rowwise``: e4m3 everywhere (gradients too), rowwise scales rounded down to powers of two.
* ``rowwise_with_gw_hp``: like rowwise for the output; grad_input uses a tensorwise weight;
  grad_weight is computed in high precision (the most accurate of the three).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args

import torch

Recipe = Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"]
Scaling = Literal["dynamic", "static", "delayed"]
Mode = Literal["training", "inference"]
Granularity = Literal["tensorwise", "rowwise"]
AmaxFrom = Literal["max", "most_recent"]
CastKernels = Literal["inductor", "triton"]
LayerFilter = Literal["all", "auto"]
SmallMActivation = Literal["auto", "hp", "fp8"]
FastAccum = Literal["forward", "all"]
SavedActivations = Literal["hp", "fp8", "e5m2"]

RECIPES: tuple[str, ...] = get_args(Recipe)
SCALINGS: tuple[str, ...] = get_args(Scaling)
MODES: tuple[str, ...] = get_args(Mode)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
AMAX_FROM: tuple[str, ...] = get_args(AmaxFrom)
CAST_KERNELS: tuple[str, ...] = get_args(CastKernels)
LAYER_FILTERS: tuple[str, ...] = get_args(LayerFilter)
SMALL_M_ACTIVATIONS: tuple[str, ...] = get_args(SmallMActivation)
FAST_ACCUMS: tuple[str, ...] = get_args(FastAccum)
SAVED_ACTIVATIONS: tuple[str, ...] = get_args(SavedActivations)

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def check_choice(field: str, value, allowed: tuple) -> None:
    """Raise the ValueError every user-facing choice gets: field, value, allowed values."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed values: {list(allowed)}")


@dataclass(frozen=True, kw_only=True)
class Float8Config:
    """How `compile_fp8` converts a model. Frozen and hashable, so torch.compile can guard on it."""

    recipe: Recipe = "tensorwise"
    """Per-GEMM cast recipe: "tensorwise" (default), "rowwise" or "rowwise_with_gw_hp"."""

    scaling: Scaling = "dynamic"
    """Where scales come from: "dynamic" (this step's amax; the default), "static" (from
    `calibrate`, then fixed: no amax reduction at run time) or "delayed" (from a window of past
    amaxes, updated every step inside the compiled graph). static and delayed: tensorwise only."""

    mode: Mode = "training"
    """"training" (master weights stay high precision) or "inference" (weights stored once as
    FP8 `Float8Tensor`s, activations cast per call; scaling "dynamic" or "static"; see
    `compile_fp8/inference/`)."""

    emulate: Optional[bool] = None
    """Run the same numerics without `torch._scaled_mm` (for GPUs below sm89). None (default):
    chosen from the weights' device by trying `_scaled_mm` once; the choice is logged once."""

    static_grads: bool = False
    """scaling="static": calibrate grad_output's scale too (`calibrate` then needs `loss_fn`).
    Default False: gradients stay dynamic, since their range drifts as training goes on."""

    static_weights: Union[bool, Literal["previous"]] = True
    """scaling="static": True (default): each weight's scale comes from its stored amax
    (`calibrate`; `refresh_weight_scales` after each optimizer step keeps it exact). False: each
    forward measures the weight's amax inside the compiled step, so the scale is always this
    weight's: the same bits as refreshing after every optimizer step, with no hook to register
    (the amax pass runs inside the step instead of after the optimizer). "previous": each
    training forward casts the weight with the amax the previous training forward measured (the
    weight one optimizer step ago; `calibrate`'s for the first step) and stores this weight's
    amax for the next: the cast does not wait for the amax, and no refresh runs after the
    optimizer (inductor still reads each weight for its amax in a reduction of its own); a
    value that grew past the old amax in that one step saturates. Training only."""

    history_len: int = 16
    """scaling="delayed": how many past amaxes each operand remembers."""

    amax_from: AmaxFrom = "max"
    """scaling="delayed": scale from the "max" over the history, or its "most_recent" entry."""

    amax_margin: float = 1.0
    """static and delayed: scales come from `amax * amax_margin`. Values beyond that saturate at
    +-max of the float8 type; a margin above 1 (e.g. 1.25) leaves headroom for growth, at the
    cost of a little resolution."""

    fast_accum: FastAccum = "forward"
    """Where cuBLAS may accumulate an FP8 GEMM's products in less than float32 precision (the
    Hopper "fast accumulation" mode). "forward" (default): the output GEMM only, as the recipes
    of torchao (its bits). "all": the two gradient GEMMs too (rowwise_with_gw_hp: grad_input; its
    grad_weight stays high precision): faster backward GEMMs, for a coarser sum over long
    contractions (grad_weight sums over every token of the batch); docs/benchmarks.md has the
    measured GEMMs, step and loss. Training only. Emulation (`emulate`) accumulates in float32
    either way."""

    saved_activations: SavedActivations = "hp"
    """What the compiled blocks keep for backward. "hp" (default): activations in the dtype the
    forward made them. "fp8": each saved bf16/fp16 activation of at least 1 MiB (a transformer
    block's SwiGLU gate and up, its qkv output, the residual stream; float32 statistics such as
    attention's log-sum-exp stay as they are) stored as float8 e4m3 with a scale
    of its own and cast back in the backward: about half their memory, one amax pass each, and
    a backward that reads rounded activations (`saved_activations.py`). "e5m2": the same tensors
    stored as float8 e5m2 without a scale (a plain cast: no amax pass, faster; two mantissa bits
    where e4m3 has three, so a coarser backward). Training, `compile=True` (the repeated blocks
    compile_fp8 compiles) only."""

    cast_kernels: CastKernels = "inductor"
    """Experimental, tensorwise only. "inductor" (default): torch.compile generates the amax and
    cast kernels. "triton": hand-written Triton kernels (`kernels/cast.py`) compute each amax and
    write each float8 operand in both layouts in one pass; backward then keeps the float8 input
    and weight instead of high-precision copies. Same bits either way; on CPU (no Triton) the
    torch fallbacks run (`kernels/cast.py`)."""

    layer_filter: LayerFilter = "all"
    """Which eligible layers run FP8. "all" (default): every one `_scaled_mm` can take, as torchao's
    `convert_to_float8_training` does (its parity tests rely on it). "auto": only layers whose
    shape ran faster in FP8 than in bf16 for this recipe on an H200 (`training/layer_choice.py`: from
    min(in, out) = 2048 for tensorwise, about 4096 x 8192 for rowwise); `fp8_layers` gives each
    skipped layer's measured ratio. Training only."""

    weight_only_max_m: int = 64
    """mode="inference": a linear whose input has at most this many rows M (tokens: batch x
    sequence, e.g. a decode step) runs the weight-only FP8 kernel (float8 weight, high-precision
    activation; `kernels/small_m_gemm.py`); larger M runs `_scaled_mm` with a float8 activation.
    0: always `_scaled_mm`. Ignored in training."""

    small_m_activation: SmallMActivation = "auto"
    """mode="inference", M <= weight_only_max_m: "auto" (default) casts the activation to float8
    and runs the float8 x float8 kernel where the layer has a calibrated static input scale (the
    cast is then one multiply, fused into the kernel that produces the activation), and keeps it
    in high precision otherwise (the weight-only kernel: a dynamic cast's amax pass costs what the
    float8 MMAs save); "hp" / "fp8" force one."""

    def __post_init__(self):
        check_choice("Float8Config.recipe", self.recipe, RECIPES)
        check_choice("Float8Config.scaling", self.scaling, SCALINGS)
        check_choice("Float8Config.mode", self.mode, MODES)
        check_choice("Float8Config.emulate", self.emulate, (None, True, False))
        check_choice("Float8Config.static_grads", self.static_grads, (False, True))
        check_choice("Float8Config.static_weights", self.static_weights, (True, False, "previous"))
        check_choice("Float8Config.amax_from", self.amax_from, AMAX_FROM)
        check_choice("Float8Config.fast_accum", self.fast_accum, FAST_ACCUMS)
        check_choice("Float8Config.saved_activations", self.saved_activations, SAVED_ACTIVATIONS)
        check_choice("Float8Config.cast_kernels", self.cast_kernels, CAST_KERNELS)
        check_choice("Float8Config.layer_filter", self.layer_filter, LAYER_FILTERS)
        check_choice("Float8Config.small_m_activation", self.small_m_activation, SMALL_M_ACTIVATIONS)
        if self.cast_kernels == "triton" and self.recipe != "tensorwise":
            raise ValueError(
                f"Float8Config.cast_kernels='triton' supports recipe='tensorwise' only "
                f"(got recipe={self.recipe!r})"
            )
        if self.scaling != "dynamic" and self.recipe != "tensorwise":
            raise ValueError(
                f"Float8Config.scaling={self.scaling!r} supports recipe='tensorwise' only "
                f"(got recipe={self.recipe!r}): a row's scale depends on that step's tokens"
            )
        if self.static_weights is not True and self.scaling != "static":
            raise ValueError(
                f"Float8Config.static_weights={self.static_weights!r} applies to scaling='static' only (got "
                f"scaling={self.scaling!r}, whose weight scales never come from a stored amax alone)"
            )
        if not isinstance(self.history_len, int) or self.history_len < 1:
            raise ValueError(f"Float8Config.history_len={self.history_len!r} must be an int >= 1")
        if not self.amax_margin > 0:
            raise ValueError(f"Float8Config.amax_margin={self.amax_margin!r} must be > 0")
        if type(self.weight_only_max_m) is not int or self.weight_only_max_m < 0:
            raise ValueError(
                f"Float8Config.weight_only_max_m={self.weight_only_max_m!r} must be an int >= 0"
            )
        if self.mode == "inference":
            self._check_inference()

    def _check_inference(self) -> None:
        """Training-only choices are refused for mode="inference", naming the field."""
        if self.scaling == "delayed":
            raise ValueError(
                "Float8Config.scaling='delayed' is not supported with mode='inference' (its amax "
                "history moves with training steps); allowed values: ['dynamic', 'static']"
            )
        if self.static_grads:
            raise ValueError("Float8Config.static_grads=True applies to mode='training' only")
        if self.static_weights is not True:
            raise ValueError(
                f"Float8Config.static_weights={self.static_weights!r} applies to mode='training' only (inference "
                "weights are cast once, with their own amax)"
            )
        if self.fast_accum != "forward":
            raise ValueError(
                f"Float8Config.fast_accum={self.fast_accum!r} applies to mode='training' only "
                "(inference runs the forward GEMM alone, with fast accumulation)"
            )
        if self.saved_activations != "hp":
            raise ValueError(
                f"Float8Config.saved_activations={self.saved_activations!r} applies to "
                "mode='training' only (inference keeps nothing for a backward)"
            )
        if self.cast_kernels != "inductor":
            raise ValueError(
                f"Float8Config.cast_kernels={self.cast_kernels!r} applies to mode='training' only; "
                "inference uses 'inductor' (and the weight-only kernel for small M)"
            )
        if self.layer_filter != "all":
            raise ValueError(
                f"Float8Config.layer_filter={self.layer_filter!r} applies to mode='training' only "
                "(its speed-ups were measured on training fwd+bwd); inference converts every "
                "eligible layer: choose with module_filter_fn"
            )

    @classmethod
    def from_recipe(cls, name: str, **kwargs) -> "Float8Config":
        """`Float8Config.from_recipe("rowwise")`: the spelling torchao users know."""
        return cls(recipe=name, **kwargs)

    def replace(self, **changes) -> "Float8Config":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CastSpec:
    """How one GEMM operand is cast. `dtype=None` keeps it in high precision."""

    dtype: Optional[torch.dtype]
    granularity: Granularity = "tensorwise"

    @property
    def is_fp8(self) -> bool:
        return self.dtype is not None


HIGH_PRECISION = CastSpec(None)


def same_tensorwise_cast(first: CastSpec, second: CastSpec) -> bool:
    """Two GEMMs cast an operand identically with one tensorwise scale: one cast can serve both
    (the scale saved from forward, an FSDP weight gathered once in float8)."""
    return first == second and first.is_fp8 and first.granularity == "tensorwise"


@dataclass(frozen=True)
class GemmSpec:
    """Casts for A and B of `A @ B`, and the accumulation mode of `_scaled_mm`."""

    a: CastSpec
    b: CastSpec
    use_fast_accum: bool = False


@dataclass(frozen=True)
class RecipeSpec:
    """The three GEMMs of a linear layer. Small and hashable: it is subclass metadata."""

    name: str
    output: GemmSpec
    grad_input: GemmSpec
    grad_weight: GemmSpec
    pow2_scales: bool = False
    """Round scales down to powers of two (rowwise recipes): exact scaling, no rounding."""
    dual_cast: bool = False
    """Cast input, weight and grad_output once each, into both layouts (`kernels/cast.py`),
    and save the float8 input and weight for backward (tensorwise only)."""


def _tensorwise() -> RecipeSpec:
    e4m3, e5m2 = CastSpec(E4M3), CastSpec(E5M2)
    return RecipeSpec(
        name="tensorwise",
        output=GemmSpec(e4m3, e4m3, use_fast_accum=True),
        grad_input=GemmSpec(e5m2, e4m3),
        grad_weight=GemmSpec(e5m2, e4m3),
    )


def _rowwise() -> RecipeSpec:
    row = CastSpec(E4M3, "rowwise")
    return RecipeSpec(
        name="rowwise",
        output=GemmSpec(row, row, use_fast_accum=True),
        grad_input=GemmSpec(row, row),
        grad_weight=GemmSpec(row, row),
        pow2_scales=True,
    )


def _rowwise_with_gw_hp() -> RecipeSpec:
    row = CastSpec(E4M3, "rowwise")
    return RecipeSpec(
        name="rowwise_with_gw_hp",
        output=GemmSpec(row, row, use_fast_accum=True),
        grad_input=GemmSpec(row, CastSpec(E4M3, "tensorwise")),
        grad_weight=GemmSpec(HIGH_PRECISION, HIGH_PRECISION),
        pow2_scales=True,
    )


_RECIPE_BUILDERS = {
    "tensorwise": _tensorwise,
    "rowwise": _rowwise,
    "rowwise_with_gw_hp": _rowwise_with_gw_hp,
}


def recipe_spec(name: str, dual_cast: bool = False, fast_accum: str = "forward") -> RecipeSpec:
    """The named recipe; `fast_accum="all"` lets its gradient GEMMs accumulate fast too."""
    check_choice("recipe", name, RECIPES)
    check_choice("fast_accum", fast_accum, FAST_ACCUMS)
    spec = dataclasses.replace(_RECIPE_BUILDERS[name](), dual_cast=dual_cast)
    if fast_accum == "all":
        spec = dataclasses.replace(
            spec,
            grad_input=dataclasses.replace(spec.grad_input, use_fast_accum=True),
            grad_weight=dataclasses.replace(spec.grad_weight, use_fast_accum=spec.grad_weight.a.is_fp8),
        )
    return spec
