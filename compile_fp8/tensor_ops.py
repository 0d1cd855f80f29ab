"""The op table of Float8Tensor: which aten ops it supports, and how.

Composite ops decompose before they reach `__torch_dispatch__`: `F.linear` arrives as `t` +
`mm`/`addmm`, `torch.matmul` of a 3-D input as `view` + `mm`. So the table holds the aten
primitives, grouped by meaning:

* metadata-only views (`t`, `transpose`, `view`, ...): applied to the data and, where it has the
  data's shape (rowwise), to the scale.
* copies and moves (`clone`, `detach`, `_to_copy`): data and scale together.
* GEMMs (`mm`, `addmm`): `gemm.scaled_mm` with the layouts `_scaled_mm` needs. A high-precision
  operand is cast to e4m3 with the other operand's granularity; a rowwise operand whose scales
  run along the contracted dim is re-quantized along the right one.

Anything else raises NotImplementedError naming the op (`tensor.py`). `tensor.py` imports this
module lazily (the table's handlers build Float8Tensors): the one import cycle of the package.
"""

from __future__ import annotations

from typing import Callable

import torch

from .gemm import scaled_mm, scaled_mm_supported
from .tensor import Float8Tensor

aten = torch.ops.aten
FLOAT8_OPS: dict = {}


def implements(ops: list) -> Callable:
    """Register a handler for aten ops; registering an op twice is a bug."""

    def decorator(handler):
        for op in ops:
            assert op not in FLOAT8_OPS, f"{op} already handled by {FLOAT8_OPS[op].__name__}"
            FLOAT8_OPS[op] = handler
        return handler

    return decorator


def _like(x: Float8Tensor, data: torch.Tensor, scale: torch.Tensor | None = None) -> Float8Tensor:
    return Float8Tensor(data, x.scale if scale is None else scale, x._orig_dtype)


# ---- metadata-only views ------------------------------------------------------------------


@implements([aten.t.default, aten.transpose.int])
def transposed(func, args, kwargs):
    x = args[0]
    if x.dim() != 2:
        raise NotImplementedError(f"Float8Tensor supports {func} of 2-D tensors only")
    # apply `func` itself, not `.t()`: transpose(d, d) is a no-op and must stay one
    scale = x.scale if x.granularity == "tensorwise" else func(x.scale, *args[1:])
    return _like(x, func(x.fp8_data, *args[1:]), scale)


@implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def reshaped(func, args, kwargs):
    x, shape = args[0], list(args[1])
    data = func(x.fp8_data, shape)
    if x.granularity == "tensorwise":
        return _like(x, data)
    if x.scale.shape[-1] != 1 or data.shape[-1] != x.shape[-1]:
        raise NotImplementedError(
            f"{func} of a rowwise Float8Tensor may change its leading dims only "
            f"(shape {list(x.shape)} -> {shape}, scale {list(x.scale.shape)})"
        )
    return _like(x, data, x.scale.reshape(*data.shape[:-1], 1))


# ---- copies and moves ---------------------------------------------------------------------


@implements([aten.detach.default, aten.alias.default, aten.clone.default])
def copied(func, args, kwargs):
    x = args[0]
    return _like(x, func(x.fp8_data, **kwargs), func(x.scale))


@implements([aten._to_copy.default])
def converted(func, args, kwargs):
    """`.to(device)` moves data and scale; `.to(dtype)` changes the dtype it dequantizes to."""
    x = args[0]
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", None) or x._orig_dtype
    if not dtype.is_floating_point or dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise NotImplementedError(f"Float8Tensor.to({dtype}): use .to_hp() or .fp8_data instead")
    kwargs.pop("layout", None)
    data = func(x.fp8_data, **kwargs)
    scale = func(x.scale, **kwargs)
    return Float8Tensor(data, scale, dtype)


@implements([aten.is_same_size.default])
def same_size(func, args, kwargs):
    return args[0].shape == args[1].shape


# ---- GEMMs --------------------------------------------------------------------------------


def _as_operand(x: torch.Tensor, other: torch.Tensor, contract_dim: int) -> Float8Tensor:
    """`x` as a GEMM operand whose scales (if rowwise) run along `contract_dim`."""
    if not isinstance(x, Float8Tensor):
        granularity = other.granularity if isinstance(other, Float8Tensor) else "tensorwise"
        return _quantize_along(x, granularity, contract_dim)
    if x.granularity == "rowwise" and x.scale.shape[contract_dim] != 1:
        return _quantize_along(x.to_hp(), "rowwise", contract_dim, x.fp8_data.dtype)
    return x


def _quantize_along(hp, granularity, contract_dim, float8_dtype=torch.float8_e4m3fn):
    kwargs = dict(granularity=granularity, float8_dtype=float8_dtype)
    if granularity == "tensorwise" or contract_dim == 1:
        return Float8Tensor.from_hp(hp, **kwargs)  # scale [] or [M, 1]
    return Float8Tensor.from_hp(hp.t(), **kwargs).t()  # scale [1, N]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # [M, K] @ [K, N] -> [M, N]
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    a_fp8, b_fp8 = _as_operand(a, b, contract_dim=1), _as_operand(b, a, contract_dim=0)
    emulate = not scaled_mm_supported(a_fp8.device)  # e.g. a GPU below sm89
    # the output GEMM of a forward pass: fast accumulation, as torchao's default
    return scaled_mm(
        a_fp8.fp8_data, a_fp8.scale, b_fp8.fp8_data, b_fp8.scale, out_dtype, True, emulate
    )


@implements([aten.mm.default, aten.matmul.default])
def matmul(func, args, kwargs):
    return _mm(args[0], args[1])


@implements([aten.addmm.default])
def addmm(func, args, kwargs):
    bias, a, b = args
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise NotImplementedError("Float8Tensor supports addmm with alpha=beta=1 only")
    out = _mm(a, b)
    # bias added after the GEMM, in high precision (as torchao does)
    return out + bias.to(out.dtype)
