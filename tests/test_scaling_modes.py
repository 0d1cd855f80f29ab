"""Static (calibrated) and delayed scaling: numerics, compile contract, checkpoints, errors."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from compile_fp8 import (
    Float8Config,
    calibrate,
    compile_fp8,
    fp8_layers,
    plain_state_dict,
    refresh_weight_scales,
)
from compile_fp8.layers import layer_state
from helpers import bits_equal, sqnr


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 16))


def _convert(model, compile=False, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_fp8(model, Float8Config(**config), compile=compile)


def _batches(n=4, scale=1.0):
    return [torch.randn(64, 32) * scale for _ in range(n)]


def _train(model, steps, seed=1):
    """A few AdamW steps on a regression task; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :16]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ---- static -----------------------------------------------------------------------------


def test_uncalibrated_static_runs_dynamic_and_says_so():
    with pytest.warns(UserWarning, match=r"run with dynamic scaling until you call calibrate"):
        static = compile_fp8(_mlp(), Float8Config(scaling="static"), compile=False)
    dynamic = _convert(_mlp())
    x = torch.randn(8, 32)
    assert bits_equal(static(x), dynamic(x))
    assert fp8_layers(static)["0"] == "fp8 tensorwise static (uncalibrated: dynamic until calibrate()) (emulated)"


def test_calibrated_static_is_close_to_dynamic():
    static, dynamic = _convert(_mlp(), scaling="static"), _convert(_mlp())
    calibrate(static, _batches())
    assert fp8_layers(static)["0"] == "fp8 tensorwise static (dynamic grads) (emulated)"
    assert static[0].fp8_amax_input > 0 and static[0].fp8_amax_weight > 0
    x = torch.randn(64, 32)
    s = sqnr(dynamic(x), static(x))
    assert s >= 20, f"static vs dynamic output sqnr {s:.1f} dB"


def test_static_forward_has_no_amax_reduction():
    """Count |x| in inductor's generated code: dynamic reduces input and weight, static nothing."""
    x = torch.randn(64, 32)
    counts = {}
    for scaling in ("dynamic", "static"):
        model = _convert(nn.Sequential(nn.Linear(32, 64)), compile=True, scaling=scaling)
        if scaling == "static":
            calibrate(model, [x])
        with torch.no_grad():
            _, code = run_and_get_code(model, x)
        counts[scaling] = "\n".join(code).count("abs(")
    assert counts == {"dynamic": 2, "static": 0}, counts


def test_values_beyond_calibration_saturate_instead_of_overflowing():
    model = _convert(_mlp(), scaling="static")
    calibrate(model, _batches(scale=0.01))
    out = model(torch.randn(64, 32) * 100)
    assert torch.isfinite(out).all(), "non-finite output beyond the calibrated range"


def test_static_grads_need_loss_fn_and_then_record_grad_amax():
    model = _convert(_mlp(), scaling="static", static_grads=True)
    with pytest.raises(ValueError, match="pass loss_fn="):
        calibrate(model, _batches())
    calibrate(model, _batches(), loss_fn=lambda out, batch: out.square().mean())
    assert model[0].fp8_amax_grad_output > 0
    assert fp8_layers(model)["0"] == "fp8 tensorwise static (static grads) (emulated)"
    losses = _train(model, 30)
    assert losses[-1] < 0.7 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_refresh_weight_scales_tracks_the_optimizer():
    model = _convert(_mlp(), scaling="static")
    calibrate(model, _batches())
    with torch.no_grad():
        model[0].weight.hp.mul_(3)
    refresh_weight_scales(model)
    expected = model[0].weight.hp.abs().max()
    assert bits_equal(model[0].fp8_amax_weight, expected), (model[0].fp8_amax_weight, expected)


