"""torch.compile is a contract: fullgraph, pinned frame counts, eager == compiled, training works."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from compile_fp8 import Float8Config, compile_fp8
from compile_fp8.api import unwrap_compiled
from compile_fp8.config import CastSpec
from compile_fp8.scaling import cast_to_fp8
from helpers import bits_equal, sqnr


def _grads(model, x, grad):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return {"output": out, "grad_input": x.grad} | {
        n: p.grad for n, p in unwrap_compiled(model).named_parameters()
    }


CUDA = pytest.mark.gpu
CASES = [
    ("tensorwise", "cpu"),
    ("rowwise", "cpu"),
    ("tensorwise+triton", "cpu"),
    pytest.param(("tensorwise", "cuda"), marks=CUDA),
    pytest.param(("rowwise", "cuda"), marks=CUDA),
    pytest.param(("tensorwise+triton", "cuda"), marks=CUDA),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def eager_and_compiled(request):
    """One linear layer (bias, bf16), converted twice: eager, and compiled with a frame counter."""
    torch.manual_seed(0)
    recipe, device = request.param
    base = nn.Sequential(nn.Linear(64, 48)).to(device, torch.bfloat16)
    recipe, _, kernels = recipe.partition("+")  # "+triton": Float8Config(cast_kernels="triton")
    # emulate=False: the `_scaled_mm` path on every device (on CPU its reference kernel, which
    # warns) - the path whose eager == compile bits are the contract
    config = Float8Config(recipe=recipe, cast_kernels=kernels or "inductor", emulate=False)
    eager = compile_fp8(copy.deepcopy(base), config, compile=False)
    counter = CompileCounterWithBackend("inductor")
    compiled = compile_fp8(copy.deepcopy(base), config, backend=counter, fullgraph=True)
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16, device=device)
    grad = torch.randn(2, 16, 48, dtype=torch.bfloat16, device=device)
    return _grads(eager, x, grad), _grads(compiled, x, grad), counter


@pytest.mark.filterwarnings("ignore:compile_fp8. Float8Config.emulate=False. on CPU")
def test_eager_equals_compiled_bitwise(eager_and_compiled):
    eager, compiled, _ = eager_and_compiled
    for name in eager:
        s = sqnr(eager[name], compiled[name])
        assert s >= 40, f"{name}: sqnr {s:.1f} dB"
        assert bits_equal(eager[name], compiled[name]), f"{name}: sqnr {s:.1f} dB"


def test_fullgraph_one_frame(eager_and_compiled):
    *_, counter = eager_and_compiled
    assert counter.frame_count == 1, f"{counter.frame_count} frames: a graph break"


@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_scales_and_casts_bit_identical_under_compile(dtype, granularity):
    spec = CastSpec(dtype, granularity)
    x = torch.randn(32, 64, dtype=torch.bfloat16) * 3

    def cast(x):
        return cast_to_fp8(x, spec, rowwise_dim=1, pow2=granularity == "rowwise")

    (data_e, scale_e), (data_c, scale_c) = cast(x), torch.compile(cast, fullgraph=True)(x)
    assert bits_equal(scale_e, scale_c), f"scales differ: {scale_e.flatten()[:4]} vs {scale_c.flatten()[:4]}"
    assert bits_equal(data_e, data_c), "fp8 data differs between eager and compile"


def test_two_layers_eager_vs_compiled_sqnr():
    """Between layers inductor keeps the bias add in float32 (no bf16 rounding), which can move
    a few float8 roundings of the next layer's input: close, not bitwise; with inductor's
    `emulate_precision_casts` it is bitwise again."""
    base = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32)).to(torch.bfloat16)
    eager = compile_fp8(copy.deepcopy(base), compile=False)
    compiled = compile_fp8(copy.deepcopy(base), fullgraph=True)
    x, grad = torch.randn(64, 64, dtype=torch.bfloat16), torch.randn(64, 32, dtype=torch.bfloat16)
    ref, got = _grads(eager, x, grad), _grads(compiled, x, grad)
    for name in ref:
        s = sqnr(ref[name], got[name])
        assert s >= 30, f"{name}: sqnr {s:.1f} dB"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_compiled_training_loss_falls_without_recompiles(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 16)).to(device)
    target_net = copy.deepcopy(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = compile_fp8(model, backend=counter, fullgraph=True)
    opt = torch.optim.AdamW(compiled.parameters(), lr=3e-3, fused=True)
    losses = []
    for step in range(40):
        x = torch.randn(64, 32, device=device)
        with torch.no_grad():
            y = target_net(x) + 0.5 * torch.sin(x[:, :16])
        loss = nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, f"loss {first:.4f} -> {last:.4f}"
    assert counter.frame_count == 1, f"{counter.frame_count} frames over 40 steps: recompiles"
