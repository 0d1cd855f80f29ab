"""Float8Tensor: float8 data plus its scale, looking like the high-precision tensor it encodes.

    Float8Tensor.from_hp(w)         # quantize: data = saturate(w * scale).to(e4m3)
    x.fp8_data, x.scale             # the stored parts; hp ~= fp8_data / scale
    x.to_hp()                       # dequantize to the original dtype
    x @ y, torch.mm, F.linear       # torch._scaled_mm, layouts fixed for cuBLASLt (tensor_ops.py)

The scale follows the package convention (`scaling.py`, [Note] Scale direction): it multiplies
high precision -> float8. It is a float32 scalar (tensorwise) or has the data's shape with the
last dim set to 1 (rowwise: one scale per row). After `.t()` a rowwise [M, K] tensor with scale
[M, 1] becomes [K, M] with scale [1, M]: one scale per column, which is exactly what
`_scaled_mm` wants for its second operand.

The subclass is a "wrapper" subclass: the outer tensor has no storage of its own, reports the
original shape and dtype, and `__torch_dispatch__` (tensor_ops.py) handles every aten op on it.
It is traceable by torch.compile (`__tensor_flatten__` / `__tensor_unflatten__`).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from .config import GRANULARITIES, check_choice
from .scaling import amax, amax_to_scale, saturated_cast

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def wrapper_like(cls, inner: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False):
    """A storage-less `cls` instance with `inner`'s shape, strides and device, reporting `dtype`:
    the outer tensor of a wrapper subclass (this module's, and the training weights')."""
    return torch.Tensor._make_wrapper_subclass(
        cls,
        inner.shape,
        strides=inner.stride(),
        storage_offset=inner.storage_offset(),
        dtype=dtype,
        device=inner.device,
        requires_grad=requires_grad,
    )


class Float8Tensor(torch.Tensor):
    """float8 data and its float32 scale; shape and dtype are those of the original tensor."""

    fp8_data: torch.Tensor  # the float8 values (e4m3 or e5m2), laid out like the original tensor
    scale: torch.Tensor  # float32, multiplies high precision -> float8 (hp ~= fp8_data / scale)
    _orig_dtype: torch.dtype

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, orig_dtype: torch.dtype):
        return wrapper_like(cls, data, orig_dtype)

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, orig_dtype: torch.dtype):
        assert data.dtype in FLOAT8_DTYPES, data.dtype
        assert scale.dtype == torch.float32, scale.dtype
        # Plain instance attributes, not properties: torch.compile's guards on a Float8Tensor
        # graph input read its inner tensors on every call, and a property is a Python call per
        # read (docs/inference.md, "Host overhead").
        self.fp8_data = data
        self.scale = scale
        self._orig_dtype = orig_dtype

    # ---- construction and the stored parts ------------------------------------------------

    @classmethod
    def from_hp(
        cls,
        hp: torch.Tensor,
        *,
        float8_dtype: torch.dtype = torch.float8_e4m3fn,
        granularity: str = "tensorwise",
        scale: torch.Tensor | None = None,
    ) -> "Float8Tensor":
        """Quantize `hp` (saturating). `scale=None`: computed from amax (per row if rowwise)."""
        _check_from_hp_args(hp, float8_dtype, granularity)
        if scale is None:
            rowwise_dim = -1 if granularity == "rowwise" else None
            scale = amax_to_scale(amax(hp, rowwise_dim), float8_dtype)
        scale = torch.as_tensor(scale, dtype=torch.float32, device=hp.device)
        _check_scale_shape(hp, scale, granularity)
        return cls(saturated_cast(hp, scale, float8_dtype), scale, hp.dtype)

    def to_hp(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantize: fp8_data / scale, in the original dtype (or `dtype`)."""
        hp = self.fp8_data.to(torch.float32) / self.scale
        return hp.to(dtype or self._orig_dtype)

    @property
    def granularity(self) -> str:
        return "tensorwise" if self.scale.numel() == 1 and self.scale.dim() <= 1 else "rowwise"

    def __repr__(self) -> str:
        return (
            f"Float8Tensor(shape={list(self.shape)}, dtype={self._orig_dtype}, "
            f"fp8={self.fp8_data.dtype}, {self.granularity}, device={self.device.type})"
        )

    # ---- torch.compile: flatten / unflatten ------------------------------------------------

    # The inner tensors are flattened under their public names: dynamo does not trace a property
    # of a subclass built inside the compiled region, it reads the attribute off the fake tensor
    # and can wrap it only if it is one of these names. So `x.fp8_data` / `x.scale` (and to_hp)
    # work under torch.compile.
    def _stable_hash_for_caching(self) -> str:
        # AOT autograd's cache key: metadata and inner layouts, not values
        layout = [(tuple(t.shape), t.stride(), t.dtype) for t in (self.fp8_data, self.scale)]
        return repr((type(self).__name__, self._orig_dtype, layout))

    def __tensor_flatten__(self):
        return ["fp8_data", "scale"], (self._orig_dtype,)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, metadata, outer_size, outer_stride):
        (orig_dtype,) = metadata
        return Float8Tensor(inner_tensors["fp8_data"], inner_tensors["scale"], orig_dtype)

    # ---- pickling (torch.save / torch.load(weights_only=True)) -----------------------------

    def __reduce_ex__(self, protocol):
        # float8 data travels as a uint8 view: plain `pickle` of a float8 tensor fails on load
        # in torch (its legacy storage path has no float8 storage type); torch.save is fine.
        data_u8 = self.fp8_data.view(torch.uint8)
        return _rebuild_float8_tensor, (data_u8, self.scale, self._orig_dtype, self.fp8_data.dtype)

    # ---- dispatch: the op table lives in tensor_ops.py --------------------------------------------

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from .tensor_ops import FLOAT8_OPS  # lazy: tensor_ops.py imports this module

        kwargs = kwargs or {}
        handler = FLOAT8_OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"Float8Tensor does not support {func}; call .to_hp() to get a plain tensor first"
            )
        out = handler(func, args, kwargs)
        return return_and_correct_aliasing(func, args, kwargs, out)