def _train_static(static_weights, refresh, compile, steps=3):
    """Outputs, weight grads and fp8_amax_weight of a calibrated static MLP over `steps` SGD
    steps whose large learning rate moves every weight's amax. `refresh`: False, "after" (each
    optimizer step) or "before" it (the weights the step's forward read)."""
    config = Float8Config(scaling="static", static_weights=static_weights)
    torch._dynamo.reset()  # each call compiles anew: keep this module under the recompile limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = compile_fp8(_mlp(), config, compile=compile, **({"fullgraph": True} if compile else {}))
    calibrate(model, _batches())
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    gen = torch.Generator().manual_seed(2)
    seen = []
    for _ in range(steps):
        out = model(torch.randn(64, 32, generator=gen))
        out.square().mean().backward()
        if refresh == "before":
            refresh_weight_scales(model)
        seen += [out.detach(), model[0].weight.grad.clone(), model[2].fp8_amax_weight.clone()]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if refresh == "after":
            refresh_weight_scales(model)
    return seen


@pytest.mark.parametrize("compile", [False, True])
def test_static_weights_false_is_refreshing_after_every_step(compile):
    """static_weights=False measures the weight amax in the step: the same bits as a model whose
    weight scales `refresh_weight_scales` re-measures after every optimizer step, and not those
    of a model left with its calibrated weight scales."""
    in_step = _train_static(static_weights=False, refresh=False, compile=compile)
    refreshed = _train_static(static_weights=True, refresh="after", compile=compile)
    for step, (a, b) in enumerate(zip(in_step, refreshed)):
        assert bits_equal(a, b), f"tensor {step}: in-step weight amax differs from refreshed"
    fixed = _train_static(static_weights=True, refresh=False, compile=compile)
    assert not bits_equal(in_step[-3], fixed[-3]), "the weights did not move their amax"


@pytest.mark.parametrize("compile", [False, True])
def test_static_weights_previous_casts_with_the_amax_of_the_step_before(compile):
    """static_weights="previous": each forward's weight scale is the amax the previous training
    forward measured (the first step's: calibrate's). The same bits as a model whose weight
    amaxes are refreshed after each backward, before the optimizer moves the weights; not those
    of one refreshed after the optimizer step (this step's weights)."""
    previous = _train_static(static_weights="previous", refresh=False, compile=compile)
    before = _train_static(static_weights=True, refresh="before", compile=compile)
    for step, (a, b) in enumerate(zip(previous, before)):
        assert bits_equal(a, b), f"tensor {step}: previous-step weight amax differs"
    after = _train_static(static_weights=True, refresh="after", compile=compile)
    assert not bits_equal(previous[-3], after[-3]), "the scale was this step's weight amax"


def test_static_weights_previous_is_left_to_the_step_and_says_so():
    model = _convert(_mlp(), scaling="static", static_weights="previous")
    calibrate(model, _batches())
    before = model[0].fp8_amax_weight.clone()
    with torch.no_grad():
        model[0].weight.hp.mul_(2)
    refresh_weight_scales(model)  # nothing to refresh: the step measures the weights itself
    assert bits_equal(model[0].fp8_amax_weight, before)
    assert fp8_layers(model)["0"] == (
        "fp8 tensorwise static (dynamic grads, weight amax of the previous step) (emulated)"
    )


def test_static_weights_false_records_the_amax_in_training_forwards_only():
    model = _convert(_mlp(), scaling="static", static_weights=False)
    calibrate(model, _batches())
    with torch.no_grad():
        model[0].weight.hp.mul_(3)
        model(torch.randn(4, 32))
    assert model[0].fp8_amax_weight < model[0].weight.hp.abs().max()  # evaluation: not stored
    model(torch.randn(4, 32)).sum().backward()
    assert bits_equal(model[0].fp8_amax_weight, model[0].weight.hp.abs().max().float())
    before = model[0].fp8_amax_weight.clone()
    with torch.no_grad():
        model[0].weight.hp.mul_(2)
    refresh_weight_scales(model)  # nothing to refresh: the step measures the weights itself
    assert bits_equal(model[0].fp8_amax_weight, before)
    assert fp8_layers(model)["0"] == "fp8 tensorwise static (dynamic grads, weight amax in step) (emulated)"


