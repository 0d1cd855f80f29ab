"""FP8 inference state: checkpoints, static input scales and calibrate, copies, conversion.

`inference/convert.py` (conversion, the load_state_dict hooks), `inference/state.py` (the
buffers: `weight_scale`, `input_scale` saved; `weight_quant_scale`, `input_quant_scale`
derived), `calibrate`, `fp8_layers`. A converted layer's state_dict holds plain tensors only:
`weight` (float8), `bias`, `weight_scale`, and `input_scale` if static.
"""

import copy
import io

import pytest
import torch
from torch import nn

from compile_fp8 import Float8Config, calibrate, compile_fp8, fp8_layers, plain_state_dict
from compile_fp8.inference import linear as inference_linear
from compile_fp8.inference.linear import Float8InferenceLinear
from compile_fp8.inference.scales import amax_to_inverse_scale, scale_of_inverse
from compile_fp8.inference.state import DERIVED, INPUT_AMAX, INPUT_SCALE, WEIGHT_SCALE
from compile_fp8.layers import layer_state
from helpers import bits_equal, sqnr
from inference_helpers import (
    BF16,
    E4M3,
    RECIPES,
    SCALED_MM,
    _inference,
    _mlp,
    _report,
    _reset_mlp,
    _saved,
    _static_layers,
    _x,
)

LAYERS = ("0", "2", "4")  # the linears of _mlp


def _keys(*names):
    return {f"{layer}.{name}" for layer in LAYERS for name in names}


def _plain(layer) -> bool:
    """The layer holds its weight as a frozen plain float8 Parameter, its scales as float32."""
    weight = layer.weight
    return (type(weight) is nn.Parameter and weight.dtype == E4M3 and not weight.requires_grad
            and layer.weight_scale.dtype == layer.weight_quant_scale.dtype == torch.float32)  # fmt: skip


# ---- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_state_dict_round_trip_is_bit_identical(recipe):
    model = _inference(_mlp(), recipe)
    x = _x(2, 40, 64)
    with torch.no_grad():
        expected = model(x)
    state = _saved(model.state_dict())
    assert set(state) == _keys("weight", "bias", WEIGHT_SCALE), sorted(state)
    assert all(type(v) is torch.Tensor for v in state.values()), {k: type(v) for k, v in state.items()}
    assert state["0.weight"].dtype == E4M3 and state["0.weight_scale"].dtype == torch.float32, state["0.weight"]
    assert tuple(state["0.weight_scale"].shape) == (() if recipe == "tensorwise" else (128, 1))
    fresh = _inference(_reset_mlp(), recipe)
    assert fresh.load_state_dict(state) is not None  # strict: no missing / unexpected keys
    assign = _inference(_mlp(), recipe)
    assign.load_state_dict(_saved(model.state_dict()), assign=True)
    with torch.no_grad():
        for loaded in (fresh, assign):
            assert _plain(loaded[0]), loaded[0].weight
            assert bits_equal(loaded(x), expected), "outputs after load differ"


