"""compile_fp8 / fp8_layers / Float8Config: conversion rules, errors, checkpoints."""

import copy
import io
import logging
import warnings

import expecttest
import pytest
import torch
from torch import nn

from compile_fp8 import Float8Config, Float8TrainingWeight, compile_fp8, fp8_layers
from helpers import bits_equal, sqnr


class TinyLM(nn.Module):
    """Aligned and unaligned linears, a tie between two linears, a tie with an embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.up = nn.Linear(32, 64)
        self.odd = nn.Linear(64, 50)
        self.down = nn.Linear(50, 32)
        self.mirror_a = nn.Linear(32, 32, bias=False)
        self.mirror_b = nn.Linear(32, 32, bias=False)
        self.mirror_b.weight = self.mirror_a.weight
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.down(torch.relu(self.odd(self.up(h))))
        h = self.mirror_b(self.mirror_a(h))
        return self.head(h)


def _convert(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_fp8(model, compile=False, **kwargs)


class TestReport(expecttest.TestCase):
    def test_fp8_layers_report(self):
        model = _convert(TinyLM(), module_filter_fn=lambda mod, fqn: fqn != "up")
        self.assertExpectedInline(
            "\n".join(f"{k}: {v}" for k, v in fp8_layers(model).items()),
            """\