@pytest.mark.parametrize(
    "batches, kwargs, match",
    [([], {}, "no batches"), (_batches(), {"num_batches": 0}, "num_batches=0")],
)
def test_calibrate_bad_input(batches, kwargs, match):
    model = _convert(_mlp(), scaling="static")
    with pytest.raises(ValueError, match=match):
        calibrate(model, batches, **kwargs)


def test_calibrate_needs_a_static_model():
    with pytest.raises(ValueError, match=r"Float8Config\(scaling='static'\)"):
        calibrate(_convert(_mlp()), _batches())


# ---- delayed ----------------------------------------------------------------------------


@pytest.mark.parametrize("cast_kernels", ["inductor", "triton"])
def test_delayed_trains_compiled_seeded_after_the_first_step(cast_kernels):
    """The first step (empty histories: `where` picks this step's amax) compiles one graph; the
    first optimizer step seeds the layers, and the step after compiles the seeded graph (scales
    from the histories alone) once; no recompile after that."""
    model = _mlp()
    counter = CompileCounterWithBackend("inductor")
    config = Float8Config(scaling="delayed", history_len=4, cast_kernels=cast_kernels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_fp8(model, config, backend=counter, fullgraph=True)
    assert "dynamic until the first optimizer step" in fp8_layers(compiled)["0"]
    losses = _train(compiled, 30)
    assert losses[-1] < 0.7 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    assert counter.frame_count == 2, f"{counter.frame_count} frames compiled, want 2 (unseeded, seeded)"
    assert all(layer_state(m).ready for m in (model[0], model[2]))
    for name in ("input", "weight", "grad_output"):
        history = getattr(model[0], f"fp8_amax_history_{name}")
        assert history.shape == (4,) and (history > 0).all(), f"{name}: {history}"
    assert fp8_layers(compiled)["0"] == "fp8 tensorwise delayed (history 4, max) (emulated)"


def test_delayed_calibrated_trains_in_one_graph():
    """calibrate seeds the histories (newest entry only): the first step already runs seeded."""
    model = _mlp()
    counter = CompileCounterWithBackend("inductor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_fp8(model, Float8Config(scaling="delayed", history_len=4), backend=counter)
    x = torch.randn(64, 32)
    with pytest.raises(ValueError, match="scaling='delayed' calibrate gradients too"):
        calibrate(compiled, [x])
    calibrate(compiled, [x], loss_fn=lambda out, _: out.square().mean())
    history = model[0].fp8_amax_history_input
    assert history[0] == x.abs().max() and (history[1:] == 0).all(), history
    assert (model[2].fp8_amax_history_grad_output[:1] > 0).all()
    assert layer_state(model[0]).ready
    _train(compiled, 5)
    assert counter.frame_count == 1, f"{counter.frame_count} frames compiled, want 1"


def _delayed_grads(compile, steps=3, **config):
    """Outputs and weight grads of a calibrated delayed MLP without biases (whose grads compiled
    code sums in another order) over `steps` SGD steps; each step's input is larger than the
    last, so every step's amax changes its history."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # as in _train_static
    model = nn.Sequential(nn.Linear(32, 64, bias=False), nn.SiLU(), nn.Linear(64, 16, bias=False))
    model = _convert(model, compile=compile, scaling="delayed", **config)
    gen = torch.Generator().manual_seed(1)
    calibrate(model, [torch.randn(64, 32, generator=gen)], loss_fn=lambda out, _: out.square().mean())
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    seen = []
    for step in range(steps):
        out = model(torch.randn(64, 32, generator=gen) * (1 + step))
        out.square().mean().backward()
        seen += [out.detach(), model[0].weight.grad.clone(), model[2].weight.grad.clone()]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return seen


@pytest.mark.parametrize("config", [{"history_len": 1}, {"amax_from": "most_recent"}])
def test_compiled_delayed_backward_uses_the_forwards_scales(config):
    """The forward pushes this step's amax into the history its scale came from. Compiled, the
    backward must still use the forward's scale, not one re-read from the updated history (the
    partitioner would re-compute it there: gradients off by the ratio of two steps' amaxes)."""
    eager, compiled = _delayed_grads(False, **config), _delayed_grads(True, **config)
    for i, (want, got) in enumerate(zip(eager, compiled)):
        # float32 rounding may differ in places (compiled code fuses); a wrong scale moves all
        error = ((got - want).norm() / want.norm()).item()
        assert error < 1e-5, f"step {i // 3}, tensor {i % 3}: compiled is {error:.3g} off eager (relative)"


def test_delayed_seeded_scale_comes_from_the_history_alone():
    """Seeded, a step's input scale is the history's, even where this step's amax is larger
    (the cast saturates, as delayed scaling does); unseeded, the `where` would take the amax."""
    model = _convert(_mlp(), scaling="delayed")
    layer = model[0]
    layer.fp8_amax_history_input.fill_(0.5)
    layer.fp8_amax_history_weight.fill_(layer.weight.detach().abs().max())
    layer.fp8_amax_history_grad_output.fill_(1.0)
    layer_state(layer).refresh(layer)
    assert layer_state(layer).ready
    x = torch.full((16, 32), 4.0)  # amax 4 > 0.5: saturates to 0.5 with the history's scale
    out = layer(x)
    want = F.linear(torch.full((16, 32), 0.5), layer.weight.detach(), layer.bias.detach())
    assert torch.allclose(out, want, rtol=0.1), (out[0, :4], want[0, :4])
    assert layer.fp8_amax_history_input[0] == 4.0, "this step's amax is pushed for the next"


def test_delayed_first_step_is_dynamic_scaling_bit_for_bit():
    """Empty histories: the in-graph `where` picks this step's amax, exactly as dynamic does."""
    delayed, dynamic = _convert(_mlp(), scaling="delayed"), _convert(_mlp())
    x = torch.randn(64, 32, requires_grad=True)
    outs = []
    for model in (delayed, dynamic):
        x.grad = None
        out = model(x)
        out.square().mean().backward()
        outs.append((out, x.grad, model[0].weight.grad))
    for got, want in zip(*outs):
        assert bits_equal(got, want)
    assert (delayed[0].fp8_amax_history_grad_output[0] > 0).item(), "backward recorded grad amax"


def test_delayed_is_close_to_dynamic():
    delayed, dynamic = _convert(_mlp(), scaling="delayed"), _convert(_mlp())
    x = torch.randn(64, 32)
    _train(delayed, 1)
    _train(dynamic, 1)
    s = sqnr(dynamic(x), delayed(x))
    assert s >= 20, f"delayed vs dynamic sqnr {s:.1f} dB"


@pytest.mark.parametrize("scaling", ["static", "delayed"])
def test_resume_is_bit_identical(scaling):
    """Save after k steps, load into a fresh model: the next step equals the uninterrupted run."""
    model = _convert(_mlp(), scaling=scaling)
    if scaling == "static":
        calibrate(model, _batches())
    _train(model, 3)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    resumed = _convert(_mlp(), scaling=scaling)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert fp8_layers(resumed) == fp8_layers(model)
    x = torch.randn(16, 32)
    assert bits_equal(resumed(x), model(x))
    assert _train(resumed, 1, seed=7) == _train(model, 1, seed=7)


def test_checkpoint_buffers_are_documented_and_droppable():
    model = _convert(_mlp(), scaling="delayed")
    keys = set(model.state_dict())
    assert {"0.fp8_amax_history_input", "0.fp8_amax_history_weight", "0.fp8_amax_history_grad_output"} <= keys
    plain = _mlp()
    plain.load_state_dict(plain_state_dict(model))  # strict: exactly the plain keys


def test_plain_checkpoint_loads_into_static_model_with_a_warning():
    model = _convert(_mlp(), scaling="static")
    with pytest.warns(UserWarning, match="FP8 scales are uncalibrated"):
        model.load_state_dict(_mlp().state_dict())
    assert fp8_layers(model)["0"].find("(uncalibrated: dynamic until calibrate())") > 0


# ---- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scaling": "static", "recipe": "rowwise"}, "supports recipe='tensorwise' only"),
        ({"scaling": "delayed", "history_len": 0}, "history_len=0 must be an int >= 1"),
        ({"amax_margin": 0.0}, "amax_margin=0.0 must be > 0"),
        ({"amax_from": "mean"}, r"amax_from='mean'.*allowed values"),
        ({"cast_kernels": "cuda"}, r"cast_kernels='cuda'.*allowed values"),
        ({"cast_kernels": "triton", "recipe": "rowwise"}, "supports recipe='tensorwise' only"),
        ({"static_weights": "no"}, r"static_weights='no'.*allowed values"),
        ({"static_weights": False, "scaling": "static", "mode": "inference"},
         "static_weights=False applies to mode='training' only"),
        ({"static_weights": False, "scaling": "delayed"}, "static_weights=False applies to scaling='static' only"),
        ({"static_weights": False}, "static_weights=False applies to scaling='static' only"),
        ({"static_weights": "previous", "scaling": "delayed"},
         "static_weights=.previous. applies to scaling=.static. only"),
        ({"static_weights": "previous", "scaling": "static", "mode": "inference"},
         "static_weights=.previous. applies to mode=.training. only"),
    ],
)
def test_bad_scaling_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Float8Config(**kwargs)


