"""Scaling: from a high-precision tensor to float8 data and its scale.

float8 has a tiny range (e4m3: +-448, e5m2: +-57344) and few mantissa bits, so a tensor is
multiplied by a *scale* before the cast so that its largest magnitude (amax) lands on the top of
that range::

    scale    = finfo(float8).max / max(amax, EPS)     # float32; amax per tensor or per row
    data     = saturate(hp * scale).to(float8)
    hp      ~= data / scale = data * inv_scale

# [Note] Scale direction
`scale` always multiplies high precision -> float8 (torchao's and cuBLAS's "scale" for the
output conversion); `inv_scale = 1 / scale` multiplies float8 -> high precision and is what
`torch._scaled_mm` takes as `scale_a` / `scale_b`. Every name in this package that ends in
`scale` means the former, every `inv_scale` the latter.

Rowwise scales reduce along the dimension a GEMM contracts: one scale per row of A ([M, 1]) and
one per column of B ([1, N]). These are the only non-scalar scales `_scaled_mm` accepts.

Each numerics choice below reproduces torchao's float8 bit for bit; the comments say why.
"""

from __future__ import annotations

import torch

from .config import CastSpec

EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale instead of inf


def amax(hp: torch.Tensor, rowwise_dim: int | None = None) -> torch.Tensor:
    """max |hp|, over everything (tensorwise) or along `rowwise_dim` with keepdim (rowwise)."""
    if rowwise_dim is None:
        return torch.max(torch.abs(hp))
    return torch.amax(torch.abs(hp), dim=rowwise_dim, keepdim=True)


def amax_to_scale(amax: torch.Tensor, float8_dtype: torch.dtype, pow2: bool = False) -> torch.Tensor:
    """float32 scale that maps `amax` onto the top of `float8_dtype`'s range."""
    # float64 divide: eager and inductor round a float32 reciprocal differently; in float64 both
    # agree, so eager == compile bit for bit.
    scale = torch.finfo(float8_dtype).max / torch.clamp(amax.to(torch.float64), min=EPS)
    scale = scale.to(torch.float32)
    if pow2:
        # floor to a power of two: multiplying by it is exact, so no extra rounding error.
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale


def saturated_cast(hp: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype) -> torch.Tensor:
    """`hp * scale` cast to float8, saturating at +-max instead of overflowing."""
    # upcast before the multiply: inductor computes `bf16 * fp32` in float32 anyway; doing it
    # explicitly keeps eager identical to compiled code.
    scaled = hp.to(torch.float32) * scale
    # clamp: the cast turns out-of-range values into inf (e5m2) or, depending on the torch
    # version, NaN (e4m3) instead of saturating.
    fmax = torch.finfo(float8_dtype).max
    return scaled.clamp(min=-fmax, max=fmax).to(float8_dtype)


def cast_to_fp8(
    hp: torch.Tensor, spec: CastSpec, rowwise_dim: int, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic scaling: (fp8 data, scale) for `hp`; `rowwise_dim` is the dim a row scale spans."""
    dim = rowwise_dim if spec.granularity == "rowwise" else None
    scale = amax_to_scale(amax(hp, dim), spec.dtype, pow2)
    return saturated_cast(hp, scale, spec.dtype), scale


# ---- static and delayed scaling: scales from stored amaxes ----------------------------------


def stored_amax_to_scale(amax: torch.Tensor, float8_dtype: torch.dtype, margin: float) -> torch.Tensor:
    """Scale from a calibrated or remembered amax, with `margin` headroom (see Float8Config)."""
    return amax_to_scale(amax * margin if margin != 1.0 else amax, float8_dtype)


def read_before_update(buffer: torch.Tensor) -> torch.Tensor:
    """The value of a scaling buffer that this forward also updates, as this forward reads it.

    Under torch.compile, AOTAutograd's partitioner may re-compute a forward value in the
    backward instead of saving it. For a value read from a buffer the forward then updates in
    place (a delayed history, a `static_weights="previous"` amax), the backward would re-read
    the buffer after the update: a backward scale that is not the forward's, and silently
    wrong gradients (the partitioner's recompute allowlist is the only guard; a pending fix in
    torch pins such reads). `saved_not_recomputed` takes it off that list; eagerly (nothing is
    re-computed) a copy, since the buffer itself changes under it.
    """
    if not torch.compiler.is_compiling():
        return buffer.clone()
    return saved_not_recomputed(buffer)


def saved_not_recomputed(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s values, which the compiled backward will read as saved rather than re-compute.

    AOTAutograd's partitioner re-computes in backward only ops on its recompute allowlist (cheap
    pointwise work, views). A flip is not on it; flipping twice returns the values unchanged,
    bit for bit, and inductor folds the two into the producer's indexing (no kernel of its own).
    Eagerly nothing is re-computed: `tensor` itself (no copy; eager CPU flips have no float8
    kernel either).
    """
    if not torch.compiler.is_compiling():
        return tensor
    flat = tensor.reshape(-1)
    return flat.flip(0).flip(0).reshape(tensor.shape)


def history_amax(history: torch.Tensor, amax_from: str) -> torch.Tensor:
    """The amax a delayed scale uses: the window's max, or its most recent entry (index 0).
    The history is read as this forward sees it (`read_before_update`): the forward pushes it."""
    history = read_before_update(history)
    return history.max() if amax_from == "max" else history[0]


def delayed_scale(
    history: torch.Tensor, amax_now, float8_dtype: torch.dtype, amax_from: str, margin: float,
    seeded: bool = False,
) -> torch.Tensor:
    """Delayed scaling's scale: from the history's amax (with `margin`).

    `seeded` (the history is known to hold an amax: after `calibrate`, a checkpoint or the first
    optimizer step): from the history alone, so the cast does not wait for a reduction of the
    tensor it casts (the amax of this step is only recorded, for the next).
    Otherwise a `where` inside the graph takes `amax_now` (as dynamic scaling would) while the
    history is empty, i.e. on the first step.
    """
    remembered = history_amax(history, amax_from)
    from_history = stored_amax_to_scale(remembered, float8_dtype, margin)
    if seeded:
        return from_history
    return torch.where(remembered > 0, from_history, amax_to_scale(amax_now, float8_dtype))


def push_amax(history: torch.Tensor, amax_now: torch.Tensor) -> None:
    """In place: newest amax first, the oldest dropped (the buffer keeps its size and identity)."""
    newest = amax_now.detach().reshape(1).to(history.dtype)
    history.copy_(torch.cat([newest, history[:-1]]))
