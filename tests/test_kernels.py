"""kernels/cast.py: the Triton amax and dual-layout cast equal the torch references, bit for bit.

Three levels:
* the public functions' torch fallbacks, everywhere (CI has no triton);
* the kernels in Triton's CPU interpreter: `TRITON_INTERPRET=1 python -m pytest
  tests/test_kernels.py` with triton installed (skipped otherwise);
* the real kernels on CUDA (`gpu`), eager and inside torch.compile(fullgraph=True).

NaN: positions must match, not bits (the hardware cast may drop a NaN's sign; torch keeps it).
"""

from functools import partial

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from compile_fp8.kernels import cast as kernels
from compile_fp8.kernels.triton_support import interpreting
from compile_fp8.scaling import amax_to_scale, saturated_cast

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
SHAPES = [(37, 50), (128, 64), (1000, 96)]
INTERPRETING = kernels.triton is not None and interpreting()

interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="Triton's CPU interpreter: needs triton and TRITON_INTERPRET=1"
)
# the interpreter's numpy warns on inf * 0 and on float32 overflow: both are part of the inputs
quiet = pytest.mark.filterwarnings("ignore::RuntimeWarning")
compiled_kernels = pytest.mark.skipif(INTERPRETING, reason="TRITON_INTERPRET=1: no GPU kernels")