def test_state_dict_saves_with_safetensors():
    """Plain tensors only: the serving layout safetensors (and save_pretrained) write."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _inference(_mlp(), "rowwise")
    x = _x(2, 40, 64)
    loaded = safetensors_torch.load(safetensors_torch.save(model.state_dict()))
    fresh = _inference(_reset_mlp(), "rowwise")
    fresh.load_state_dict(loaded)
    with torch.no_grad():
        assert bits_equal(fresh(x), model(x))


def test_plain_checkpoint_loads_into_inference_model_quantized():
    plain = _mlp()
    converted = _inference(_reset_mlp())
    converted.load_state_dict(_saved(plain.state_dict()))
    x = _x(2, 40, 64)
    with torch.no_grad():
        assert _plain(converted[0]), converted[0].weight
        assert bits_equal(converted(x), _inference(plain)(x)), "plain checkpoint not quantized like a conversion"


@pytest.mark.parametrize("saved, model", [("rowwise", "tensorwise"), ("tensorwise", "rowwise")])
def test_checkpoint_of_other_granularity_is_a_clear_error(saved, model):
    state = _inference(_mlp(), saved).state_dict()
    match = (f"checkpoint holds a {saved} FP8 weight, the model a {model} one: convert with the recipe "
             "the checkpoint was saved with")  # fmt: skip
    with pytest.raises(RuntimeError, match=match):
        _inference(_mlp(), model).load_state_dict(state)


def test_deepcopy_and_to_keep_fp8_weights():
    model = _inference(_mlp())
    x = _x(4, 64)
    for copied in (copy.deepcopy(model), model.to(torch.device("cpu"))):
        assert _plain(copied[0]) and layer_state(copied[0]) is not None, copied[0].weight
        with torch.no_grad():
            assert bits_equal(copied(x), model(x))
    # a copy's checkpoint hooks are its own: a plain checkpoint loads (quantized) into the copy
    copied, before = copy.deepcopy(model), model[0].weight.clone()
    copied.load_state_dict(_reset_mlp().state_dict())
    with torch.no_grad():
        assert bits_equal(model[0].weight, before) and bits_equal(copied(x), _inference(_reset_mlp())(x))


@pytest.mark.parametrize("recipe", RECIPES)
def test_conv1d_checkpoints(recipe):
    """transformers' Conv1D (GPT-2) keeps its [in, out] weight layout in float8, its scale per
    output: its checkpoint round-trips, and a plain one loads quantized."""
    transformers = pytest.importorskip("transformers")

    def gpt2():
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(config).to(BF16).eval()

    plain_state = copy.deepcopy(gpt2().state_dict())
    with pytest.warns(UserWarning, match="lm_head"):  # tied to the embedding: stays bf16
        converted, fp8_state, from_plain = (_inference(gpt2(), recipe) for _ in range(3))
    c_attn = converted.transformer.h[0].attn.c_attn
    assert c_attn.weight.dtype == E4M3 and tuple(c_attn.weight.shape) == (64, 192), c_attn.weight.shape
    assert tuple(c_attn.weight_scale.shape) == (() if recipe == "tensorwise" else (192, 1)), c_attn.weight_scale.shape
    fp8_state.load_state_dict(_saved(converted.state_dict()))
    from_plain.load_state_dict(plain_state)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        expected = converted(input_ids=ids).logits
        for loaded in (fp8_state, from_plain):
            assert bits_equal(loaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("to", ["to_dtype", "bfloat16"])
def test_to_dtype_keeps_fp8_weights_and_float32_scales(to):
    """`model.to(device, dtype)` / `.bfloat16()` on a converted model (as a serving script does)
    keeps the float8 weight and its float32 scales; only high-precision tensors change dtype."""
    model = _inference(_mlp(), scaling="static", **SCALED_MM)
    calibrate(model, [_x(3, 40, 64)])
    x = _x(4, 64)
    with torch.no_grad():
        expected = model(x)
    twin = copy.deepcopy(model)
    twin = twin.to("cpu", BF16) if to == "to_dtype" else twin.bfloat16()
    assert _plain(twin[0]), (twin[0].weight.dtype, twin[0].weight_scale.dtype)
    assert twin[0].input_scale.dtype == twin[0].input_quant_scale.dtype == torch.float32, twin[0].input_scale
    with torch.no_grad():
        assert bits_equal(twin(x), expected)


def test_inference_linear_holds_a_plain_float8_weight():
    """A converted nn.Linear is a Float8InferenceLinear whose weight is a plain float8
    Parameter (frozen) beside float32 scale buffers, and stays so when the weight changes:
    in-place load (a plain checkpoint, quantized), load with assign=True, deepcopy, `.to()`,
    pickling the whole module."""
    layer = _inference(nn.Linear(64, 32).to(BF16))
    assert type(layer) is Float8InferenceLinear and isinstance(layer, nn.Linear)
    assert _plain(layer) and set(layer.state_dict()) == {"weight", "bias", WEIGHT_SCALE}, set(layer.state_dict())
    weight = layer.weight
    x = _x(4, 64)
    other = nn.Linear(64, 32).to(BF16)
    expected = _inference(copy.deepcopy(other))(x)
    with torch.no_grad():
        layer.load_state_dict(other.state_dict())  # in place: the same Parameter, new values
    assert layer.weight is weight and _plain(layer) and bits_equal(layer(x), expected)
    layer.load_state_dict(_inference(nn.Linear(64, 32).to(BF16)).state_dict(), assign=True)
    assert _plain(layer), "assign=True: still a frozen float8 Parameter"
    twin = copy.deepcopy(layer).to("cpu")
    assert _plain(twin) and twin.weight is not layer.weight and bits_equal(twin(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # the whole module: its class is importable by name
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is Float8InferenceLinear and _plain(loaded) and bits_equal(loaded(x), layer(x))
    with pytest.raises(RuntimeError, match="its weight was replaced by a torch.bfloat16 tensor"):
        layer.weight = nn.Parameter(torch.randn(32, 64, dtype=BF16), requires_grad=False)
        layer(x)


# ---- fp8_layers -----------------------------------------------------------------------------


def test_fp8_layers_reports_inference_recipe_and_skips():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10), nn.Linear(10, 16)).to(BF16)
    with pytest.warns(UserWarning, match=r"1 linear layer\(s\) stay in high precision: 1 \(out_features=10 is not"):
        converted = compile_fp8(
            model, Float8Config(mode="inference", recipe="rowwise", emulate=True),
            module_filter_fn=lambda m, fqn: fqn != "2", compile=False,
        )  # fmt: skip
    assert fp8_layers(converted) == {
        "0": "fp8 rowwise inference dynamic (emulated)",
        "1": "skipped: out_features=10 is not a multiple of 16",
        "2": "skipped: module_filter_fn",
    }, fp8_layers(converted)


def test_fp8_layers_through_compiled_model():
    """Whether compile_fp8 returns a torch.compile wrapper or the model compiled in place."""
    compiled = compile_fp8(_mlp(), Float8Config(mode="inference"))
    assert set(_report(fp8_layers(compiled)).values()) == {"fp8 tensorwise inference dynamic"}, fp8_layers(compiled)


# ---- static scaling -------------------------------------------------------------------------


def test_static_scales_after_calibrate():
    model = _mlp()
    x = _x(3, 40, 64)
    with torch.no_grad():
        expected = model(x)
    converted = _inference(model, scaling="static", **SCALED_MM)
    uncalibrated = "fp8 tensorwise inference static (uncalibrated: dynamic until calibrate())"
    assert _report(fp8_layers(converted))["0"] == uncalibrated, fp8_layers(converted)
    saved = _keys("weight", "bias", WEIGHT_SCALE, INPUT_SCALE)
    assert set(converted.state_dict()) == saved, list(converted.state_dict())
    calibrate(converted, [x])
    assert _report(fp8_layers(converted))["0"] == "fp8 tensorwise inference static", fp8_layers(converted)
    expected_scale = amax_to_inverse_scale(x.abs().max().float())  # the first layer sees x itself
    assert bits_equal(converted[0].input_scale, expected_scale), (converted[0].input_scale, expected_scale)
    assert INPUT_AMAX not in dict(converted[0].named_buffers()), "calibrate's amax buffer outlived it"
    with torch.no_grad():
        actual = converted(x)
    assert sqnr(expected, actual) >= 25, f"sqnr {sqnr(expected, actual):.1f} dB"
    reloaded = _inference(_mlp(), scaling="static", **SCALED_MM)
    reloaded.load_state_dict(_saved(converted.state_dict()))
    assert layer_state(reloaded[0]).ready, "a calibrated checkpoint makes the layer ready"
    with torch.no_grad():
        assert bits_equal(reloaded(x), actual), "static model differs after load"


def test_static_checkpoint_without_input_scale_warns():
    state = _inference(_mlp()).state_dict()
    static = _inference(_mlp(), scaling="static")
    with pytest.warns(UserWarning, match=f"no {INPUT_SCALE} for 0: .*uncalibrated"):
        static.load_state_dict(state)
    assert "uncalibrated" in fp8_layers(static)["0"], fp8_layers(static)


def _input_scales_seen(monkeypatch):
    """The input scale each layer's forward hands the GEMM (None: dynamic)."""
    seen = []
    original = inference_linear.fp8_linear_2d

    def record(x, weight_fp8, weight_scale, bias, input_scale, spec):
        seen.append(input_scale)
        return original(x, weight_fp8, weight_scale, bias, input_scale, spec)

    monkeypatch.setattr(inference_linear, "fp8_linear_2d", record)
    return seen


