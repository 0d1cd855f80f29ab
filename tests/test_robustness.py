"""Robustness: what users' models and habits throw at compile_fp8.

Each test asserts what a user would call right: the result the high-precision layer gives (up to
FP8 rounding), the same non-finite values it gives, or a clear error that says what to do.
docs/troubleshooting.md lists the failures and their fixes. Real HF models: test_hf_models.py.
CUDA variants carry the `gpu` marker (they skip without an sm89+ GPU).
"""

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

from compile_fp8 import (
    Float8Config,
    Float8Tensor,
    Float8TrainingWeight,
    calibrate,
    compile_fp8,
    fp8_layers,
)
from compile_fp8 import gemm
from compile_fp8.api import unwrap_compiled
from helpers import bits_equal, sqnr

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FP8 = "fp8 tensorwise dynamic (emulated)"  # on CPU the default emulates (gemm.choose_emulate)


def _convert(model, config=None, **kwargs):
    """compile_fp8 without compiling (unless compile=True is passed), warnings silenced."""
    kwargs.setdefault("compile", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_fp8(model, config, **kwargs)


def _mlp(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return _mlp_on_default_device().to(device, dtype)


def _mlp_on_default_device():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))


def _run(model, x, grad=None):
    """Output, grad_input and every parameter's gradient of one forward and backward."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(torch.ones_like(out) if grad is None else grad)
    params = {n: p.grad for n, p in unwrap_compiled(model).named_parameters()}
    return {"output": out, "grad_input": x.grad} | params


def _assert_close(ref: dict, got: dict, min_sqnr: float, what: str):
    for name in ref:
        s = sqnr(ref[name], got[name])
        assert s >= min_sqnr, f"{what} {name}: sqnr {s:.1f} dB < {min_sqnr}"


@pytest.fixture(scope="module", autouse=True)
def _many_compiled_models():
    """This module compiles ~20 small models; each new one recompiles the shared code objects
    (`Sequential.forward`, ...), past dynamo's default limit of 8 per code object."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.fixture(scope="module")
def compiled_mlp():
    """One compiled FP8 MLP (fullgraph) and its frame counter, shared by the compiled cases."""
    counter = CompileCounterWithBackend("inductor")
    return compile_fp8(_mlp(), backend=counter, fullgraph=True), counter


