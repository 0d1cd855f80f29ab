"""The training weight: optimizers step the master weight; other ops see a plain tensor."""

import copy

import pytest
import torch
from torch import nn

from compile_fp8 import Float8TrainingWeight, compile_fp8
from helpers import bits_equal

OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adamw_forloop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
}


def _pair():
    base = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16, bias=False))
    return copy.deepcopy(base), compile_fp8(copy.deepcopy(base), compile=False)


def _master(p):
    return p.hp if isinstance(p, Float8TrainingWeight) else p.detach()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_steps_master_weight_like_plain(name):
    """Same gradients in, same parameters out: the optimizer sees the master weight."""
    plain, converted = _pair()
    opt_plain, opt_conv = OPTIMIZERS[name](plain.parameters()), OPTIMIZERS[name](converted.parameters())
    for _ in range(3):
        for p_plain, p_conv in zip(plain.parameters(), converted.parameters()):
            grad = torch.randn_like(p_plain)
            p_plain.grad, p_conv.grad = grad.clone(), grad.clone()
        opt_plain.step()
        opt_conv.step()
    for (n, p_plain), p_conv in zip(plain.named_parameters(), converted.parameters()):
        assert bits_equal(p_plain.detach(), _master(p_conv)), n
    assert isinstance(converted[0].weight, Float8TrainingWeight)


def test_other_ops_see_a_plain_tensor():
    _, converted = _pair()
    weight = converted[0].weight
    doubled = weight * 2
    assert type(doubled) is torch.Tensor and bits_equal(doubled, weight.hp * 2)
    assert type(weight.sum()) is torch.Tensor
    assert isinstance(weight.detach(), Float8TrainingWeight)
    assert isinstance(weight.data, Float8TrainingWeight)
    as_double = weight.to(torch.float64)
    assert isinstance(as_double, Float8TrainingWeight) and as_double.hp.dtype == torch.float64


def test_gradient_is_a_plain_tensor_of_the_weight_dtype():
    _, converted = _pair()
    converted(torch.randn(8, 32)).sum().backward()
    grad = converted[0].weight.grad
    assert type(grad) is torch.Tensor and grad.dtype == torch.float32 and grad.shape == (48, 32)


def test_frozen_weight_still_passes_input_gradients():
    _, converted = _pair()
    converted[0].weight.requires_grad_(False)
    x = torch.randn(8, 32, requires_grad=True)
    converted(x).sum().backward()
    assert converted[0].weight.grad is None
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_autocast_bf16_over_fp32_master_weights():
    _, converted = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = converted(torch.randn(8, 32))
    assert out.dtype == torch.bfloat16, out.dtype
    out.float().sum().backward()
    grad = converted[0].weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), grad.dtype


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_backward_keeps_the_float8_copies_where_forward_and_backward_cast_alike(recipe):
    """Tensorwise: input and weight are cast once, and backward keeps those float8 copies (half
    the bytes of bf16); rowwise casts them along other dims in backward, so it keeps bf16."""
    from compile_fp8 import Float8Config

    torch.manual_seed(0)
    layer = compile_fp8(nn.Linear(32, 48).bfloat16(), Float8Config(recipe=recipe), compile=False)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16, requires_grad=True)
    saved = {}

    def pack(t):
        if t.dim() == 2:
            saved[tuple(t.shape)] = t.dtype
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.float().square().sum().backward()
    want = torch.float8_e4m3fn if recipe == "tensorwise" else torch.bfloat16
    assert saved == {(16, 32): want, (48, 32): want}, saved
    assert x.grad is not None and layer.weight.grad is not None