def _input_amaxes(layers):
    """Forward pre-hooks: the float32 max |input| each layer sees (calibrate's measurement)."""
    amaxes = {layer: torch.zeros(()) for layer in layers}

    def hook(module, args):
        amaxes[module] = torch.maximum(amaxes[module], args[0].detach().abs().max().float())

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    return amaxes, handles


@pytest.mark.parametrize("margin", [1.0, 1.25])
def test_static_input_scale_is_a_buffer_computed_by_calibrate(margin, monkeypatch):
    """calibrate sets `input_scale` (saved: amax * margin / 448, the dequantization scale) and
    its derived `input_quant_scale` (not saved); the forward hands the GEMM that buffer itself
    (no scale arithmetic per call), and nothing before calibration (dynamic)."""
    converted = _inference(_mlp(), scaling="static", amax_margin=margin, **SCALED_MM)
    keys = list(converted.state_dict())
    layers = _static_layers(converted)
    assert len(layers) == 3
    state = layer_state(layers[0])
    assert state.spec.amax_margin == margin and not state.ready, state
    seen = _input_scales_seen(monkeypatch)
    x = _x(3, 40, 64)
    with torch.no_grad():
        converted(x)
    assert seen == [None] * 3, seen  # uncalibrated: dynamic
    amaxes, handles = _input_amaxes(layers)
    calibrate(converted, [x])
    for handle in handles:
        handle.remove()
    for layer in layers:
        assert layer_state(layer).ready
        expected = amax_to_inverse_scale(amaxes[layer] * margin)
        assert layer.input_scale.dtype == torch.float32 and bits_equal(layer.input_scale, expected), (
            layer.input_scale, expected,
        )  # fmt: skip
        assert bits_equal(getattr(layer, DERIVED[INPUT_SCALE]), scale_of_inverse(expected))
    seen.clear()
    with torch.no_grad():
        converted(x)
    assert len(seen) == 3 and all(s is getattr(m, DERIVED[INPUT_SCALE]) for s, m in zip(seen, layers)), (
        "the forward does not read the derived buffer itself"
    )
    buffers = dict(converted.named_buffers())
    assert f"0.{DERIVED[INPUT_SCALE]}" in buffers and f"0.{INPUT_SCALE}" in buffers, list(buffers)
    assert list(converted.state_dict()) == keys and f"0.{INPUT_SCALE}" in keys, keys
    assert not any(k.endswith(tuple(DERIVED.values())) for k in keys), "derived scales must not be saved"
    for copied in (copy.deepcopy(converted), converted.to(torch.device("cpu"))):
        for name in (INPUT_SCALE, DERIVED[INPUT_SCALE]):
            assert bits_equal(getattr(copied[0], name), getattr(layers[0], name)), name
        assert layer_state(copied[0]).ready