def test_custom_forward_subclass_is_skipped_for_static_scaling():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = _convert(nn.Sequential(Custom(32, 32)), scaling="static")
    assert fp8_layers(model)["0"].startswith("skipped: Custom overrides forward")


def test_deepcopy_keeps_the_scaled_forward_bound_to_the_copy():
    model = _convert(_mlp(), scaling="static")
    calibrate(model, _batches())
    clone = copy.deepcopy(model)
    clone[0].fp8_amax_input.fill_(1e-3)  # a tiny scale range: the clone must saturate, not us
    x = torch.randn(8, 32)
    assert not bits_equal(clone(x), model(x))
    assert clone[0].forward.__self__ is clone[0]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _Blocks(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(32, 32)  # every block's input requires grad (no guard on it)
        self.blocks = nn.ModuleList(_Block() for _ in range(n))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x[:, :16]


def test_delayed_blocks_share_one_graph_and_pickle():
    """A plain nn.Linear with stateful scaling gets a class (not a per-instance forward), so the
    identical blocks of a regional compile share a graph: 2 for 4 blocks (unseeded, seeded)."""
    model = _Blocks()
    counter = CompileCounterWithBackend("inductor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_fp8(model, Float8Config(scaling="delayed"), backend=counter, fullgraph=True)
    assert isinstance(model.blocks[0].up, nn.Linear) and "forward" not in vars(model.blocks[0].up)
    _train(model, 3)
    assert counter.frame_count == 2, f"{counter.frame_count} frames for 4 blocks, want 2"
    buffer = io.BytesIO()
    torch.save(_convert(_mlp(), scaling="delayed"), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "delayed" in fp8_layers(loaded)["0"] and loaded(torch.randn(4, 32)).shape == (4, 16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "scaling, extra",
    [
        ("static", {}),
        ("static", {"static_weights": False}),
        ("static", {"static_weights": "previous"}),
        ("delayed", {}),
        ("delayed", {"amax_from": "most_recent"}),
    ],
)
def test_compiled_training_on_cuda(scaling, extra):
    """torch 2.11 on the H200: buffer updates in forward and backward inside inductor's graph."""
    model = _mlp().cuda()
    counter = CompileCounterWithBackend("inductor")
    config = Float8Config(scaling=scaling, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_fp8(model, config, backend=counter, fullgraph=True)
    if scaling == "static":
        calibrate(compiled, [b.cuda() for b in _batches()])
    gen = torch.Generator(device="cuda").manual_seed(0)
    opt = torch.optim.AdamW(compiled.parameters(), lr=3e-3, fused=True)
    losses = []
    for _ in range(30):
        x = torch.randn(64, 32, device="cuda", generator=gen)
        loss = nn.functional.mse_loss(compiled(x), torch.sin(x[:, :16]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    # static: calibrated before the first step; delayed: the first optimizer step seeds the
    # histories and the next step compiles the seeded graph once
    want = 1 if scaling == "static" else 2
    assert counter.frame_count == want, f"{counter.frame_count} frames, want {want}"


def test_calibrate_runs_eagerly_on_a_model_compiled_in_place():
    """compile_fp8 compiles in place, so calibrate's forwards would go through the compiled
    model: they run eagerly instead (no graph for the recording forward, no recompile after)."""
    model = _mlp()
    counter = CompileCounterWithBackend("eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_fp8(model, Float8Config(scaling="static"), backend=counter, fullgraph=True)
    calibrate(model, _batches())
    assert counter.frame_count == 0, f"calibrate compiled {counter.frame_count} frame(s)"
    for _ in range(2):
        model(torch.randn(8, 32)).sum().backward()
    assert counter.frame_count == 1, f"{counter.frame_count} frames after calibrate"



def _lm_step_saving(save_float8_inputs: bool, monkeypatch):
    """(grads, float8 elements the compiled forwards keep for backward) of one step of a 2-block
    bf16 LM, compiled per block, calibrated static scales (gradients too), `_scaled_mm` (CPU's
    reference kernel: emulation would keep float32 upcasts instead)."""
    from torch._inductor import compile_fx

    from compile_fp8.lm.model import TransformerLM, get_preset
    from compile_fp8.training import linear_fn

    monkeypatch.setattr(linear_fn, "SAVE_FLOAT8_INPUTS", save_float8_inputs)
    kept = []
    partition = compile_fx.min_cut_rematerialization_partition  # inductor's partitioner

    def spy(joint, *args, **kwargs):
        forward, backward = partition(joint, *args, **kwargs)
        for node in forward.graph.find_nodes(op="output")[0].args[0]:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dtype == torch.float8_e4m3fn:
                kept.append(value.numel())
        return forward, backward

    monkeypatch.setattr(compile_fx, "min_cut_rematerialization_partition", spy)
    cfg = get_preset("tiny").replace(d_model=64, n_heads=4, d_ff=176, n_layers=2, seq_len=32, vocab_size=128)
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(torch.bfloat16)
    tokens = torch.randint(0, 128, (4, 33))
    batch = (tokens[:, :-1], tokens[:, 1:])
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):  # the switch is read while tracing
        config = Float8Config(scaling="static", static_grads=True, emulate=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CPU _scaled_mm says it is slow
            compile_fp8(model, config, module_filter_fn=lambda m, fqn: fqn != "head").compile_loss()
        calibrate(model, [batch], loss_fn=lambda loss, _: loss)
        model(*batch).backward()
    return {name: p.grad.float() for name, p in model.named_parameters()}, sum(kept)


def test_save_float8_inputs_keeps_the_forwards_float8_copies(monkeypatch):
    """SAVE_FLOAT8_INPUTS: the compiled blocks keep their linears' float8 inputs for the
    weight-gradient GEMMs, where by default the backward re-casts them from the high-precision
    tensors it keeps anyway (norm inputs, SwiGLU's gate and up); the gradients stay close (not
    the same bits: a norm re-computed in backward may round a value differently)."""
    default_grads, default_kept = _lm_step_saving(False, monkeypatch)
    pinned_grads, pinned_kept = _lm_step_saving(True, monkeypatch)
    assert default_kept == 0 and pinned_kept > 0, (default_kept, pinned_kept)
    for name, grad in default_grads.items():
        assert sqnr(grad, pinned_grads[name]) > 20, name
