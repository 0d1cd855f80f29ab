"""Real clients: HF transformers Llama, Qwen2 and GPT-2 from tiny random configs.

Nothing is downloaded: each model is built from a config (hidden sizes multiples of 16). They
train under compile_fp8 with every projection in FP8 (asserted through `fp8_layers`), their
loss falling alongside the high-precision model's, and their checkpoints round-trip through
`save_pretrained` / `from_pretrained` into the plain model. GPT-2's projections are transformers'
`Conv1D` (weight stored [in, out]), converted by `compile_fp8/training/conv1d.py`.
"""

import copy
import io
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from compile_fp8 import Float8Config, Float8TrainingWeight, compile_fp8, fp8_layers
from compile_fp8.api import unwrap_compiled
from helpers import bits_equal, sqnr

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, SEQ = 128, 32
EMULATED = "fp8 tensorwise dynamic (emulated)"  # the CPU default: the same casts, float32 GEMMs
CONFIG = Float8Config(emulate=True)


def _build(name: str, dtype=torch.float32, layers=2):
    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64)
    if name == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **small)
        model = transformers.LlamaForCausalLM(config)
    elif name == "qwen2":  # small Qwen2 checkpoints tie the LM head to the embedding
        config = transformers.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True, **small
        )
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    return model.to(dtype)


PROJECTIONS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}  # fmt: skip
PROJECTIONS["qwen2"] = PROJECTIONS["llama"]
LAYERS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}
LM_HEAD = {
    "llama": EMULATED,
    "qwen2": "skipped: weight is tied to model.embed_tokens.weight (not a Linear)",
    "gpt2": "skipped: weight is tied to transformer.wte.weight (not a Linear)",
}
NAMES = ["llama", "qwen2", "gpt2"]


def _expected_report(name: str, layers=2) -> dict:
    report = {f"{LAYERS[name]}.{i}.{p}": EMULATED for i in range(layers) for p in PROJECTIONS[name]}
    return report | {"lm_head": LM_HEAD[name]}


def _batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, SEQ), generator=gen) for _ in range(n)]