def _mixed_input(shape, hp_dtype, device="cpu"):
    """Magnitudes 2**-24 .. 2**18 (float8 subnormals to saturation in both formats), random signs,
    plus exact zeros, -0.0 and +-inf."""
    n = shape[0] * shape[1]
    exponent = torch.empty(n).uniform_(-24, 18)
    x = torch.randn(n).sign() * torch.exp2(exponent) * (1 + torch.rand(n))
    x[: n // 50] = 0.0
    x[n // 50 : n // 25] = -0.0
    x[[3, 7]] = torch.tensor([float("inf"), float("-inf")])
    return x[torch.randperm(n)].reshape(shape).to(device, hp_dtype)


def _with_nan(x):
    x = x.clone()
    nans = torch.tensor([float("nan"), -float("nan")], dtype=x.dtype, device=x.device)
    x.view(-1)[[5, x.numel() // 2]] = nans
    return x


def assert_fp8_equal(actual, expected, what=""):
    """Same float8 bits everywhere except NaN, which must be NaN exactly where expected is."""
    got, want = (actual.shape, actual.dtype), (expected.shape, expected.dtype)
    assert got == want, f"{what}: {got}, want {want}"
    nan = expected.float().isnan()
    got_nan = actual.float().isnan()
    assert torch.equal(got_nan, nan), f"{what}: NaN at {got_nan.sum()} places, want {nan.sum()}"
    diff = (actual.view(torch.uint8) != expected.view(torch.uint8)) & ~nan
    first = diff.nonzero()[:3].tolist()
    assert not diff.any(), f"{what}: {diff.sum()} of {diff.numel()} bytes differ, first at {first}"


def assert_amax_equal(actual, expected):
    assert actual.dtype == torch.float32 and actual.shape == (), (actual.dtype, actual.shape)
    same = actual.isnan() & expected.isnan() or actual == expected
    assert same, f"amax {actual.item()!r}, want {expected.item()!r}"


def check_cast_dual(cast_dual, x, scale, float8_dtype):
    row, col = cast_dual(x, scale, float8_dtype)
    expected = saturated_cast(x, scale, float8_dtype)
    m, k = x.shape
    assert row.stride() == (k, 1) and col.stride() == (1, m), (row.stride(), col.stride())
    assert_fp8_equal(row, expected, "row-major")
    assert_fp8_equal(col, expected, "column-major")


def _tensorwise_casts(amax, cast_dual):
    def casts(x, grad):  # forward's input (e4m3) and backward's grad_output (e5m2)
        x_scale = amax_to_scale(amax(x), torch.float8_e4m3fn)
        grad_scale = amax_to_scale(amax(grad), torch.float8_e5m2)
        return (*cast_dual(x, x_scale, torch.float8_e4m3fn),
                *cast_dual(grad, grad_scale, torch.float8_e5m2))  # fmt: skip

    return casts


# ---- the torch fallbacks (every machine) ---------------------------------------------------


def test_triton_unavailable_on_cpu():
    assert not kernels.triton_available("cpu")


@pytest.mark.parametrize("hp_dtype", [torch.bfloat16, torch.float32])
def test_fallback_amax(hp_dtype):
    x = _mixed_input((37, 50), hp_dtype)
    assert_amax_equal(kernels.amax(x), torch.max(torch.abs(x)).float())
    assert_amax_equal(kernels.amax(_with_nan(x)), torch.tensor(float("nan")))


@pytest.mark.parametrize("float8_dtype", FP8)
def test_fallback_cast_dual(float8_dtype):
    x = _with_nan(_mixed_input((37, 50), torch.bfloat16))
    check_cast_dual(kernels.cast_dual, x, torch.tensor(3.7), float8_dtype)


def test_cast_dual_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D x"):
        kernels.cast_dual(torch.ones(2, 3, 4), torch.tensor(1.0), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float8_dtype"):
        kernels.cast_dual(torch.ones(2, 3), torch.tensor(1.0), torch.float8_e4m3fnuz)


def test_fallback_compiles_fullgraph():
    casts = _tensorwise_casts(kernels.amax, kernels.cast_dual)
    x = _mixed_input((64, 48), torch.bfloat16).nan_to_num(posinf=1.0, neginf=-1.0)
    grad = _mixed_input((64, 32), torch.bfloat16).nan_to_num(posinf=1.0, neginf=-1.0)
    for actual, expected in zip(torch.compile(casts, fullgraph=True)(x, grad), casts(x, grad)):
        assert actual.stride() == expected.stride(), (actual.stride(), expected.stride())
        assert_fp8_equal(actual, expected, "compiled")


# ---- the kernels in Triton's CPU interpreter -----------------------------------------------


@interpreter
@quiet
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("hp_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_interpreted_amax(shape, hp_dtype):
    x = _mixed_input(shape, hp_dtype)
    finite = x.clone().nan_to_num_(posinf=1.0, neginf=-2.0)
    for case in (finite, x, _with_nan(x)):  # exact max, inf, NaN
        assert_amax_equal(torch.ops.compile_fp8.amax(case), torch.max(torch.abs(case)).float())


@interpreter
@quiet
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("hp_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("float8_dtype", FP8, ids=str)
def test_interpreted_cast_dual(shape, hp_dtype, float8_dtype):
    """float32 runs the torch code inside the op (kernels.CAST_KERNEL_DTYPES)."""
    x = _with_nan(_mixed_input(shape, hp_dtype))
    for scale in (1.0, 3.7, 2.0**-10):
        check_cast_dual(torch.ops.compile_fp8.cast_dual, x, torch.tensor(scale), float8_dtype)


@interpreter
@quiet
@pytest.mark.parametrize("float8_dtype", FP8, ids=str)
def test_interpreted_cast_every_bf16(float8_dtype):
    """All 65536 bf16 bit patterns at scales that move them through rounding ties, float8
    subnormals and saturation: the kernel's software round-to-nearest-even is torch's."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for scale in (1.0, 3.7, 1e-3, 2.0**-20, 448.0):
        scale = torch.tensor(scale)
        check_cast_dual(torch.ops.compile_fp8.cast_dual, x.reshape(256, 256), scale, float8_dtype)


@interpreter
@quiet
@pytest.mark.parametrize("float8_dtype", FP8, ids=str)
def test_interpreted_kernel_on_float32(float8_dtype):
    """The kernel itself is right for float32 in the interpreter (the op routes float32 to torch
    because of what the GPU build did: kernels.CAST_KERNEL_DTYPES)."""
    x = _with_nan(_mixed_input((128, 64), torch.float32))
    launch = partial(kernels._launch_cast_dual, soft_cast=True, **kernels.CAST_CONFIG)
    check_cast_dual(launch, x, torch.tensor(3.7), float8_dtype)


@interpreter
@quiet
def test_interpreted_non_contiguous_input():
    x = _mixed_input((50, 37), torch.bfloat16).t()
    check_cast_dual(torch.ops.compile_fp8.cast_dual, x, torch.tensor(2.0), torch.float8_e4m3fn)
    assert_amax_equal(torch.ops.compile_fp8.amax(x), torch.max(torch.abs(x)).float())


# ---- the real kernels on CUDA --------------------------------------------------------------


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("shape", SHAPES + [(16384, 1024)], ids=str)
@pytest.mark.parametrize("hp_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_amax(shape, hp_dtype):
    x = _mixed_input(shape, hp_dtype, "cuda")
    assert kernels.triton_available(x.device)
    finite = x.clone().nan_to_num_(posinf=1.0, neginf=-2.0)
    for case in (finite, x, _with_nan(x)):
        assert_amax_equal(kernels.amax(case), kernels.amax_reference(case))


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("shape", SHAPES + [(4096, 1000)], ids=str)
@pytest.mark.parametrize("hp_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("float8_dtype", FP8, ids=str)
def test_gpu_cast_dual(shape, hp_dtype, float8_dtype):
    x = _with_nan(_mixed_input(shape, hp_dtype, "cuda"))
    for scale in (1.0, 3.7, 2.0**-10):
        check_cast_dual(kernels.cast_dual, x, torch.tensor(scale, device="cuda"), float8_dtype)


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("float8_dtype", FP8, ids=str)
def test_gpu_hardware_and_software_casts_agree(float8_dtype):
    """The hardware cvt and the software cast the interpreter tests, on all bf16 patterns."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).cuda()
    x = x.reshape(256, 256)
    for scale in (1.0, 3.7, 1e-3, 2.0**-20, 448.0):
        scale = torch.tensor(scale, device="cuda")
        expected = saturated_cast(x, scale, float8_dtype)
        for soft in (False, True):
            launch = partial(kernels._launch_cast_dual, soft_cast=soft, **kernels.CAST_CONFIG)
            row, col = launch(x, scale, float8_dtype)
            assert_fp8_equal(row, expected, f"soft={soft} row")
            assert_fp8_equal(col, expected, f"soft={soft} col")


@pytest.mark.gpu
@compiled_kernels
def test_gpu_ops_inside_compile():
    x = _mixed_input((1000, 96), torch.bfloat16, "cuda").nan_to_num(posinf=1.0, neginf=-1.0)
    grad = _mixed_input((1000, 64), torch.bfloat16, "cuda").nan_to_num(posinf=1.0, neginf=-1.0)
    compiled = torch.compile(_tensorwise_casts(kernels.amax, kernels.cast_dual), fullgraph=True)
    outputs, (code, *_) = run_and_get_code(compiled, x, grad)
    assert "_amax_kernel" in code and "_cast_dual_kernel" in code, code
    reference = _tensorwise_casts(kernels.amax_reference, kernels.cast_dual_reference)(x, grad)
    for actual, expected, name in zip(outputs, reference, ["x", "x_col", "grad", "grad_col"]):
        assert actual.stride() == expected.stride(), (name, actual.stride(), expected.stride())
        assert_fp8_equal(actual, expected, name)

