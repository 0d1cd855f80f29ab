"""Float8Tensor: quantization, the op table, GEMMs, serialization, repr and torch.compile (CPU)."""

import copy
import io
import pickle

import expecttest
import pytest
import torch
import torch.nn.functional as F

from compile_fp8 import Float8Tensor
from tests.helpers import bits_equal, sqnr

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FLOAT8_DTYPES = [E4M3, E5M2]
GRANULARITIES = ["tensorwise", "rowwise"]
# round-trip SQNR floors for random normal data: e4m3 has 3 mantissa bits (~31.5 dB measured),
# e5m2 has 2 (~25.6 dB measured)
ROUND_TRIP_MIN_SQNR = {E4M3: 30.0, E5M2: 25.0}
M, K, N = 16, 32, 16
RESHAPES = {"view": torch.Tensor.view, "reshape": torch.Tensor.reshape}
COPIES = {"clone": torch.Tensor.clone, "detach": torch.Tensor.detach}


def ref_scale(hp: torch.Tensor, float8_dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """finfo.max / amax, divided in float64 and then rounded to float32 (the package convention)."""
    amax = hp.abs().amax(dim=-1, keepdim=True) if rowwise else hp.abs().max()
    return (torch.finfo(float8_dtype).max / amax.double()).float()


def ref_scaled_mm(a: Float8Tensor, b: Float8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm called by hand: row-major A, column-major B, inverse scales."""
    return torch._scaled_mm(
        a.fp8_data,
        b.fp8_data.t().contiguous().t(),
        scale_a=1 / a.scale,
        scale_b=1 / b.scale,
        out_dtype=out_dtype,
    )


# ---- from_hp / to_hp ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(M, K), (2, 8, K)], ids=["2d", "3d"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES, ids=["e4m3", "e5m2"])
def test_from_hp_round_trip(float8_dtype, granularity, shape):
    hp = torch.randn(shape)
    x = Float8Tensor.from_hp(hp, float8_dtype=float8_dtype, granularity=granularity)
    assert isinstance(x, Float8Tensor), f"type {type(x)}"
    assert x.shape == hp.shape and x.dtype == hp.dtype, f"shape {x.shape}, dtype {x.dtype}"
    assert x.fp8_data.dtype == float8_dtype, f"fp8_data dtype {x.fp8_data.dtype}"
    assert x.granularity == granularity, f"granularity {x.granularity}"
    expected_scale_shape = hp.shape[:-1] + (1,) if granularity == "rowwise" else ()
    assert x.scale.shape == expected_scale_shape, f"scale shape {tuple(x.scale.shape)}"
    assert x.scale.dtype == torch.float32, f"scale dtype {x.scale.dtype}"
    s = sqnr(hp, x.to_hp())
    assert s > ROUND_TRIP_MIN_SQNR[float8_dtype], f"round-trip sqnr {s:.1f} dB"


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES, ids=["e4m3", "e5m2"])
def test_scale_convention(float8_dtype, granularity):
    hp = torch.randn(2, 8, K) * 3
    x = Float8Tensor.from_hp(hp, float8_dtype=float8_dtype, granularity=granularity)
    expected = ref_scale(hp, float8_dtype, rowwise=granularity == "rowwise")
    assert bits_equal(x.scale, expected), f"max |scale - ref| {(x.scale - expected).abs().max()}"
    # scale multiplies hp -> fp8, so dequantizing divides by it
    dequant = x.fp8_data.float() / x.scale
    assert bits_equal(x.to_hp(), dequant), f"max |diff| {(x.to_hp() - dequant).abs().max()}"
    # amax lands on the top of the float8 range
    top = x.fp8_data.float().abs().max().item()
    assert top == torch.finfo(float8_dtype).max, f"max |fp8_data| {top}"


def test_to_hp_keeps_original_dtype():
    hp = torch.randn(M, K, dtype=torch.bfloat16)
    x = Float8Tensor.from_hp(hp)
    assert x.dtype == torch.bfloat16, f"dtype {x.dtype}"
    assert x.to_hp().dtype == torch.bfloat16, f"to_hp dtype {x.to_hp().dtype}"
    assert x.to_hp(torch.float32).dtype == torch.float32, f"dtype {x.to_hp(torch.float32).dtype}"
    s = sqnr(hp, x.to_hp())
    assert s > 28, f"sqnr {s:.1f} dB"


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_given_scale_is_used_as_is(granularity):
    hp = torch.randn(M, K)
    scale = torch.tensor(3.5) if granularity == "tensorwise" else torch.rand(M, 1) + 0.5
    x = Float8Tensor.from_hp(hp, scale=scale, granularity=granularity)
    assert bits_equal(x.scale, scale), f"scale {x.scale} vs given {scale}"
    expected = (hp * scale).to(E4M3)  # in range: no saturation involved
    assert bits_equal(x.fp8_data, expected), f"{(x.fp8_data != expected).sum()} fp8 values differ"


@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES, ids=["e4m3", "e5m2"])
def test_saturates_instead_of_overflowing(float8_dtype):
    fmax = torch.finfo(float8_dtype).max
    hp = torch.tensor([1e9, -1e9, fmax * 2, 1.0])
    x = Float8Tensor.from_hp(hp, float8_dtype=float8_dtype, scale=torch.tensor(1.0))
    data = x.fp8_data.float()
    assert torch.isfinite(data).all(), f"fp8_data {data.tolist()}"
    assert data.tolist() == [fmax, -fmax, fmax, 1.0], f"fp8_data {data.tolist()}"


def test_plain_e5m2_cast_overflows_to_inf():
    # the reason for the clamp above: without it e5m2 gives inf
    plain = torch.tensor([1e9]).to(E5M2).float()
    assert torch.isinf(plain).all(), f"plain cast {plain.tolist()}"


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES, ids=["e4m3", "e5m2"])
def test_all_zero_tensor(float8_dtype, granularity):
    x = Float8Tensor.from_hp(torch.zeros(4, K), float8_dtype=float8_dtype, granularity=granularity)
    assert torch.isfinite(x.scale).all(), f"scale {x.scale.flatten().tolist()}"
    assert (x.scale > 0).all(), f"scale {x.scale.flatten().tolist()}"
    assert (x.fp8_data.float() == 0).all(), f"fp8_data {x.fp8_data.float().unique().tolist()}"
    assert (x.to_hp() == 0).all(), f"to_hp {x.to_hp().unique().tolist()}"


def test_from_hp_bad_granularity():
    with pytest.raises(ValueError, match="granularity='colwise'"):
        Float8Tensor.from_hp(torch.randn(4, 4), granularity="colwise")


def test_from_hp_bad_float8_dtype():
    with pytest.raises(ValueError, match=r"float8_dtype=torch\.float16"):
        Float8Tensor.from_hp(torch.randn(4, 4), float8_dtype=torch.float16)


def test_from_hp_integer_tensor():
    int_hp = torch.arange(16).reshape(4, 4)
    message = r"hp must be a floating-point tensor, got dtype torch\.int64"
    with pytest.raises(ValueError, match=message):
        Float8Tensor.from_hp(int_hp)


@pytest.mark.parametrize(
    "granularity, scale_shape", [("tensorwise", (4,)), ("rowwise", (4,)), ("rowwise", (1, 4))]
)
def test_from_hp_scale_of_wrong_shape(granularity, scale_shape):
    hp, scale = torch.randn(4, 4), torch.ones(scale_shape)
    with pytest.raises(ValueError, match=rf"{granularity} scale for shape \[4, 4\] must be"):
        Float8Tensor.from_hp(hp, granularity=granularity, scale=scale)


# ---- op table: views, copies, moves -------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize(
    "transpose", [lambda x: x.t(), lambda x: x.transpose(0, 1)], ids=["t", "transpose"]
)
def test_transpose(transpose, granularity):
    x = Float8Tensor.from_hp(torch.randn(M, K), granularity=granularity)
    y = transpose(x)
    assert isinstance(y, Float8Tensor), f"type {type(y)}"
    assert y.shape == (K, M), f"shape {tuple(y.shape)}"
    assert bits_equal(y.fp8_data, x.fp8_data.t()), "fp8_data is not the transposed data"
    expected_scale_shape = (1, M) if granularity == "rowwise" else ()
    assert y.scale.shape == expected_scale_shape, f"scale shape {tuple(y.scale.shape)}"
    expected = x.to_hp().t()
    assert bits_equal(y.to_hp(), expected), f"max |diff| {(y.to_hp() - expected).abs().max()}"


def test_transpose_same_dim_is_a_no_op():
    x = Float8Tensor.from_hp(torch.randn(M, K), granularity="rowwise")
    y = x.transpose(1, 1)
    assert y.shape == (M, K), f"shape {tuple(y.shape)}"
    assert y.scale.shape == (M, 1), f"scale shape {tuple(y.scale.shape)}"
    assert bits_equal(y.to_hp(), x.to_hp()), f"max |diff| {(y.to_hp() - x.to_hp()).abs().max()}"


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("reshape", RESHAPES.values(), ids=RESHAPES.keys())
def test_view_leading_dims(reshape, granularity):
    x = Float8Tensor.from_hp(torch.randn(2, 8, K), granularity=granularity)
    y = reshape(x, 16, K)
    assert isinstance(y, Float8Tensor), f"type {type(y)}"
    assert y.shape == (16, K), f"shape {tuple(y.shape)}"
    expected_scale_shape = (16, 1) if granularity == "rowwise" else ()
    assert y.scale.shape == expected_scale_shape, f"scale shape {tuple(y.scale.shape)}"
    expected = x.to_hp().reshape(16, K)
    assert bits_equal(y.to_hp(), expected), f"max |diff| {(y.to_hp() - expected).abs().max()}"
    z = reshape(y, 4, -1, K)
    assert z.shape == (4, 4, K), f"shape {tuple(z.shape)}"
    expected = x.to_hp().reshape(4, 4, K)
    assert bits_equal(z.to_hp(), expected), f"max |diff| {(z.to_hp() - expected).abs().max()}"


def test_view_tensorwise_may_change_last_dim():
    x = Float8Tensor.from_hp(torch.randn(M, K))
    y = x.view(-1)
    assert y.shape == (M * K,), f"shape {tuple(y.shape)}"
    assert bits_equal(y.to_hp(), x.to_hp().view(-1)), "values changed"


@pytest.mark.parametrize("reshape", RESHAPES.values(), ids=RESHAPES.keys())
def test_view_rowwise_last_dim_raises(reshape):
    x = Float8Tensor.from_hp(torch.randn(M, K), granularity="rowwise")
    with pytest.raises(NotImplementedError, match="leading dims only"):
        reshape(x, M, 2, K // 2)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("copy_op", COPIES.values(), ids=COPIES.keys())
def test_clone_detach(copy_op, granularity):
    x = Float8Tensor.from_hp(torch.randn(M, K), granularity=granularity)
    y = copy_op(x)
    assert isinstance(y, Float8Tensor), f"type {type(y)}"
    assert bits_equal(y.fp8_data, x.fp8_data), f"{(y.fp8_data != x.fp8_data).sum()} values differ"
    assert bits_equal(y.scale, x.scale), f"scale {y.scale.flatten()[:4]} vs {x.scale.flatten()[:4]}"
    assert y.dtype == x.dtype, f"dtype {y.dtype}"


def test_clone_copies_storage():
    x = Float8Tensor.from_hp(torch.randn(M, K))
    y = x.clone()
    assert y.fp8_data.data_ptr() != x.fp8_data.data_ptr(), "clone shares fp8 storage"


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_to_dtype(granularity):
    x = Float8Tensor.from_hp(torch.randn(M, K), granularity=granularity)
    y = x.to(torch.bfloat16)
    assert isinstance(y, Float8Tensor), f"type {type(y)}"
    assert y.dtype == torch.bfloat16, f"dtype {y.dtype}"
    assert y.to_hp().dtype == torch.bfloat16, f"to_hp dtype {y.to_hp().dtype}"
    assert bits_equal(y.fp8_data, x.fp8_data), "fp8 data changed"
    assert bits_equal(y.scale, x.scale), "scale changed"


@pytest.mark.parametrize("copy_", [False, True], ids=["no_copy", "copy"])
def test_to_device_cpu(copy_):
    x = Float8Tensor.from_hp(torch.randn(M, K))
    y = x.to(device="cpu", copy=copy_)
    assert isinstance(y, Float8Tensor), f"type {type(y)}"
    assert y.device.type == "cpu", f"device {y.device}"
    assert y.dtype == x.dtype, f"dtype {y.dtype}"
    assert bits_equal(y.fp8_data, x.fp8_data), "fp8 data changed"
    assert bits_equal(y.scale, x.scale), "scale changed"


def test_unsupported_op_sin():
    x = Float8Tensor.from_hp(torch.randn(4, 4))
    with pytest.raises(NotImplementedError, match=r"aten\.sin"):
        torch.sin(x)


def test_unsupported_op_add():
    x = Float8Tensor.from_hp(torch.randn(4, 4))
    with pytest.raises(NotImplementedError, match=r"aten\.add"):
        x + 1


# ---- GEMMs --------------------------------------------------------------------------------

MATMULS = {
    "mm": torch.mm,
    "matmul": torch.matmul,
    "at": lambda a, b: a @ b,
}


@pytest.mark.parametrize("orig_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("matmul", MATMULS.values(), ids=MATMULS.keys())
def test_mm_fp8_fp8_tensorwise_bitwise(matmul, orig_dtype):
    a = Float8Tensor.from_hp(torch.randn(M, K, dtype=orig_dtype))
    b = Float8Tensor.from_hp(torch.randn(N, K, dtype=orig_dtype)).t()  # [K, N]
    out = matmul(a, b)  # [M, K] @ [K, N] -> [M, N]
    assert type(out) is torch.Tensor, f"type {type(out)}"
    assert out.shape == (M, N) and out.dtype == orig_dtype, f"{tuple(out.shape)} {out.dtype}"
    expected = ref_scaled_mm(a, b, orig_dtype)
    assert bits_equal(out, expected), f"max |diff| {(out - expected).abs().max()}"
    s = sqnr(a.to_hp() @ b.to_hp(), out)
    assert s >= 30, f"sqnr {s:.1f} dB"


@pytest.mark.parametrize("matmul", MATMULS.values(), ids=MATMULS.keys())
@pytest.mark.parametrize("fp8_side", ["a", "b"])
def test_mm_fp8_and_hp(matmul, fp8_side):
    a_hp, b_hp = torch.randn(M, K), torch.randn(K, N)
    if fp8_side == "a":
        a = Float8Tensor.from_hp(a_hp)
        out, ref = matmul(a, b_hp), a.to_hp() @ b_hp
    else:
        b = Float8Tensor.from_hp(b_hp)
        out, ref = matmul(a_hp, b), a_hp @ b.to_hp()
    assert type(out) is torch.Tensor and out.shape == (M, N), f"{type(out)} {tuple(out.shape)}"
    s = sqnr(ref, out)  # the hp operand is cast to e4m3: close, not exact
    assert s >= 30, f"sqnr {s:.1f} dB"


@pytest.fixture
def scaled_mm_layouts(monkeypatch):
    """Records (A row-major, B column-major) for every torch._scaled_mm call.

    A CPU `_scaled_mm` accepts any layout, so only this spy can catch one cuBLASLt would reject.
    """
    layouts = []
    real_scaled_mm = torch._scaled_mm

    def spy(a, b, *args, **kwargs):
        layouts.append((a.is_contiguous(), b.t().is_contiguous()))
        return real_scaled_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    return layouts


@pytest.mark.parametrize("b_kind", ["w8_t", "row_major_kn"])
def test_mm_row_major_second_operand(b_kind, scaled_mm_layouts):
    a = Float8Tensor.from_hp(torch.randn(M, K))
    if b_kind == "w8_t":
        b = Float8Tensor.from_hp(torch.randn(N, K)).t()  # [K, N], column-major data
    else:
        b = Float8Tensor.from_hp(torch.randn(K, N))  # [K, N], row-major data
        assert b.fp8_data.is_contiguous(), f"stride {b.fp8_data.stride()}"
    out = a @ b  # [M, K] @ [K, N] -> [M, N]
    assert scaled_mm_layouts == [(True, True)], f"(A row-major, B col-major): {scaled_mm_layouts}"
    expected = ref_scaled_mm(a, b, torch.float32)
    assert bits_equal(out, expected), f"max |diff| {(out - expected).abs().max()}"
    s = sqnr(a.to_hp() @ b.to_hp(), out)
    assert s >= 30, f"sqnr {s:.1f} dB"


@pytest.mark.parametrize(
    "a_granularity,b_granularity",
    [("rowwise", "rowwise"), ("tensorwise", "rowwise"), ("rowwise", "tensorwise")],
)
def test_mm_rowwise(a_granularity, b_granularity):
    a = Float8Tensor.from_hp(torch.randn(M, K), granularity=a_granularity)  # scale [M, 1] / []
    b = Float8Tensor.from_hp(torch.randn(N, K), granularity=b_granularity).t()  # scale [1, N] / []
    out = a @ b  # [M, K] @ [K, N] -> [M, N]
    assert out.shape == (M, N) and out.dtype == torch.float32, f"{tuple(out.shape)} {out.dtype}"
    s = sqnr(a.to_hp() @ b.to_hp(), out)
    assert s >= 30, f"sqnr {s:.1f} dB"


def test_mm_rowwise_scales_along_wrong_dim():
    # b made directly from a [K, N] tensor has one scale per row of K: re-quantized internally
    a = Float8Tensor.from_hp(torch.randn(M, K), granularity="rowwise")
    b = Float8Tensor.from_hp(torch.randn(K, N), granularity="rowwise")
    out = a @ b
    s = sqnr(a.to_hp() @ b.to_hp(), out)
    assert s >= 30, f"sqnr {s:.1f} dB"


@pytest.mark.parametrize("input_shape", [(M, K), (2, 8, K)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("fp8", ["both", "input", "weight"])
def test_linear(fp8, bias, input_shape):
    x_hp, w_hp = torch.randn(input_shape), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    x = Float8Tensor.from_hp(x_hp) if fp8 in ("both", "input") else x_hp
    w = Float8Tensor.from_hp(w_hp) if fp8 in ("both", "weight") else w_hp
    out = F.linear(x, w, b)  # [..., K] @ [K, N] -> [..., N]
    assert type(out) is torch.Tensor, f"type {type(out)}"
    assert out.shape == input_shape[:-1] + (N,), f"shape {tuple(out.shape)}"
    x_ref = x.to_hp() if isinstance(x, Float8Tensor) else x
    w_ref = w.to_hp() if isinstance(w, Float8Tensor) else w
    s = sqnr(F.linear(x_ref, w_ref, b), out)
    assert s >= 30, f"sqnr {s:.1f} dB"


def test_mm_column_major_first_operand(scaled_mm_layouts):
    a = Float8Tensor.from_hp(torch.randn(K, M)).t()  # [M, K], column-major data
    b = Float8Tensor.from_hp(torch.randn(N, K)).t()  # [K, N]
    out = a @ b
    assert scaled_mm_layouts == [(True, True)], f"(A row-major, B col-major): {scaled_mm_layouts}"
    s = sqnr(a.to_hp() @ b.to_hp(), out)
    assert s >= 30, f"sqnr {s:.1f} dB"


def test_linear_fp8_fp8_bitwise():
    x = Float8Tensor.from_hp(torch.randn(M, K))
    w = Float8Tensor.from_hp(torch.randn(N, K))
    out = F.linear(x, w)
    expected = ref_scaled_mm(x, w.t(), torch.float32)
    assert bits_equal(out, expected), f"max |diff| {(out - expected).abs().max()}"


# ---- flatten / unflatten, copy, save, pickle ---------------------------------------------


def assert_same_float8(y, x):
    assert type(y) is Float8Tensor, f"type {type(y)}"
    assert y.shape == x.shape and y.dtype == x.dtype, f"{tuple(y.shape)} {y.dtype}"
    assert y.stride() == x.stride(), f"stride {y.stride()} vs {x.stride()}"
    assert bits_equal(y.fp8_data, x.fp8_data), f"{(y.fp8_data != x.fp8_data).sum()} values differ"
    assert bits_equal(y.scale, x.scale), f"scale {y.scale.flatten()[:4]} vs {x.scale.flatten()[:4]}"


FLOAT8_EXAMPLES = {
    "tensorwise": lambda: Float8Tensor.from_hp(torch.randn(M, K)),
    "rowwise_e5m2_bf16": lambda: Float8Tensor.from_hp(
        torch.randn(M, K, dtype=torch.bfloat16), float8_dtype=E5M2, granularity="rowwise"
    ),
    "rowwise_t": lambda: Float8Tensor.from_hp(torch.randn(M, K), granularity="rowwise").t(),
}


@pytest.mark.parametrize("make", FLOAT8_EXAMPLES.values(), ids=FLOAT8_EXAMPLES.keys())
def test_flatten_unflatten_round_trip(make):
    x = make()
    names, metadata = x.__tensor_flatten__()
    hash(metadata)  # metadata must be hashable: torch.compile guards on it
    inner = {name: getattr(x, name) for name in names}
    y = Float8Tensor.__tensor_unflatten__(inner, metadata, x.shape, x.stride())
    assert_same_float8(y, x)


@pytest.mark.parametrize("make", FLOAT8_EXAMPLES.values(), ids=FLOAT8_EXAMPLES.keys())
def test_deepcopy(make):
    x = make()
    y = copy.deepcopy(x)
    assert_same_float8(y, x)
    assert y.fp8_data.data_ptr() != x.fp8_data.data_ptr(), "deepcopy shares fp8 storage"


@pytest.mark.parametrize("make", FLOAT8_EXAMPLES.values(), ids=FLOAT8_EXAMPLES.keys())
def test_save_load_weights_only(make):
    x = make()
    buf = io.BytesIO()
    torch.save(x, buf)
    buf.seek(0)
    y = torch.load(buf, weights_only=True)
    assert_same_float8(y, x)


@pytest.mark.parametrize("make", FLOAT8_EXAMPLES.values(), ids=FLOAT8_EXAMPLES.keys())
def test_pickle(make):
    x = make()
    y = pickle.loads(pickle.dumps(x))
    assert_same_float8(y, x)


# ---- repr ---------------------------------------------------------------------------------


class TestRepr(expecttest.TestCase):
    def test_repr_tensorwise(self):
        x = Float8Tensor.from_hp(torch.randn(M, K))
        self.assertExpectedInline(
            repr(x),
            """Float8Tensor(shape=[16, 32], dtype=torch.float32, fp8=torch.float8_e4m3fn, tensorwise, device=cpu)""",  # noqa: E501
        )

    def test_repr_rowwise_e5m2_bf16(self):
        x = Float8Tensor.from_hp(
            torch.randn(2, 8, K, dtype=torch.bfloat16), float8_dtype=E5M2, granularity="rowwise"
        )
        self.assertExpectedInline(
            repr(x),
            """Float8Tensor(shape=[2, 8, 32], dtype=torch.bfloat16, fp8=torch.float8_e5m2, rowwise, device=cpu)""",  # noqa: E501
        )


# ---- torch.compile ------------------------------------------------------------------------


def test_compile_matmul_bitwise():
    a = Float8Tensor.from_hp(torch.randn(M, K))
    b = Float8Tensor.from_hp(torch.randn(N, K)).t()
    compiled = torch.compile(lambda a, b: a @ b, fullgraph=True)
    out, expected = compiled(a, b), a @ b
    assert bits_equal(out, expected), f"max |diff| {(out - expected).abs().max()}"


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_compile_from_hp_to_hp_bitwise(granularity):
    hp = torch.randn(M, K) * 5

    def quantize(hp):
        x = Float8Tensor.from_hp(hp, granularity=granularity)
        return x.fp8_data, x.scale, x.to_hp()

    out = torch.compile(quantize, fullgraph=True)(hp)
    expected = quantize(hp)
    for name, o, e in zip(["fp8_data", "scale", "to_hp"], out, expected):
        assert bits_equal(o, e), f"{name}: {(o != e).sum()} values differ"


def test_compile_returns_float8_tensor():
    hp = torch.randn(M, K) * 5
    x = torch.compile(lambda hp: Float8Tensor.from_hp(hp), fullgraph=True)(hp)
    assert_same_float8(x, Float8Tensor.from_hp(hp))