def test_static_input_scale_follows_load_state_dict():
    """load_state_dict updates `input_scale` and recomputes `input_quant_scale` in place
    (compiled graphs hold the same buffers), also with assign=True."""
    x = _x(3, 40, 64)
    source = _inference(_mlp(), scaling="static", **SCALED_MM)
    calibrate(source, [x])
    target = _inference(_mlp(), scaling="static", **SCALED_MM)
    calibrate(target, [x * 4])
    keys = list(target.state_dict())
    buffers = [getattr(m, DERIVED[INPUT_SCALE]) for m in _static_layers(target)]
    old = [b.clone() for b in buffers]
    target.load_state_dict(_saved(source.state_dict()))
    assigned = _inference(_mlp(), scaling="static", **SCALED_MM)
    assigned.load_state_dict(_saved(source.state_dict()), assign=True)
    assert list(target.state_dict()) == keys and not any(k.endswith(DERIVED[INPUT_SCALE]) for k in keys), keys
    for layer, buffer, before, reference, other in zip(
        _static_layers(target), buffers, old, _static_layers(source), _static_layers(assigned)
    ):
        assert getattr(layer, DERIVED[INPUT_SCALE]) is buffer, "the buffer was replaced, not updated"
        assert not bits_equal(buffer, before), "the checkpoint's input scale differs: so must the buffer"
        for loaded in (layer, other):
            assert bits_equal(loaded.input_scale, reference.input_scale), (loaded.input_scale, reference.input_scale)
        expected = scale_of_inverse(reference.input_scale)
        for scale in (buffer, getattr(other, DERIVED[INPUT_SCALE])):
            assert bits_equal(scale, expected), (scale, expected)
        assert layer_state(layer).ready and layer_state(other).ready
    with torch.no_grad():
        assert bits_equal(target(x), source(x)) and bits_equal(assigned(x), source(x))


