"""training/shared_inputs.py: static layers that read the same tensor share one input scale, so
the compiled step casts that tensor once and keeps one float8 copy, as dynamic scaling does."""

import copy
import io
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from compile_fp8 import Float8Config, calibrate, compile_fp8, fp8_layers
from compile_fp8.layers import layer_state
from helpers import bits_equal


class _SwiGLU(nn.Module):
    def __init__(self, d=32, f=64):
        super().__init__()
        self.gate = nn.Linear(d, f, bias=False)
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = F.rms_norm(x, (x.shape[-1],))
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class _Blocks(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(32, 32)  # every block's input requires grad
        self.blocks = nn.ModuleList(_SwiGLU() for _ in range(n))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def _batches(n=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(64, 32, generator=gen).to(dtype) for _ in range(n)]


def _calibrated(model, config: Float8Config, compile=False, backend="inductor"):
    """`model` converted with `config` and calibrated on `_batches`, gradients included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_fp8(model, config, compile=compile, backend=backend)
    dtype = next(model.parameters()).dtype
    calibrate(model, _batches(dtype=dtype), loss_fn=lambda out, _: out.float().pow(2).mean())
    return model


def _static(model, compile=False, backend="inductor", **config):
    return _calibrated(model, Float8Config(scaling="static", static_grads=True, **config), compile, backend)


def _leader(module):
    return layer_state(module).input_scale_from


def test_calibrate_ties_the_layers_that_read_one_tensor():
    model = _static(_Blocks())
    for block in model.blocks:
        assert _leader(block.up) is block.gate  # up reads what gate read: gate's scale
        assert _leader(block.gate) is None and _leader(block.down) is None
        assert torch.equal(block.up.fp8_amax_input, block.gate.fp8_amax_input)  # both kept
    assert _leader(model.embed) is None
    assert "input scale and cast shared" in fp8_layers(model)["blocks.0.up"]


def test_a_layer_that_once_read_another_tensor_is_not_tied():
    class Sometimes(_SwiGLU):
        calls = 0

        def forward(self, x):
            h = F.rms_norm(x, (x.shape[-1],))
            self.calls += 1
            other = h if self.calls < 3 else h.clone()  # the third batch: equal values, not the same tensor
            return x + self.down(F.silu(self.gate(h)) * self.up(other))

    torch.manual_seed(0)
    model = _static(Sometimes())
    assert _leader(model.up) is None


def test_tied_layers_compute_the_same_bits():
    """Reading the leader's buffer changes nothing but where the (equal) scale comes from."""
    tied = _static(_Blocks())
    untied = copy.deepcopy(tied)
    for block in untied.blocks:
        layer_state(block.up).input_scale_from = None
    x = torch.randn(64, 32)
    results = []
    for model in (tied, untied):
        out = model(x)
        out.float().pow(2).mean().backward()
        results.append([out.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert bits_equal(a, b)


def test_copies_keep_their_ties_inside_the_copy():
    model = _static(_Blocks())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert _leader(clone.blocks[1].up) is clone.blocks[1].gate


def _saved_float8(model):
    """(shape, dtype) of every float8 tensor autograd keeps for backward in one training step."""
    saved = []

    def pack(t):
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(torch.randn(96, 32, dtype=torch.bfloat16)).float().pow(2).mean()
    loss.backward()
    return Counter(saved)


@pytest.mark.parametrize("scaling", ["static", "delayed"])
def test_compiled_step_keeps_no_more_float8_than_dynamic(scaling):
    """The peak-memory property, on CPU: per block, the compiled static (delayed) step saves the
    same float8 tensors as the dynamic one (before the ties it kept a second copy of the SwiGLU
    input, [96, 32] here), and the blocks still share one graph."""
    counter = CompileCounterWithBackend("inductor")
    convert = _static if scaling == "static" else _delayed
    stateful = convert(_Blocks().bfloat16(), compile=True, backend=counter, emulate=False)
    dynamic = _Blocks().bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_fp8(dynamic, Float8Config(emulate=False), compile=True)
    for _ in range(2):
        stateful_saved, dynamic_saved = _saved_float8(stateful), _saved_float8(dynamic)
    assert stateful_saved == dynamic_saved, (stateful_saved, dynamic_saved)
    assert counter.frame_count == 1, f"{counter.frame_count} frames for 3 blocks, want 1"


def test_no_tie_to_a_layer_of_an_earlier_calibration():
    """Two models calibrated on the very same batch tensors: each first layer sees tensors an
    earlier call fed to the other model's first layer; neither is tied across models."""
    batches = _batches()
    first = _Blocks()
    second = copy.deepcopy(first)
    for model in (first, second):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile_fp8(model, Float8Config(scaling="static"), compile=False)
        calibrate(model, batches)
    assert _leader(second.embed) is None and _leader(first.embed) is None
    assert _leader(second.blocks[0].up) is second.blocks[0].gate


# ---- delayed scaling: the tied layers read the leader's history, the last one pushes it ----


def _delayed(model, compile=False, backend="inductor", **config):
    return _calibrated(model, Float8Config(scaling="delayed", **config), compile, backend)


class _QKV(nn.Module):
    """Three layers read one tensor, called in another order than they were defined."""

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x):
        return self.k(x) * self.v(x) + self.q(x)


def _pusher(module):
    return layer_state(module).input_pushed_by


def test_delayed_ties_and_the_last_reader_pushes():
    model = _delayed(_Blocks())
    for block in model.blocks:
        assert _leader(block.up) is block.gate and _pusher(block.gate) is block.up
        assert _leader(block.down) is None and _pusher(block.down) is None
    assert "input scale and cast shared" in fp8_layers(model)["blocks.0.up"]
    torch.manual_seed(0)
    qkv = _delayed(_QKV())
    assert _leader(qkv.v) is qkv.k and _leader(qkv.q) is qkv.k and _pusher(qkv.k) is qkv.q


def test_tied_delayed_histories_move_as_untied_ones():
    """Training steps: every history (the leader's, pushed by its last reader, and each
    follower's own) holds what an untied copy's holds, and the results are the same bits."""
    tied = _delayed(_QKV())
    untied = copy.deepcopy(tied)
    for layer in (untied.q, untied.k, untied.v):
        layer_state(layer).input_scale_from = layer_state(layer).input_pushed_by = None
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (tied, untied)]
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(64, 32, generator=gen) * (step + 1)  # growing amaxes: the histories move
        results = []
        for model, opt in zip((tied, untied), opts):
            out = model(x)
            out.float().pow(2).mean().backward()
            results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
        for a, b in zip(*results):
            assert bits_equal(a, b)
    for name in ("q", "k", "v"):
        for buffer in ("fp8_amax_history_input", "fp8_amax_history_weight"):
            got, want = (getattr(getattr(m, name), buffer) for m in (tied, untied))
            assert torch.equal(got, want), (name, buffer, got, want)
    assert tied.k.fp8_amax_history_input[2] > 0  # seeded + 3 steps pushed