def _train(model, batches, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", NAMES)
def test_every_projection_is_fp8(name):
    model = compile_fp8(_build(name), CONFIG, compile=False)
    report = fp8_layers(model)
    assert report == _expected_report(name), "\n".join(f"{k}: {v}" for k, v in report.items())


@pytest.mark.parametrize("name", NAMES)
def test_trains_in_fp8_alongside_high_precision(name):
    """Same batches (a few repeated, so the loss can fall far in 24 steps) for both models."""
    hp = _build(name)
    fp8 = compile_fp8(copy.deepcopy(hp), CONFIG, compile=False)
    batches = _batches(4) * 6
    hp_losses, fp8_losses = _train(hp, batches), _train(fp8, batches)
    assert fp8_losses[0] != hp_losses[0], "the first FP8 loss is bit-equal to high precision: FP8 did not run"
    assert abs(fp8_losses[0] - hp_losses[0]) < 0.01 * hp_losses[0], (fp8_losses[0], hp_losses[0])
    assert fp8_losses[-1] < 0.85 * fp8_losses[0], f"{name}: loss {fp8_losses[0]:.3f} -> {fp8_losses[-1]:.3f}"
    assert abs(fp8_losses[-1] - hp_losses[-1]) < 0.1 * hp_losses[-1], (
        f"{name}: final loss fp8 {fp8_losses[-1]:.3f} vs high precision {hp_losses[-1]:.3f}"
    )


def test_compiled_llama_fullgraph_tracks_eager():
    """One HF model compiled (one decoder layer: compile time): one frame (fullgraph), losses
    as in eager FP8."""
    base = _build("llama", layers=1)
    eager = compile_fp8(copy.deepcopy(base), CONFIG, compile=False)
    counter = CompileCounterWithBackend("inductor")
    compiled = compile_fp8(base, CONFIG, backend=counter, fullgraph=True)
    batches = _batches(4) * 2
    eager_losses, compiled_losses = _train(eager, batches), _train(compiled, batches)
    assert counter.frame_count == 1, f"{counter.frame_count} frames"
    assert compiled_losses[-1] < compiled_losses[0], compiled_losses
    for step, (a, b) in enumerate(zip(eager_losses, compiled_losses)):
        assert abs(a - b) < 1e-2 * a, f"step {step}: compiled loss {b:.5f} vs eager {a:.5f}"
    assert fp8_layers(compiled) == _expected_report("llama", layers=1)


# ---- GPT-2's Conv1D ----------------------------------------------------------------------------


def _conv1d_and_linear(nx=32, nf=48):
    torch.manual_seed(0)
    conv = Conv1D(nf, nx)
    torch.nn.init.normal_(conv.bias)
    linear = torch.nn.Linear(nx, nf)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return conv, linear


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_conv1d_is_bitwise_the_equivalent_fp8_linear(recipe):
    conv, linear = _conv1d_and_linear()
    conv = compile_fp8(conv, Float8Config(recipe=recipe), compile=False)
    linear = compile_fp8(linear, Float8Config(recipe=recipe), compile=False)
    assert fp8_layers(conv) == {"": f"fp8 {recipe} dynamic (emulated)"}
    assert isinstance(conv.weight, Float8TrainingWeight) and conv.weight.shape == (32, 48)
    x = torch.randn(2, 8, 32)
    x_conv, x_linear = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_conv, out_linear = conv(x_conv), linear(x_linear)
    grad = torch.randn_like(out_conv)
    out_conv.backward(grad)
    out_linear.backward(grad)
    pairs = {
        "output": (out_conv, out_linear),
        "grad_input": (x_conv.grad, x_linear.grad),
        "grad_weight": (conv.weight.grad, linear.weight.grad.t()),  # [in, out] on the Conv1D
        "grad_bias": (conv.bias.grad, linear.bias.grad),
    }
    for what, (a, b) in pairs.items():
        assert bits_equal(a, b), f"{what}: sqnr {sqnr(b, a):.1f} dB"
    state = conv.state_dict()
    assert list(state) == ["weight", "bias"] and type(state["weight"]) is torch.Tensor
    assert state["weight"].shape == (32, 48)


def test_conv1d_compiled_equals_eager():
    conv, _ = _conv1d_and_linear()
    eager = compile_fp8(copy.deepcopy(conv), compile=False)
    counter = CompileCounterWithBackend("inductor")
    compiled = compile_fp8(conv, backend=counter, fullgraph=True)
    x = torch.randn(2, 8, 32)
    assert bits_equal(compiled(x), eager(x))
    assert counter.frame_count == 1


def test_conv1d_that_cannot_convert_says_why():
    with pytest.warns(UserWarning, match=r"0 \(out_features=50"):
        model = compile_fp8(torch.nn.Sequential(Conv1D(50, 32)), compile=False)
    assert fp8_layers(model) == {"0": "skipped: out_features=50 is not a multiple of 16"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        static = compile_fp8(_build("gpt2"), Float8Config(scaling="static"), compile=False)
    assert fp8_layers(static)["transformer.h.0.attn.c_attn"] == (
        "skipped: scaling='static' is implemented for nn.Linear only; "
        "transformers Conv1D layers convert with scaling='dynamic'"
    )


# ---- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bf16_checkpoint_to_fp8_train_and_back_to_the_plain_model(name, tmp_path):
    """bf16 checkpoint -> from_pretrained -> compile_fp8 -> train -> save_pretrained ->
    from_pretrained into the plain model: same keys, the trained bits, ties kept."""
    cls = type(_build(name))
    _build(name, torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = cls.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = compile_fp8(model, CONFIG, compile=False)
    assert isinstance(model.get_submodule(f"{LAYERS[name]}.0.{PROJECTIONS[name][0]}").weight, Float8TrainingWeight)
    _train(model, _batches(3))
    trained = model.state_dict()
    assert list(trained) == keys
    assert all(type(v) is torch.Tensor and v.dtype == torch.bfloat16 for v in trained.values())
    changed = [k for k in keys if not bits_equal(trained[k], before[k])]
    assert len(changed) > len(keys) // 2, f"training changed only {changed}"

    model.save_pretrained(tmp_path / "fp8")
    plain, info = cls.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert list(plain.state_dict()) == keys
    for key, value in plain.state_dict().items():
        assert bits_equal(value, trained[key]), f"{key} differs after save_pretrained/from_pretrained"
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight or name != "gpt2"

    buffer = io.BytesIO()  # and the plain-PyTorch route: torch.save / load(weights_only=True)
    torch.save(unwrap_compiled(model).state_dict(), buffer)
    buffer.seek(0)
    plain.load_state_dict(torch.load(buffer, weights_only=True), strict=True)


# ---- FP8 inference checkpoints in the serving layout ---------------------------------------


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_inference_save_pretrained_reload_is_bitwise(recipe, tmp_path):
    """An FP8 inference model's state_dict is plain tensors (float8 weight, weight_scale), so
    `save_pretrained` writes safetensors; the documented load path (plain model, compile_fp8 with
    the same config and compile=False, load_state_dict) gives the same outputs bit for bit."""
    from safetensors.torch import load_file

    config = Float8Config(mode="inference", recipe=recipe)
    model = compile_fp8(_build("llama", torch.bfloat16), config, compile=False)
    state = model.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values()), {k: type(v) for k, v in state.items()}
    q = "model.layers.0.self_attn.q_proj."
    assert state[q + "weight"].dtype == torch.float8_e4m3fn, state[q + "weight"].dtype
    expected_scale_shape = () if recipe == "tensorwise" else (64, 1)
    assert tuple(state[q + "weight_scale"].shape) == expected_scale_shape, state[q + "weight_scale"].shape
    model.save_pretrained(tmp_path)
    reloaded = compile_fp8(_build("llama", torch.bfloat16), config, compile=False)
    reloaded.load_state_dict(load_file(tmp_path / "model.safetensors"))
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert bits_equal(reloaded(ids).logits, model(ids).logits)
    dequantized = state[q + "weight"].float() * state[q + "weight_scale"]
    original = _build("llama", torch.bfloat16).get_parameter(q + "weight").float()
    assert sqnr(original, dequantized) > 25, f"dequantized weight: {sqnr(original, dequantized):.1f} dB"