def _rebuild_float8_tensor(data, scale, orig_dtype, float8_dtype=None):
    # float8_dtype=None: saved before data was stored as uint8 (see __reduce_ex__)
    if float8_dtype is not None:
        data = data.view(float8_dtype)
    return Float8Tensor(data, scale, orig_dtype)


def _check_from_hp_args(hp, float8_dtype, granularity):
    if not isinstance(hp, torch.Tensor) or not hp.is_floating_point():
        # name the field and the dtype: the repr of an integer tensor does not show its dtype
        got = f"dtype {hp.dtype}" if isinstance(hp, torch.Tensor) else type(hp).__name__
        raise ValueError(f"Float8Tensor.from_hp: hp must be a floating-point tensor, got {got}")
    check_choice("float8_dtype", float8_dtype, FLOAT8_DTYPES)
    check_choice("granularity", granularity, GRANULARITIES)


def _check_scale_shape(hp, scale, granularity):
    expected = () if granularity == "tensorwise" else (*hp.shape[:-1], 1)
    ok = scale.numel() == 1 if granularity == "tensorwise" else tuple(scale.shape) == expected
    if not ok:
        want = "a scalar" if granularity == "tensorwise" else f"shape {list(expected)}"
        raise ValueError(
            f"Float8Tensor.from_hp: a {granularity} scale for shape {list(hp.shape)} must be "
            f"{want}, got shape {list(scale.shape)}"
        )


def register_safe_globals() -> None:
    """Let `torch.load(weights_only=True)` rebuild Float8Tensors (called by the package init)."""
    torch.serialization.add_safe_globals([Float8Tensor, _rebuild_float8_tensor])
