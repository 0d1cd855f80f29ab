"""Numerics against torchao's float8 training (`convert_to_float8_training`), eager mode.

Tensorwise is the contract's bitwise guarantee; the rowwise recipes follow the same choices as
torchao (power-of-two scales, the unit-scale grad GEMMs, bf16 rowwise output), so they are
checked bitwise as well, and against the SQNR >= 40 dB floor the contract promises.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from compile_fp8 import Float8Config, compile_fp8
from helpers import bits_equal, sqnr

torchao_float8 = pytest.importorskip("torchao.float8")

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _two_layer(dtype, bias):
    return nn.Sequential(nn.Linear(64, 96, bias=bias), nn.Linear(96, 32, bias=bias)).to(dtype)


def _run(model, x, grad):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"output": out, "grad_input": x.grad, **grads}


def _ours_and_torchao(recipe, dtype, bias, input_shape, device, cast_kernels="inductor"):
    base = _two_layer(dtype, bias).to(device)
    theirs = torchao_float8.convert_to_float8_training(
        copy.deepcopy(base),
        config=torchao_float8.Float8LinearConfig.from_recipe_name(recipe),
    )
    # emulate=False: torch._scaled_mm on every device, as torchao runs it (on CPU the reference
    # kernel, which warns: slow, but the bits are the contract here)
    config = Float8Config(recipe=recipe, cast_kernels=cast_kernels, emulate=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "compile_fp8: Float8Config.emulate=False. on CPU")
        ours = compile_fp8(copy.deepcopy(base), config, compile=False)
    x = torch.randn(*input_shape, 64, dtype=dtype, device=device)
    grad = torch.randn(*input_shape, 32, dtype=dtype, device=device)
    return _run(ours, x, grad), _run(theirs, x, grad)


@pytest.mark.parametrize("input_shape", [(48,), (3, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cast_kernels", ["inductor", "triton"])
def test_tensorwise_bitwise_equals_torchao(cast_kernels, device, dtype, bias, input_shape):
    """cast_kernels="triton": the dual-cast path (on CPU its torch fallbacks) gives the same bits."""
    ours, theirs = _ours_and_torchao("tensorwise", dtype, bias, input_shape, device, cast_kernels)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert bits_equal(ours[name], theirs[name]), f"{name}: sqnr {sqnr(theirs[name], ours[name])}"


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("device", DEVICES)
def test_rowwise_recipes_match_torchao(device, recipe, dtype):
    ours, theirs = _ours_and_torchao(recipe, dtype, True, (2, 24), device)
    for name in ours:
        s = sqnr(theirs[name], ours[name])
        assert s >= 40, f"{recipe} {name}: sqnr {s:.1f} dB vs torchao"
        assert bits_equal(ours[name], theirs[name]), f"{recipe} {name}: sqnr {s:.1f} dB"


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("tokens", [64, 21], ids=["aligned", "unaligned_tokens"])
@pytest.mark.parametrize("device", DEVICES)
def test_recipes_close_to_high_precision(device, tokens, recipe):
    """Against a float32 reference (no FP8): every recipe within its expected noise floor.
    21 tokens: grad_weight contracts over tokens, which _scaled_mm on CUDA needs padded to 16."""
    base = _two_layer(torch.float32, bias=True).to(device)
    ours = compile_fp8(copy.deepcopy(base), Float8Config(recipe=recipe), compile=False)
    x = torch.randn(tokens, 64, device=device)
    grad = torch.randn(tokens, 32, device=device)
    ref, got = _run(base, x, grad), _run(ours, x, grad)
    floor = {"output": 20, "grad_input": 15}  # e5m2 gradients have 2 mantissa bits
    for name in ref:
        s = sqnr(ref[name], got[name])
        assert s >= floor.get(name, 15), f"{recipe} {name}: sqnr {s:.1f} dB vs float32"


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fast_accum_all_keeps_gradients_close(recipe):
    """fast_accum="all" on a long contraction (grad_weight sums 16384 tokens): its gradients stay
    within 1 dB of the default's SQNR against float32, and they are computed differently."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1024, 512)).cuda()
    x = torch.randn(16384, 1024, device="cuda")
    grad = torch.randn(16384, 512, device="cuda")
    ref = _run(base, x, grad)
    runs = {
        how: _run(compile_fp8(copy.deepcopy(base), Float8Config(recipe=recipe, fast_accum=how), compile=False), x, grad)
        for how in ("forward", "all")
    }
    for name in ("grad_input", "0.weight"):
        default, fast = (sqnr(ref[name], runs[how][name]) for how in ("forward", "all"))
        assert fast >= default - 1.0, f"{recipe} {name}: {fast:.1f} dB vs {default:.1f} dB (default)"
    assert not bits_equal(runs["forward"]["0.weight"], runs["all"]["0.weight"])
