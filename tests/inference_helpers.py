"""What the FP8 inference tests share: models, conversion, markers, the small-M kernel switch.

CPU tests run the emulated FP8 GEMM (float32 matmul on the float8 values; the CPU default) or,
where a test asks for it, torch's CPU `_scaled_mm` for large M, and the small-M kernel's torch
fallback for small M. The Triton kernel runs in Triton's interpreter with TRITON_INTERPRET=1
(`interpreter` tests, with `run_small_m_kernel`), and on CUDA under the `gpu` marker.
"""

import io

import pytest
import torch
from torch import nn

from compile_fp8 import Float8Config, calibrate, compile_fp8
from compile_fp8.inference import linear as inference_linear
from compile_fp8.inference.scales import quantize_weight, scale_of_inverse
from compile_fp8.inference.state import InferenceState
from compile_fp8.kernels import small_m_gemm, triton_support
from compile_fp8.layers import converted_layers
from compile_fp8.lm.model import TransformerLM, get_preset

BF16 = torch.bfloat16
E4M3 = torch.float8_e4m3fn
RECIPES = ["tensorwise", "rowwise"]
SCALED_MM = dict(weight_only_max_m=0)  # every M through _scaled_mm
WEIGHT_ONLY = dict(weight_only_max_m=10**6)  # every M through the small-M (weight-only) path
PATHS = {"scaled_mm": SCALED_MM, "weight_only": WEIGHT_ONLY}
INTERPRETING = triton_support.triton is not None and triton_support.interpreting()
interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="Triton's CPU interpreter: needs triton and TRITON_INTERPRET=1"
)
needs_triton = pytest.mark.skipif(triton_support.triton is None, reason="needs triton")


def _mlp(dtype=BF16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 48), nn.GELU(), nn.Linear(48, 32)).to(dtype)


def _reset_mlp():
    """An `_mlp` with other weights (a model to load a checkpoint into)."""
    return _mlp().apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)


def _tiny_lm():
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=256, n_layers=2, seq_len=32)
    return TransformerLM(cfg).to(BF16)


def _inference(model, recipe="tensorwise", **kwargs):
    """`model` converted for inference in place (not compiled)."""
    return compile_fp8(model, Float8Config(mode="inference", recipe=recipe, **kwargs), compile=False)


def _x(*shape):
    return torch.randn(*shape, dtype=BF16)


def _quantized(hp, granularity):
    """(float8 e4m3 data, float32 quantization scale) of `hp` [N, K], as a converted layer holds
    its weight (and as the layer casts x): what the small-M kernels take."""
    data, inv_scale = quantize_weight(hp, granularity)
    return data, scale_of_inverse(inv_scale)


def _dequantized(layer, dtype=BF16):
    """A converted layer's float8 weight in `dtype`, as its backward (and the small-M kernel's
    epilogue) computes it: divided by the quantization scale."""
    return (layer.weight.float() / layer.weight_quant_scale).to(dtype)


def _static_layers(model):
    return [m for _, m, state in converted_layers(model, InferenceState) if state.is_static]


def _report(layers: dict) -> dict:
    """`fp8_layers` without the " (emulated)" suffix that CPU layers get (emulation is the
    default off FP8 GPUs)."""
    return {k: v.removesuffix(" (emulated)") for k, v in layers.items()}


def _saved(state):
    """`state` through torch.save / torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run_small_m_kernel(monkeypatch):
    """Small M runs the Triton kernel on CPU tensors, as it does on the GPU (with
    TRITON_INTERPRET=1 the interpreter runs it): both places that ask whether it can run."""
    monkeypatch.setattr(small_m_gemm, "triton_available", lambda device: True)
    monkeypatch.setattr(inference_linear, "triton_available", lambda device: True)


def _torchao_inference(model, granularity):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    kind = PerTensor() if granularity == "tensorwise" else PerRow()
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=kind))
    return model


# ---- models for the decode graph passes ------------------------------------------------------


class _GatedMLP(nn.Module):
    """A SwiGLU block: gate and up read the same normed input (a group), down reads their product."""

    def __init__(self, d=64, f=96, bias=False):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.gate, self.up, self.down = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias), nn.Linear(f, d, bias=bias)
        self.register_buffer("steps", torch.zeros(()))
        self.mutate_between = False

    def forward(self, x):
        h = self.norm(x)
        gate = self.gate(h)
        if self.mutate_between:  # an in-place write between the siblings: the pass must not move them
            self.steps.add_(1)
        return x + self.down(nn.functional.silu(gate) * self.up(h))


def _gated(scaling="static", blocks=2, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(*[_GatedMLP(**kwargs) for _ in range(blocks)]).to(BF16)
    model = _inference(model, scaling=scaling, weight_only_max_m=16)
    if scaling == "static":
        calibrate(model, [_x(2, 4, 64)])
    return model


def _static_lm():
    """The tiny LM for decode with static scales, its LM head in bf16 (as bench_inference runs it)."""
    config = Float8Config(mode="inference", scaling="static", weight_only_max_m=64)
    return compile_fp8(_tiny_lm(), config, module_filter_fn=lambda module, fqn: fqn != "head", compile=False)


def _dynamo_graph(model, x, **compile_kwargs):
    """The graph torch.compile hands its backend (what inductor's pre-grad pass sees)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True, **compile_kwargs)(x)
    return graphs[0]  # (graph module, its inputs: x and the layers' lifted tensors)


def _ops_in(gm):
    return [str(node.target) for node in gm.graph.nodes if "compile_fp8" in str(node.target)]