up: skipped: module_filter_fn
odd: skipped: out_features=50 is not a multiple of 16
down: skipped: in_features=50 is not a multiple of 16
mirror_a: fp8 tensorwise dynamic (emulated)
mirror_b: fp8 tensorwise dynamic (emulated)
head: skipped: weight is tied to embed.weight (not a Linear)""",
        )

    def test_fp8_layers_of_unconverted_and_compiled_models(self):
        plain = nn.Sequential(nn.Linear(16, 16))
        self.assertExpectedInline(
            str(fp8_layers(plain)), """{'0': 'skipped: not converted (compile_fp8 was not called on it)'}"""
        )
        compiled = compile_fp8(nn.Sequential(nn.Linear(16, 32)), Float8Config(recipe="rowwise"))
        self.assertExpectedInline(str(fp8_layers(compiled)), """{'0': 'fp8 rowwise dynamic (emulated)'}""")


def test_one_warning_names_every_unaligned_layer():
    with pytest.warns(UserWarning) as record:
        compile_fp8(TinyLM(), compile=False)
    ours = [w for w in record if "compile_fp8" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert "odd (out_features=50" in message and "down (in_features=50" in message, message


def test_names_keys_and_parameter_count_unchanged():
    plain = TinyLM()
    converted = _convert(copy.deepcopy(plain))
    assert list(converted.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in converted.named_modules()] == [n for n, _ in plain.named_modules()]
    count = lambda m: sum(1 for _ in m.parameters())  # noqa: E731
    assert count(converted) == count(plain), "a tie was broken"
    assert converted.mirror_a.weight is converted.mirror_b.weight
    assert isinstance(converted.mirror_a.weight, Float8TrainingWeight)
    assert type(converted.up) is nn.Linear


def test_linear_subclass_is_converted():
    class MyLinear(nn.Linear):
        pass

    model = _convert(nn.Sequential(MyLinear(16, 32)))
    assert fp8_layers(model) == {"0": "fp8 tensorwise dynamic (emulated)"}


# ---- errors -------------------------------------------------------------------------------


def test_second_conversion_is_an_error():
    model = _convert(TinyLM())
    with pytest.raises(ValueError, match="already converted by compile_fp8"):
        compile_fp8(model)


def test_compiled_model_is_rejected():
    compiled = torch.compile(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="pass the plain module"):
        compile_fp8(compiled)


@pytest.mark.parametrize(
    "field, value",
    [("recipe", "blockwise"), ("scaling", "lazy"), ("mode", "serving"), ("emulate", "yes"), ("layer_filter", "fast"),
     ("fast_accum", "backward")],
)
def test_bad_config_value_names_field_value_and_choices(field, value):
    with pytest.raises(ValueError, match=rf"Float8Config\.{field}='{value}'.*allowed values: \["):
        Float8Config(**{field: value})


def test_config_is_frozen_keyword_only_and_from_recipe():
    assert Float8Config.from_recipe("rowwise") == Float8Config(recipe="rowwise")
    with pytest.raises(TypeError):
        Float8Config("rowwise")  # keyword-only
    with pytest.raises(AttributeError):
        Float8Config().recipe = "rowwise"  # frozen


def test_config_of_wrong_type():
    with pytest.raises(TypeError, match="config must be a Float8Config"):
        compile_fp8(nn.Linear(16, 16), "tensorwise")


# ---- checkpoints --------------------------------------------------------------------------


def test_state_dict_loads_weights_only_into_plain_model():
    converted = _convert(TinyLM())
    state = converted.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values()), {k: type(v) for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    plain = TinyLM()
    plain.load_state_dict(torch.load(buffer, weights_only=True))
    for (name, a), b in zip(plain.state_dict().items(), state.values()):
        assert bits_equal(a, b), name


def test_plain_checkpoint_loads_into_converted_model():
    plain = TinyLM()
    for assign in (False, True):
        converted = _convert(TinyLM())
        converted.load_state_dict(plain.state_dict(), assign=assign)
        assert isinstance(converted.mirror_a.weight, Float8TrainingWeight), f"assign={assign}"
        if not assign:  # assign=True re-creates each Parameter: plain PyTorch unties there too
            assert converted.mirror_a.weight is converted.mirror_b.weight
        assert bits_equal(converted.mirror_a.weight.hp, plain.mirror_a.weight.detach())


def test_keep_vars_returns_the_live_parameter():
    converted = _convert(TinyLM())
    state = converted.state_dict(keep_vars=True)
    assert state["mirror_a.weight"] is converted.mirror_a.weight


def test_deepcopy_and_pickle_of_a_converted_model():
    converted = _convert(TinyLM())
    tokens = torch.randint(0, 64, (2, 8))
    for clone in (copy.deepcopy(converted), _pickle_round_trip(converted)):
        assert isinstance(clone.mirror_a.weight, Float8TrainingWeight)
        assert clone.mirror_a.weight is clone.mirror_b.weight
        assert bits_equal(clone(tokens), converted(tokens))


def _pickle_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# ---- the path: real _scaled_mm or emulation -----------------------------------------------


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulation_matches_scaled_mm_on_cpu(recipe):
    """Same casts and scales; only float32 accumulation order may differ from CPU _scaled_mm."""
    base = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48)).to(torch.bfloat16)
    real = _convert(copy.deepcopy(base), config=Float8Config(recipe=recipe, emulate=False))
    emulated = _convert(copy.deepcopy(base), config=Float8Config(recipe=recipe, emulate=True))
    assert fp8_layers(emulated)["0"] == f"fp8 {recipe} dynamic (emulated)"
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    x_real, x_emul = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_real, out_emul = real(x_real), emulated(x_emul)
    out_real.float().square().sum().backward()
    out_emul.float().square().sum().backward()
    pairs = [("output", out_real, out_emul), ("grad_input", x_real.grad, x_emul.grad)]
    pairs += [(n, p.grad, q.grad) for (n, p), q in zip(real.named_parameters(), emulated.parameters())]
    for name, a, b in pairs:
        s = sqnr(a, b)
        assert s >= 40, f"{recipe} {name}: emulated vs _scaled_mm sqnr {s:.1f} dB"


@pytest.mark.parametrize(
    "recipe, fast_accum, expected",
    [
        ("tensorwise", "forward", [True, False, False]),  # torchao's recipe
        ("tensorwise", "all", [True, True, True]),
        ("rowwise", "all", [True, True, True]),
        ("rowwise_with_gw_hp", "all", [True, True]),  # grad_weight: a high-precision mm
    ],
)
def test_fast_accum_reaches_the_gemms(monkeypatch, recipe, fast_accum, expected):
    """Which of output / grad_input / grad_weight ask cuBLAS for fast accumulation."""
    calls, scaled_mm = [], torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs["use_fast_accum"])
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    config = Float8Config(recipe=recipe, emulate=False, fast_accum=fast_accum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CPU _scaled_mm's warning
        model = _convert(nn.Sequential(nn.Linear(32, 16)).to(torch.bfloat16), config=config)
    model(torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)).float().sum().backward()
    assert calls == expected


def test_fast_accum_is_training_only():
    with pytest.raises(ValueError, match="fast_accum='all' applies to mode='training' only"):
        Float8Config(mode="inference", fast_accum="all")


def test_path_is_logged_once(caplog):
    from compile_fp8 import gemm

    gemm._LOGGED_PATHS.clear()
    with caplog.at_level(logging.INFO, logger="compile_fp8"):
        for _ in range(3):
            _convert(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compile_fp8: FP8")]
    assert len(lines) == 1 and lines[0].startswith("compile_fp8: FP8 numerics emulated on cpu"), lines


# ---- layer_filter="auto": which layers should be FP8 -----------------------------------------


def test_layer_filter_auto_keeps_slow_shapes_in_high_precision():
    """Tensorwise pays from min(K, N) = 2048 on the H200; the reason gives the measured ratio."""
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(2048, 2048), nn.Linear(48, 32))
    _convert(model, config=Float8Config(layer_filter="auto"))
    report = fp8_layers(model)
    assert report["0"] == (
        "skipped: layer_filter='auto': FP8 tensorwise ran 0.78x bf16 (< 1.02x) at this shape on an H200 "
        "(fwd+bwd kernel time, M=16384); in_features=1024, out_features=1024"
    )
    assert report["1"] == "fp8 tensorwise dynamic (emulated)"
    assert "nearest measured shape K=512, N=512" in report["2"], report["2"]


def test_layer_filter_default_converts_every_eligible_layer():
    model = _convert(nn.Sequential(nn.Linear(1024, 1024), nn.Linear(32, 32)))
    assert set(fp8_layers(model).values()) == {"fp8 tensorwise dynamic (emulated)"}


def test_layer_filter_auto_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="compile_fp8"):
        _convert(nn.Sequential(nn.Linear(1024, 1024)), config=Float8Config(layer_filter="auto"))
    assert "layer_filter='auto' keeps 1 layer(s) in high precision" in caplog.text


def test_layer_filter_auto_is_training_only():
    with pytest.raises(ValueError, match="layer_filter='auto' applies to mode='training' only"):
        Float8Config(mode="inference", layer_filter="auto")


@pytest.mark.parametrize(
    "k, n, recipe, converts",
    [
        # the 956M anchor model: every layer pays in tensorwise, none in rowwise
        (2048, 6144, "tensorwise", True), (2048, 2048, "tensorwise", True),
        (2048, 5632, "tensorwise", True), (5632, 2048, "tensorwise", True),
        (2048, 6144, "rowwise", False), (2048, 2048, "rowwise", False),
        (2048, 5632, "rowwise", False), (5632, 2048, "rowwise", False),
        # Llama-8B-like shapes pay in both
        (4096, 14336, "rowwise", True), (8192, 8192, "rowwise", True), (4096, 4096, "tensorwise", True),
        # off the grid: the nearest measured shape in log2 space
        (3072, 3072, "tensorwise", True), (16384, 16384, "rowwise", True), (768, 3072, "tensorwise", False),
        (4096, 4096, "rowwise_with_gw_hp", False),  # uses the rowwise column
    ],
)  # fmt: skip
def test_layer_choice_by_measured_shape(k, n, recipe, converts):
    from compile_fp8.training.layer_choice import slow_layer_reason

    assert (slow_layer_reason(k, n, recipe) is None) == converts