# ---- mixed precision ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_over_fp32_master_weights(dtype, device):
    """Autocast: FP8 GEMMs write the autocast dtype, as the layer would; grads stay fp32."""
    plain = _mlp(device)
    converted = _convert(copy.deepcopy(plain))
    x = torch.randn(4, 8, 32, device=device)
    with torch.autocast(device, dtype=dtype):
        ref, got = _run(plain, x), _run(converted, x)
    for name in ref:
        assert got[name].dtype == ref[name].dtype, f"{name}: {got[name].dtype} vs {ref[name].dtype}"
    assert got["output"].dtype == dtype and got["0.weight"].dtype == torch.float32
    assert isinstance(converted[0].weight, Float8TrainingWeight)
    _assert_close(ref, got, 20, f"autocast {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_weights(dtype, device):
    plain = _mlp(device, dtype)
    converted = _convert(copy.deepcopy(plain))
    x = torch.randn(4, 8, 32, device=device, dtype=dtype)
    ref, got = _run(plain, x), _run(converted, x)
    for name in ref:
        assert got[name].dtype == dtype, f"{name}: {got[name].dtype}"
    _assert_close(ref, got, 20, str(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("emulate", [False, True], ids=["scaled_mm", "emulated"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp16_output_overflow_is_inf_like_the_fp16_layer(recipe, emulate, device):
    """Decided: an fp16 result past 65504 is inf, exactly where the fp16 layer gives inf.

    FP8 scaling saturates the *operands* into the float8 range; the GEMM's result is written in
    the model's dtype and overflows as that dtype does, so loss scaling (GradScaler) and
    overflow checks see what they would see without FP8. Saturating it would hide the overflow.
    """
    layer = nn.Linear(64, 32, bias=False).to(device, torch.float16)
    with torch.no_grad():
        layer.weight.fill_(8.0)
        layer.weight[:16] = 0.01  # outputs 0..15 stay finite, 16..31 overflow (64*8*200 > 65504)
    x = torch.full((4, 64), 200.0, dtype=torch.float16, device=device)
    ref = layer(x)
    out = _convert(copy.deepcopy(layer), Float8Config(recipe=recipe, emulate=emulate))(x)
    assert out.dtype == torch.float16
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), f"inf at {torch.isinf(out).sum()} places, fp16 layer {torch.isinf(ref).sum()}"
    assert torch.isinf(out[:, 16:]).all() and torch.isfinite(out[:, :16]).all()


# ---- NaN, Inf, zeros, huge values -----------------------------------------------------------


def _with_bad_value(value, device="cpu"):
    x = torch.randn(2, 8, 32, device=device)
    x[1, 3, 5] = value
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_input_shows_in_the_loss(value, recipe, device):
    """A NaN/Inf reaching a layer makes the loss and the weight gradient non-finite, as in the
    high-precision model: scaling never turns it into finite numbers."""
    plain = _mlp(device)
    converted = _convert(copy.deepcopy(plain), Float8Config(recipe=recipe))
    for name, model in (("plain", plain), ("fp8", converted)):
        out = model(_with_bad_value(value, device))
        loss = out.square().mean()
        loss.backward()
        assert not torch.isfinite(loss), f"{name}: loss {loss.item()} with a {value} in the input"
        assert not torch.isfinite(model[0].weight.grad).all(), f"{name}: grad_weight all finite"


def test_nonfinite_input_shows_in_the_loss_compiled(compiled_mlp):
    model, _ = compiled_mlp
    for value in (float("nan"), float("inf")):
        loss = model(_with_bad_value(value)).square().mean()
        assert not torch.isfinite(loss), f"compiled: loss {loss.item()} with a {value} in the input"


def test_nan_in_a_weight_shows_in_the_loss():
    converted = _convert(_mlp())
    with torch.no_grad():
        converted[2].weight.hp[3, 7] = float("nan")
    loss = converted(torch.randn(4, 32)).square().mean()
    assert torch.isnan(loss), f"loss {loss.item()}"


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_all_zero_tensors_give_no_nan(recipe):
    """amax 0 -> the scale's floor (EPS) keeps it finite: zeros in, exact zeros/bias out."""
    converted = _convert(_mlp(), Float8Config(recipe=recipe))
    with torch.no_grad():
        converted[2].weight.zero_()
    got = _run(converted, torch.zeros(4, 8, 32), grad=torch.zeros(4, 8, 16))
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"{name} has {(~torch.isfinite(value)).sum()} non-finite"
    assert torch.equal(got["output"], converted[2].bias.detach().expand(4, 8, 16))
    assert not got["0.weight"].any(), "zero grad_output must give a zero gradient"
    zeros = Float8Tensor.from_hp(torch.zeros(16, 16), granularity=recipe)
    assert torch.isfinite(zeros.scale).all() and not zeros.to_hp().any(), zeros.scale


def test_all_zero_tensors_give_no_nan_compiled(compiled_mlp):
    model, _ = compiled_mlp
    got = _run(model, torch.zeros(2, 8, 32), grad=torch.zeros(2, 8, 16))
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"compiled {name} has non-finite values"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_huge_values_saturate(dtype):
    """Values past the scale's range saturate at +-max of the float8 type, never inf/NaN."""
    x = torch.tensor([1.0, -1.0, 1e6, -1e30, 3e38])
    fp8 = Float8Tensor.from_hp(x, float8_dtype=dtype, scale=torch.tensor(1.0))
    fmax = torch.finfo(dtype).max
    assert fp8.fp8_data.float().tolist() == [1.0, -1.0, fmax, -fmax, fmax], fp8.fp8_data


def test_huge_activation_saturates_under_static_scaling():
    """A calibrated (static) layer clips a value beyond its calibrated amax to that amax."""
    model = _convert(_mlp(), Float8Config(scaling="static"))
    calibrate(model, [torch.randn(64, 32) for _ in range(2)])
    amax = model[0].fp8_amax_input.item()
    x = torch.randn(4, 32)
    x[0, 0] = 1e30
    out = model(x)
    clipped = model(x.clamp(-amax, amax))
    assert torch.isfinite(out).all(), out
    assert bits_equal(out, clipped), f"sqnr {sqnr(clipped, out):.1f} dB"


def test_huge_values_under_dynamic_scaling_stay_finite_where_plain_does():
    plain = _mlp()
    converted = _convert(copy.deepcopy(plain))
    x = torch.randn(4, 32) * 1e35
    ref, out = plain(x), converted(x)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all(), out
    assert sqnr(ref, out) >= 20, f"sqnr {sqnr(ref, out):.1f} dB"


# ---- shapes ------------------------------------------------------------------------------------


def test_3d_and_4d_inputs_equal_the_flattened_2d_computation():
    converted = _convert(_mlp())
    x4 = torch.randn(2, 3, 5, 32)
    got4, got2 = _run(converted, x4), _run(converted, x4.reshape(-1, 32))
    assert got4["output"].shape == (2, 3, 5, 16)
    assert bits_equal(got4["output"].reshape(-1, 16), got2["output"])
    assert bits_equal(got4["grad_input"].reshape(-1, 32), got2["grad_input"])
    for name in ("0.weight", "2.weight", "2.bias"):
        assert bits_equal(got4[name], got2[name]), name
    x3_t = torch.randn(2, 32, 6).transpose(1, 2)  # a non-contiguous [2, 6, 32] view
    assert bits_equal(converted(x3_t), converted(x3_t.contiguous()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("tokens", [1, 7, 13, 33])
def test_token_counts_not_multiple_of_16(tokens, recipe, device):
    """M (tokens) is the contracted dim of grad_weight's GEMM: padded on CUDA, free on CPU."""
    plain = _mlp(device)
    converted = _convert(copy.deepcopy(plain), Float8Config(recipe=recipe))
    x = torch.randn(tokens, 32, device=device)
    _assert_close(_run(plain, x), _run(converted, x), 15, f"{tokens} tokens")


def test_unaligned_features_stay_high_precision_and_exact():
    plain = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 50), nn.Linear(50, 48))
    with pytest.warns(UserWarning, match="stay in high precision: 0 .in_features=30 is not a multiple of 16.*2 .out_features=50.*3 .in_features=50"):
        converted = compile_fp8(copy.deepcopy(plain), compile=False)
    assert fp8_layers(converted) == {
        "0": "skipped: in_features=30 is not a multiple of 16",
        "2": "skipped: out_features=50 is not a multiple of 16",
        "3": "skipped: in_features=50 is not a multiple of 16",
    }
    x = torch.randn(8, 30)
    ref, got = _run(plain, x), _run(converted, x)
    for name in ref:
        assert bits_equal(ref[name], got[name]), f"{name}: sqnr {sqnr(ref[name], got[name]):.1f}"


@pytest.mark.parametrize(
    "how, recipe, frames",
    [
        ("mark_dynamic", "tensorwise", 1),
        ("mark_dynamic", "rowwise", 1),
        ("dynamic=True", "tensorwise", 1),
        ("default", "tensorwise", 2),  # static for the first length, one dynamic graph after
        # (1 if an earlier test already made dynamo see this code with other sizes)
    ],
)
def test_varying_sequence_length_does_not_recompile_per_length(how, recipe, frames):
    counter = CompileCounterWithBackend("inductor")
    kwargs = {"dynamic": True} if how == "dynamic=True" else {}
    layer = nn.Sequential(nn.Linear(32, 16))  # one layer: compile time; every cast is in it
    eager = _convert(copy.deepcopy(layer), Float8Config(recipe=recipe))
    model = _convert(layer, Float8Config(recipe=recipe), compile=True, backend=counter, fullgraph=True, **kwargs)
    for length in (16, 24, 7, 33, 50, 5):
        model.zero_grad(set_to_none=True)
        x = torch.randn(2, length, 32, requires_grad=True)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 1)  # on the very tensor passed in (a copy loses it)
        out = model(x)
        out.backward(torch.ones_like(out))
        assert out.shape == (2, length, 16)
    assert counter.frame_count <= frames, f"{how}: {counter.frame_count} graphs for 6 lengths"
    got = {"output": out, "grad_input": x.grad, "0.weight": unwrap_compiled(model)[0].weight.grad}
    ref = _run(eager, x)
    _assert_close({k: ref[k] for k in got}, got, 30, f"{how}, length {length}")


# ---- training patterns -------------------------------------------------------------------------


def test_gradient_accumulation_sums_the_micro_batch_gradients(compiled_mlp):
    eager = _convert(_mlp())
    compiled, counter = compiled_mlp
    micro_batches = [torch.randn(2, 8, 32) * (i + 1) for i in range(3)]
    for name, model in (("eager", eager), ("compiled", compiled)):
        singles = []
        for x in micro_batches:
            model.zero_grad(set_to_none=True)
            singles.append(_run(model, x))
        model.zero_grad(set_to_none=True)
        for x in micro_batches:
            accumulated = _run(model, x)
        for p in ("0.weight", "2.weight", "0.bias"):
            total = singles[0][p] + singles[1][p] + singles[2][p]
            assert type(accumulated[p]) is torch.Tensor, type(accumulated[p])
            assert torch.allclose(accumulated[p], total, rtol=1e-6, atol=1e-6), f"{name} {p}"
        model.zero_grad(set_to_none=True)


class _Blocks(nn.Module):
    """Two residual MLP blocks, optionally under non-reentrant activation checkpointing."""

    def __init__(self, use_checkpoint=False, blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(blocks)
        )
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for block in self.blocks:
            if self.use_checkpoint:
                x = x + checkpoint(block, x, use_reentrant=False)
            else:
                x = x + block(x)
        return x


def _blocks_pair(config=None, blocks=2):
    torch.manual_seed(0)
    base = _Blocks(blocks=blocks)
    ckpt = copy.deepcopy(base)
    ckpt.use_checkpoint = True
    return _convert(base, config), _convert(ckpt, config)


def test_activation_checkpointing_eager_is_bitwise():
    plain, ckpt = _blocks_pair()
    x = torch.randn(2, 8, 32)
    ref, got = _run(plain, x), _run(ckpt, x)
    for name in ref:
        assert bits_equal(ref[name], got[name]), f"{name}: sqnr {sqnr(ref[name], got[name]):.1f}"


def test_activation_checkpointing_compiled():
    plain, ckpt = _blocks_pair(blocks=1)  # one block: compile time
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(ckpt, backend=counter, fullgraph=True)  # converted with compile=False
    x = torch.randn(2, 8, 32)
    _assert_close(_run(plain, x), _run(compiled, x), 35, "checkpointed, compiled")
    assert counter.frame_count == 1, f"{counter.frame_count} frames"


def test_static_scaling_under_activation_checkpointing():
    config = Float8Config(scaling="static")
    plain, ckpt = _blocks_pair(config)
    batches = [torch.randn(16, 32) for _ in range(2)]
    calibrate(plain, batches)
    calibrate(ckpt, batches)
    x = torch.randn(2, 8, 32)
    ref, got = _run(plain, x), _run(ckpt, x)
    for name in ref:
        assert bits_equal(ref[name], got[name]), name


def test_delayed_scaling_under_activation_checkpointing_says_what_to_do():
    _, ckpt = _blocks_pair(Float8Config(scaling="delayed"))
    with pytest.raises(RuntimeError, match=r"recomputed by activation checkpointing.*scaling='dynamic'"):
        _run(ckpt, torch.randn(2, 8, 32))


class _LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update (PEFT's LoRA, in small)."""

    def __init__(self, base: nn.Linear, rank=16):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


def _lora_model(layers=2):
    torch.manual_seed(0)
    if layers == 1:
        return nn.Sequential(_LoRALinear(nn.Linear(32, 32)))
    return nn.Sequential(_LoRALinear(nn.Linear(32, 64)), nn.GELU(), _LoRALinear(nn.Linear(64, 32)))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_frozen_base_layers_with_lora_adapters(compiled):
    counter = CompileCounterWithBackend("inductor")
    kwargs = {"compile": True, "backend": counter, "fullgraph": True} if compiled else {}
    model = _convert(_lora_model(layers=1 if compiled else 2), **kwargs)  # compiled: compile time
    inner = unwrap_compiled(model)
    assert set(fp8_layers(model).values()) == {FP8}, fp8_layers(model)
    frozen = {n: p.hp.clone() for n, p in inner.named_parameters() if "base.weight" in n}
    assert all(isinstance(inner.get_submodule(n[: -len(".weight")]).weight, Float8TrainingWeight) for n in frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == (2 if compiled else 4), [n for n, p in inner.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(25):
        x = torch.randn(16, 32)
        loss = F.mse_loss(model(x), torch.sin(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for n, p in inner.named_parameters():
        if "base" in n:
            assert p.grad is None, f"{n} (frozen) got a gradient"
    for n, before in frozen.items():
        assert bits_equal(inner.get_parameter(n).hp, before), f"{n} (frozen) changed"
    assert losses[-1] < 0.8 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    if compiled:
        assert counter.frame_count == 1, f"{counter.frame_count} frames"


def test_no_grad_and_inference_mode_evaluation(compiled_mlp):
    eager = _convert(_mlp())
    compiled, _ = compiled_mlp
    x = torch.randn(2, 8, 32)
    for name, model in (("eager", eager), ("compiled", compiled)):
        train_out = model(x).detach()
        with torch.no_grad():
            no_grad_out = model(x)
        with torch.inference_mode():
            inference_out = model(x)
        assert not no_grad_out.requires_grad
        for what, out in (("no_grad", no_grad_out), ("inference_mode", inference_out)):
            s = sqnr(train_out, out)
            assert s >= 40, f"{name} {what}: sqnr {s:.1f} dB vs the training forward"
        if name == "eager":
            assert bits_equal(train_out, no_grad_out) and bits_equal(train_out, inference_out)


def test_eval_mode_keeps_fp8_and_turns_dropout_off():
    torch.manual_seed(0)
    model = _convert(nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 16)))
    no_dropout = copy.deepcopy(model)
    no_dropout[1].p = 0.0
    x = torch.randn(8, 32)
    model.eval()
    assert bits_equal(model(x), no_dropout(x))
    assert set(fp8_layers(model).values()) == {FP8}
    model.train()
    assert not bits_equal(model(x), no_dropout(x)), "dropout is back in train mode"


def test_evaluation_does_not_move_delayed_scaling_histories():
    """An eval pass between training steps (no_grad) changes nothing the next step uses."""
    torch.manual_seed(0)
    base = _mlp()
    with_eval = _convert(copy.deepcopy(base), Float8Config(scaling="delayed"))
    without = _convert(copy.deepcopy(base), Float8Config(scaling="delayed"))
    batches = [torch.randn(8, 32) for _ in range(3)]
    for step, x in enumerate(batches):
        for model in (with_eval, without):
            _run(model, x)
            model.zero_grad(set_to_none=True)
        with torch.no_grad():
            with_eval.eval()
            with_eval(torch.randn(8, 32) * 1000)  # would dominate a max-of-history scale
            with_eval.train()
        for key, value in without.state_dict().items():
            assert bits_equal(with_eval.state_dict()[key], value), f"step {step}: {key} moved"


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(F.gelu(self.body(self.embed(tokens))))


def test_tied_embedding_stays_high_precision_tied_and_saved_once():
    torch.manual_seed(0)
    plain = _TiedLM()
    model = _convert(copy.deepcopy(plain))
    assert fp8_layers(model) == {"body": FP8, "head": "skipped: weight is tied to embed.weight (not a Linear)"}
    assert model.head.weight is model.embed.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        tokens = torch.randint(0, 64, (4, 8))
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert model.head.weight is model.embed.weight, "training untied the weights"
    assert len(list(model.parameters())) == len(list(plain.parameters()))
    state = model.state_dict()
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state)
    assert plain.head.weight is plain.embed.weight


def test_weight_shared_by_two_linears_is_converted_once():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 32, bias=False), nn.GELU(), nn.Linear(32, 32, bias=False))
    plain[2].weight = plain[0].weight
    model = _convert(copy.deepcopy(plain))
    assert model[0].weight is model[2].weight and isinstance(model[0].weight, Float8TrainingWeight)
    x = torch.randn(8, 32)
    ref, got = _run(plain, x), _run(model, x)
    assert list(got) == ["output", "grad_input", "0.weight"], list(got)  # one parameter
    _assert_close(ref, got, 20, "shared weight (gradient from both users)")


# ---- construction: meta device, replaced weights, subclasses ----------------------------------


def test_meta_init_then_to_empty_stays_fp8():
    with torch.device("meta"):
        model = _mlp_on_default_device()
    model = _convert(model)
    model.to_empty(device="cpu")
    for layer in (model[0], model[2]):
        layer.reset_parameters()
    assert isinstance(model[0].weight, Float8TrainingWeight) and model[0].weight.device.type == "cpu"
    assert fp8_layers(model) == {"0": FP8, "2": FP8}
    reference = _mlp()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 32)
    _assert_close(_run(reference, x), _run(model, x), 20, "materialized from meta")


def test_meta_init_resolves_the_path_on_the_real_device(monkeypatch):
    """On meta the emulation choice cannot be probed; to_empty re-resolves it."""
    with torch.device("meta"):
        model = _mlp_on_default_device()
    model = _convert(model)  # emulate=None: chosen from the device
    monkeypatch.setattr(gemm, "scaled_mm_supported", lambda device: False)  # a GPU below sm89
    model.to_empty(device="cpu")
    assert fp8_layers(model)["0"] == FP8, fp8_layers(model)


def test_meta_model_loads_a_checkpoint_with_assign():
    with torch.device("meta"):
        model = _mlp_on_default_device()
    model = _convert(model)
    source = _mlp()
    model.load_state_dict(source.state_dict(), assign=True)
    assert fp8_layers(model) == {"0": FP8, "2": FP8}
    assert bits_equal(model[0].weight.hp, source[0].weight.detach())


def test_weight_replaced_after_conversion_is_reported():
    model = _convert(_mlp())
    model[0].weight = nn.Parameter(torch.randn(64, 32))
    assert fp8_layers(model)["0"].startswith("skipped: weight replaced by a plain tensor after conversion")


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 2


class _MatmulLinear(nn.Linear):
    def forward(self, x):
        return x @ self.weight.t() + self.bias


def test_linear_subclass_with_its_own_forward():
    """F.linear inside a custom forward runs in FP8; any other use of the weight sees the
    high-precision master (correct, not FP8), and fp8_layers says which it can be."""
    torch.manual_seed(0)
    model = _convert(nn.Sequential(_DoubledLinear(32, 32), _MatmulLinear(32, 32), nn.Linear(32, 32)))
    report = fp8_layers(model)
    assert report["0"] == FP8 + " (_DoubledLinear overrides forward: FP8 only where it calls F.linear)"
    assert report["1"] == FP8 + " (_MatmulLinear overrides forward: FP8 only where it calls F.linear)"
    assert report["2"] == FP8
    x = torch.randn(8, 32)
    as_linear = _convert(copy.deepcopy(nn.Sequential(nn.Linear(32, 32))))
    as_linear[0].load_state_dict(model[0].state_dict())
    assert bits_equal(model[0](x), as_linear(x) * 2), "F.linear in a subclass forward is FP8"
    hp = _MatmulLinear(32, 32)
    hp.load_state_dict(model[1].state_dict())
    assert bits_equal(model[1](x), hp(x)), "x @ weight.t() sees the high-precision master"


# ---- torch.compile modes, the path log -------------------------------------------------------


@pytest.mark.parametrize(
    "mode, device",
    [
        ("default", "cpu"),
        ("max-autotune", "cpu"),
        ("reduce-overhead", "cpu"),  # no CUDA graphs on CPU: it compiles as default
        pytest.param("default", "cuda", marks=pytest.mark.gpu),
        pytest.param("max-autotune", "cuda", marks=pytest.mark.gpu),
        pytest.param("reduce-overhead", "cuda", marks=pytest.mark.gpu),  # CUDA graphs
    ],
)
def test_compile_modes_train(mode, device):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16)).to(device)
    eager = _convert(copy.deepcopy(base))
    model = _convert(base, compile=True, mode=mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(32, 32, device=device)
    target = torch.sin(x[:, :16])
    losses = []
    for _ in range(8):
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: each step's outputs are new
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{mode}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    first = F.mse_loss(eager(x), target).item()
    assert abs(first - losses[0]) <= 1e-3 * abs(first), f"{mode}: first loss {losses[0]} vs eager {first}"


def test_fallback_path_says_so_once(monkeypatch, caplog):
    """Without FP8 hardware (a GPU below sm89): one WARNING line, emulated numerics, and
    fp8_layers says '(emulated)'."""
    monkeypatch.setattr(gemm, "scaled_mm_supported", lambda device: False)
    monkeypatch.setattr(gemm, "_LOGGED_PATHS", set())
    with caplog.at_level(logging.INFO, logger="compile_fp8"):
        chosen = [gemm.choose_emulate(torch.device("cuda"), None) for _ in range(3)]
    assert chosen == [True] * 3, chosen
    lines = [r for r in caplog.records if "_scaled_mm" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING, [r.getMessage() for r in lines]
    assert "emulating FP8 numerics in float32" in lines[0].getMessage(), lines[0].getMessage()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 9),
    reason="needs a CUDA GPU without FP8 (below sm89)",
)
def test_gpu_without_fp8_emulates():
    model = _convert(_mlp("cuda"))
    assert fp8_layers(model)["0"] == FP8
    x = torch.randn(16, 32, device="cuda")
    _assert_close(_run(_mlp("cuda"), x), _run(model, x), 20, "emulated on a pre-sm89 GPU")