def test_static_checkpoint_without_input_scale_makes_the_layer_dynamic_again():
    static = _inference(_mlp(), scaling="static", **SCALED_MM)
    calibrate(static, [_x(3, 40, 64)])
    dynamic = _inference(_mlp(), **SCALED_MM)
    with pytest.warns(UserWarning, match=f"no {INPUT_SCALE}"):
        static.load_state_dict(dynamic.state_dict())
    layer = static[0]
    assert not layer_state(layer).ready and bits_equal(layer.input_scale, torch.zeros(())), layer.input_scale
    x = _x(3, 40, 64)
    with torch.no_grad():
        assert bits_equal(static(x), dynamic(x)), "an uncalibrated static layer runs dynamic"


def test_calibrate_without_batches_leaves_no_stale_scale():
    """calibrate records from zero: one that raises leaves the layers dynamic, not running on
    the previous calibration's scale, and out of calibration."""
    static = _inference(_mlp(), scaling="static", **SCALED_MM)
    calibrate(static, [_x(3, 40, 64)])
    with pytest.raises(ValueError, match="no batches"):
        calibrate(static, [])
    assert "uncalibrated" in fp8_layers(static)["0"], fp8_layers(static)
    state = layer_state(static[0])
    assert not state.ready and not state.calibrating, state
    assert INPUT_AMAX not in dict(static[0].named_buffers())


def test_calibrate_needs_a_static_model():
    with pytest.raises(ValueError, match="calibrate needs a model converted with"):
        calibrate(_inference(_mlp()), [_x(3, 40, 64)])


# ---- models: a trained one, ties, subclasses --------------------------------------------------


@pytest.mark.parametrize("scaling", ["dynamic", "static"])
def test_model_trained_with_compile_fp8_converts(scaling):
    trained = compile_fp8(_mlp(torch.float32), Float8Config(emulate=True, scaling=scaling), compile=False)
    x = torch.randn(8, 64)
    if scaling == "static":
        calibrate(trained, [x])
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(2):
        trained(x).square().mean().backward()
        opt.step()
    masters = {k: v.clone() for k, v in plain_state_dict(trained).items()}
    converted = _inference(trained)
    assert set(_report(fp8_layers(converted)).values()) == {"fp8 tensorwise inference dynamic"}, fp8_layers(converted)
    state = converted.state_dict()
    assert set(state) == set(masters) | _keys(WEIGHT_SCALE), sorted(state)  # no training buffers left over
    plain = _mlp(torch.float32)
    plain.load_state_dict(masters)
    with torch.no_grad():
        assert bits_equal(converted(x), _inference(plain)(x)), "not the trained master weights"
    converted.load_state_dict(_saved(state))  # the training hooks are gone: loads as inference
    assert _plain(converted[0]), converted[0].weight


def test_tied_linears_stay_tied():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).to(BF16)
    model[1].weight = model[0].weight
    converted = _inference(model)
    assert converted[0].weight is converted[1].weight, "tie broken"
    assert len(list(converted.parameters())) == 3, [n for n, _ in converted.named_parameters()]
    assert bits_equal(converted[0].weight_scale, converted[1].weight_scale)


def test_linear_subclass_overriding_forward_is_skipped():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.warns(UserWarning, match=r"stay in high precision: 0 \(Scaled overrides forward"):
        converted = _inference(nn.Sequential(Scaled(32, 32)).to(BF16))
    assert fp8_layers(converted)["0"].startswith("skipped: Scaled overrides forward"), fp8_layers(converted)
    assert converted[0].weight.dtype == BF16


# ---- errors ---------------------------------------------------------------------------------


def test_converting_an_inference_model_again_is_an_error():
    converted = _inference(_mlp())
    with pytest.raises(ValueError, match="converted for inference twice"):
        _inference(converted)
    with pytest.raises(ValueError, match="cannot be trained"):
        compile_fp8(converted, compile=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scaling="delayed"), "scaling='delayed' is not supported with mode='inference'"),
        (dict(static_grads=True), "static_grads=True applies to mode='training' only"),
        (dict(cast_kernels="triton"), "cast_kernels='triton' applies to mode='training' only"),
        (dict(weight_only_max_m=-1), "weight_only_max_m=-1 must be an int >= 0"),
        (dict(weight_only_max_m=True), "weight_only_max_m=True must be an int >= 0"),
        (dict(recipe="rowwise", scaling="static"), "supports recipe='tensorwise' only"),
        (dict(small_m_activation="bf16"), "small_m_activation='bf16' is not supported"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_config_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Float8Config(mode="inference", **kwargs)
