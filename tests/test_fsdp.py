"""FSDP2 (fully_shard) on gloo: 2 CPU processes train what one process trains, bit for bit.

One spawn runs every sharded scenario (`_worker`, each rank saves its results); the tests below
compare them with single-process runs made here. The single-process reference of W ranks that
each train on their own batch is one model that sums the W batches' gradients and divides by
W: the same float8 casts per batch, and FSDP's averaging reduce-scatter computes (g0 + g1) / 2,
the same bits. A second, 3-process spawn covers uneven shards (16 rows over 3 ranks: FSDP
pads). The tests at the end check the gathered weight in one process (no spawn).
"""

import datetime
import os
import socket
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import compile_fp8.training.linear_fn as fp8_autograd
from compile_fp8 import Float8Config, compile_fp8, fp8_layers, precompute_float8_dynamic_scale_for_fsdp
from compile_fp8.config import RECIPES, recipe_spec
from compile_fp8.training.fsdp import Float8GatheredWeight, gather_amaxes
from compile_fp8.scaling import amax, amax_to_scale, saturated_cast
from compile_fp8.training.weight import Float8TrainingWeight
from helpers import bits_equal

HAVE_GLOO = dist.is_available() and dist.is_gloo_available()


def distributed(test):
    """A test that spawns processes: the `distributed` marker; skipped without gloo."""
    test = pytest.mark.skipif(not HAVE_GLOO, reason="needs torch.distributed with gloo")(test)
    return pytest.mark.distributed(test)


WORLD = 2
STEPS = 3
SPAWN_TIMEOUT_S = 240  # the whole spawn; a hang fails the tests instead of blocking CI
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
DIMS = (32, 64, 48, 16)  # in -> hidden -> hidden -> out; multiples of 16
BATCH = 8


# ---- the model, the data, one training run (shared by the workers and the reference) ---------


class MLP(nn.Module):
    def __init__(self, checkpoint: bool = False):
        super().__init__()
        d_in, h1, h2, d_out = DIMS
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(d_in, h1), nn.GELU()), nn.Sequential(nn.Linear(h1, h2), nn.GELU())]
        )
        self.head = nn.Linear(h2, d_out)
        self.checkpoint = checkpoint

    def forward(self, x):
        for block in self.blocks:
            if self.checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)


def _model(recipe="tensorwise", seed=0, checkpoint=False, **config):
    torch.manual_seed(seed)
    return compile_fp8(MLP(checkpoint), Float8Config(recipe=recipe, **config), compile=False)


def _shard(model, mp_policy=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    for module in [*model.blocks, model.head, model]:  # one FSDP group per block, then the root
        fully_shard(module, **kwargs)
    return model


def _batches(world=WORLD, dims=DIMS, seed=1):
    """Per step: inputs [W, BATCH, d_in] and targets [W, BATCH, d_out]; rank r takes [r]."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(100):
        x = torch.randn(world, BATCH, dims[0], generator=gen)
        yield x, torch.randn(world, BATCH, dims[-1], generator=gen)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model, opt, batches, steps, ranks, after_step=None, forward=None):
    """`steps` steps; each step's gradient is the mean over `ranks` of their batches' gradients
    (under FSDP `ranks` is this rank alone: FSDP averages over the ranks)."""
    forward = model if forward is None else forward
    losses = []
    for _ in range(steps):
        x, y = next(batches)
        step_losses = []
        for r in ranks:
            loss = F.mse_loss(forward(x[r]), y[r])
            loss.backward()  # unscaled, as on a rank: a scaled grad_output casts to other float8
            step_losses.append(loss.item())
        for param in model.parameters():
            param.grad /= len(ranks)  # the mean, as FSDP's reduce-scatter: (g0 + g1) / 2
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step()
        losses.append(step_losses)
    return losses


def _weights(model):
    """name -> full high-precision tensor (gathered from the shards under FSDP)."""
    out = {}
    for name, param in model.named_parameters():
        if hasattr(param, "full_tensor"):
            param = param.full_tensor()
        out[name] = getattr(param, "hp", param).detach().clone()
    return out


# ---- the sharded side: one spawn, every scenario ---------------------------------------------


class _Recorder:
    """Counts all-reduces and records the bytes each all-gather sends, while active."""

    # FSDP2's all-gather: all_gather_single in torch 2.13, all_gather_into_tensor before
    ALL_GATHERS = ("all_gather_single", "all_gather_into_tensor")

    def __init__(self):
        self.all_reduces, self.gather_bytes, self.active = 0, [], False
        dist.all_reduce = self._counting(dist.all_reduce)
        for name in self.ALL_GATHERS:
            if hasattr(dist, name):
                setattr(dist, name, self._recording(getattr(dist, name)))

    def _counting(self, all_reduce):
        def counted(*args, **kwargs):
            self.all_reduces += self.active
            return all_reduce(*args, **kwargs)

        return counted

    def _recording(self, all_gather):
        def recorded(output_tensor, input_tensor, *args, **kwargs):
            if self.active:
                self.gather_bytes.append(input_tensor.numel() * input_tensor.element_size())
            return all_gather(output_tensor, input_tensor, *args, **kwargs)

        return recorded


def _weight_types_in_forward(model):
    """Type names of each Linear's weight while it runs (what FSDP's post-all-gather built)."""
    seen = {}

    def record(module, args, name):
        seen.setdefault(name, type(module.weight).__name__)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda m, args, n=name: record(m, args, n))
    return seen


def _sharded_training(rank, recorder, recipe):
    model = _shard(_model(recipe))
    layers = fp8_layers(model)
    types = _weight_types_in_forward(model)
    recorder.active, recorder.gather_bytes, recorder.all_reduces = True, [], 0
    x, _ = next(_batches())
    with torch.no_grad():
        model(x[rank])  # one forward: what its all-gathers sent
    gather_bytes = list(recorder.gather_bytes)
    recorder.all_reduces = 0
    losses = _train(model, _optimizer(model), _batches(), STEPS, [rank])
    recorder.active = False
    return dict(losses=losses, weights=_weights(model), layers=layers, types=types,
                gather_bytes=gather_bytes, all_reduces=recorder.all_reduces)  # fmt: skip


def _precomputed(rank, recorder):
    model = _shard(_model())
    recorder.active, recorder.all_reduces = True, 0
    precompute_float8_dynamic_scale_for_fsdp(model)
    after = lambda: precompute_float8_dynamic_scale_for_fsdp(model)  # noqa: E731
    losses = _train(model, _optimizer(model), _batches(), STEPS, [rank], after_step=after)
    recorder.active = False
    return dict(losses=losses, weights=_weights(model), all_reduces=recorder.all_reduces)


def _variant(rank, **model_kwargs):
    """Tensorwise training with another model option (activation checkpointing, triton casts)."""
    model = _shard(_model(**model_kwargs))
    losses = _train(model, _optimizer(model), _batches(), STEPS, [rank])
    return dict(losses=losses, weights=_weights(model))


def _checkpoint_resume(rank, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _shard(_model())
    opt, batches = _optimizer(model), _batches()
    _train(model, opt, batches, 2, [rank])
    model_sd, optim_sd = get_state_dict(model, opt)
    saved_types = sorted({type(v._local_tensor).__name__ for v in model_sd.values()})
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    continued = _train(model, opt, batches, 2, [rank])
    # a fresh process's view: other initial weights, then the checkpoint
    resumed_model = _shard(_model(seed=123))
    resumed_opt = _optimizer(resumed_model)
    model_sd, optim_sd = get_state_dict(resumed_model, resumed_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(resumed_model, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    batches = _batches()
    for _ in range(2):
        next(batches)
    resumed = _train(resumed_model, resumed_opt, batches, 2, [rank])
    return dict(continued=continued, continued_weights=_weights(model), resumed=resumed,
                resumed_weights=_weights(resumed_model), saved_types=saved_types,
                resumed_layers=fp8_layers(resumed_model))  # fmt: skip


def _mixed_precision(rank, recorder):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    results = {}
    for recipe in ("tensorwise", "rowwise"):
        model = _shard(_model(recipe), MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        x, _ = next(_batches())
        recorder.active, recorder.gather_bytes = True, []
        with torch.no_grad():
            out = model(x[rank])
        recorder.active = False
        results[recipe] = dict(out=out, layers=fp8_layers(model), gather_bytes=recorder.gather_bytes)
    return results


def _unsupported_scaling(rank):
    messages = {}
    for scaling in ("static", "delayed"):
        model = _shard(_model(scaling=scaling))
        x, _ = next(_batches())
        try:
            model(x[rank])
            messages[scaling] = None
        except NotImplementedError as err:
            messages[scaling] = str(err)
    return messages


def _compiled(rank):
    model = _shard(_model())
    start = time.perf_counter()
    compiled = torch.compile(model)
    losses = _train(model, _optimizer(model), _batches(), STEPS, [rank], forward=compiled)
    return dict(losses=losses, weights=_weights(model), seconds=time.perf_counter() - start)


def _compiled_per_block(rank):
    """torchtitan's order: convert (compile=False), fully_shard each block and the root, then
    compile each block in place (what compile_fp8's regional compile does)."""
    model = _shard(_model())
    for block in model.blocks:
        block.compile()
    losses = _train(model, _optimizer(model), _batches(), STEPS, [rank])
    return dict(losses=losses, weights=_weights(model), compiled=[b._compiled_call_impl is not None for b in model.blocks])


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    recorder = _Recorder()
    results = {f"train/{recipe}": _sharded_training(rank, recorder, recipe) for recipe in RECIPES}
    results["precomputed"] = _precomputed(rank, recorder)
    results["activation_checkpointing"] = _variant(rank, checkpoint=True)
    results["cast_kernels=triton"] = _variant(rank, cast_kernels="triton")
    results["checkpoint"] = _checkpoint_resume(rank, os.path.join(out_dir, "dcp"))
    results["mixed_precision"] = _mixed_precision(rank, recorder)
    results["unsupported"] = _unsupported_scaling(rank)
    results["compiled"] = _compiled(rank)
    results["compiled_per_block"] = _compiled_per_block(rank)
    _save_and_leave(results, os.path.join(out_dir, f"rank{rank}.pt"))


UNEVEN_WORLD, UNEVEN_DIMS = 3, (32, 16, 48)  # 16 rows over 3 ranks: 6, 6, 4 (FSDP pads to 6)


def _uneven_model(recipe):
    torch.manual_seed(0)
    d_in, hidden, d_out = UNEVEN_DIMS
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    return compile_fp8(model, Float8Config(recipe=recipe), compile=False)


def _uneven_worker(rank, world, port, out_dir):
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    results = {}
    for recipe in ("tensorwise", "rowwise"):
        model = _uneven_model(recipe)
        for module in [model[0], model[2], model]:
            fully_shard(module)
        batches = _batches(UNEVEN_WORLD, UNEVEN_DIMS)
        losses = _train(model, _optimizer(model), batches, 2, [rank])
        results[recipe] = dict(losses=losses, weights=_weights(model))
    _save_and_leave(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _leave():
    """End a worker once its results are on disk. The barrier keeps any rank from tearing down
    while another still exchanges data with it; `os._exit` then skips the interpreter's
    finalization, where gloo's threads and pending work objects are destroyed in no fixed order
    and a thread destroyed while running aborts the process ("terminate called without an
    active exception"). Exit code 0 tells the parent the worker got this far."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _save_and_leave(results, path):
    torch.save(results, path + ".partial")
    os.replace(path + ".partial", path)  # the parent never reads a half-written file
    _leave()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, world, timeout_s, *args):
    """Run fn(rank, world, port, *args) in `world` processes; fail (never hang) after timeout_s."""
    ctx = mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):  # re-raises a worker's exception with its traceback
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed workers did not finish within {timeout_s} s")


def _spawn_and_load(worker, world):
    with tempfile.TemporaryDirectory(prefix="compile_fp8_fsdp_") as out_dir:
        start = time.perf_counter()
        spawn(worker, world, SPAWN_TIMEOUT_S, out_dir)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
        print(f"\n{worker.__name__} x {world}: {time.perf_counter() - start:.1f} s")
        return results


@pytest.fixture(scope="module")
def sharded():
    """rank -> results of `_worker` (one spawn for the whole module)."""
    return _spawn_and_load(_worker, WORLD)


@pytest.fixture(scope="module")
def single_process():
    """recipe -> the reference run: one process, the W batches' gradients accumulated."""
    runs = {}
    for recipe in RECIPES:
        model = _model(recipe)
        losses = _train(model, _optimizer(model), _batches(), STEPS, range(WORLD))
        runs[recipe] = dict(losses=losses, weights=_weights(model))
    return runs


def _assert_same_run(losses, weights, ref_losses, ref_weights, rank, rel=0.0):
    """losses[step] == the reference's loss of this rank's batch; weights equal (or within rel)."""
    for step, (loss, ref) in enumerate(zip(losses, ref_losses)):
        assert abs(loss[0] - ref[rank]) <= rel * abs(ref[rank]), f"step {step}: {loss[0]} vs {ref[rank]}"
    for name, ref in ref_weights.items():
        got = weights[name]
        diff = ((got - ref).abs().max() / ref.abs().max()).item()
        assert (bits_equal(got, ref) if rel == 0 else diff <= rel), f"{name}: max rel diff {diff:.3g}"


def _gathered_bytes(weight_element_bytes, bias_element_bytes=4):
    """Bytes one rank sends in each Linear's all-gather: its weight shard and its bias shard."""
    dims = list(zip(DIMS[:-1], DIMS[1:]))
    return [(n * k * weight_element_bytes + n * bias_element_bytes) // WORLD for k, n in dims]


# ---- the tests ---------------------------------------------------------------------------------


@distributed
@pytest.mark.parametrize("recipe", RECIPES)
def test_sharded_training_equals_single_process_bitwise(sharded, single_process, recipe):
    ref = single_process[recipe]
    for rank in range(WORLD):
        run = sharded[rank][f"train/{recipe}"]
        _assert_same_run(run["losses"], run["weights"], ref["losses"], ref["weights"], rank)


@distributed
def test_tensorwise_all_gathers_fp8_bytes(sharded):
    run = sharded[0]["train/tensorwise"]
    assert run["gather_bytes"] == _gathered_bytes(1), run["gather_bytes"]
    assert set(run["types"].values()) == {"Float8GatheredWeight"}, run["types"]


@distributed
@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp"])
def test_rowwise_all_gathers_high_precision_and_says_so(sharded, recipe):
    run = sharded[0][f"train/{recipe}"]
    assert run["gather_bytes"] == _gathered_bytes(4), run["gather_bytes"]
    assert set(run["types"].values()) == {"Float8TrainingWeight"}, run["types"]
    assert set(run["layers"].values()) == {f"fp8 {recipe} dynamic (emulated) (FSDP all-gather in fp32)"}, run["layers"]


@distributed
def test_fp8_layers_names_the_fp8_all_gather(sharded):
    layers = sharded[0]["train/tensorwise"]["layers"]
    assert layers == {
        "blocks.0.0": "fp8 tensorwise dynamic (emulated) (FSDP all-gather in fp8 e4m3)",
        "blocks.1.0": "fp8 tensorwise dynamic (emulated) (FSDP all-gather in fp8 e4m3)",
        "head": "fp8 tensorwise dynamic (emulated) (FSDP all-gather in fp8 e4m3)",
    }, layers


@distributed
def test_one_amax_all_reduce_per_layer_per_step_and_batched_with_precompute(sharded, single_process):
    layers = len(DIMS) - 1
    per_layer = sharded[0]["train/tensorwise"]["all_reduces"]
    assert per_layer == layers * STEPS, f"{per_layer} all-reduces (backward re-gathers reuse forward's)"
    run = sharded[0]["precomputed"]
    assert run["all_reduces"] == 1 + STEPS, f"{run['all_reduces']} all-reduces with precompute"
    ref = single_process["tensorwise"]
    for rank in range(WORLD):
        run = sharded[rank]["precomputed"]
        _assert_same_run(run["losses"], run["weights"], ref["losses"], ref["weights"], rank)


@distributed
@pytest.mark.parametrize("variant", ["activation_checkpointing", "cast_kernels=triton"])
def test_activation_checkpointing_and_triton_casts_change_no_bit(sharded, single_process, variant):
    ref = single_process["tensorwise"]
    for rank in range(WORLD):
        run = sharded[rank][variant]
        _assert_same_run(run["losses"], run["weights"], ref["losses"], ref["weights"], rank)


@distributed
def test_distributed_checkpoint_resume_is_identical(sharded):
    for rank in range(WORLD):
        run = sharded[rank]["checkpoint"]
        assert run["saved_types"] == ["Tensor"], f"sharded state dict holds {run['saved_types']}"
        assert run["resumed"] == run["continued"], (run["resumed"], run["continued"])
        for name, ref in run["continued_weights"].items():
            assert bits_equal(run["resumed_weights"][name], ref), name
        assert all(t.startswith("fp8 tensorwise") for t in run["resumed_layers"].values()), run["resumed_layers"]


@distributed
def test_mixed_precision_bf16_params_forward_equals_a_bf16_model(sharded):
    x, _ = next(_batches())
    for recipe in ("tensorwise", "rowwise"):
        ref_model = _model(recipe).to(torch.bfloat16)
        for rank in range(WORLD):
            run = sharded[rank]["mixed_precision"][recipe]
            with torch.no_grad():
                ref = ref_model(x[rank].to(torch.bfloat16))
            assert bits_equal(run["out"], ref), f"{recipe} rank {rank}: {(run['out'] - ref).abs().max()}"
        run = sharded[0]["mixed_precision"][recipe]
        expected = _gathered_bytes(1 if recipe == "tensorwise" else 2, bias_element_bytes=2)
        assert run["gather_bytes"] == expected, (recipe, run["gather_bytes"], expected)
        gathered = "fp8 e4m3" if recipe == "tensorwise" else "bf16"
        assert set(run["layers"].values()) == {f"fp8 {recipe} dynamic (emulated) (FSDP all-gather in {gathered})"}


@distributed
def test_static_and_delayed_scaling_refuse_fsdp(sharded):
    for scaling, message in sharded[0]["unsupported"].items():
        assert message is not None, f"scaling={scaling!r} ran under FSDP2 without an error"
        assert f"scaling={scaling!r}" in message and "scaling='dynamic'" in message, message


@distributed
def test_torch_compile_after_fully_shard(sharded, single_process):
    # inductor keeps intermediates between layers in float32 (docs/design.md): close, not bitwise
    ref = single_process["tensorwise"]
    for rank in range(WORLD):
        run = sharded[rank]["compiled"]
        _assert_same_run(run["losses"], run["weights"], ref["losses"], ref["weights"], rank, rel=1e-5)


@distributed
def test_fully_shard_then_compile_each_block(sharded, single_process):
    ref = single_process["tensorwise"]
    for rank in range(WORLD):
        run = sharded[rank]["compiled_per_block"]
        assert all(run["compiled"]), run["compiled"]
        _assert_same_run(run["losses"], run["weights"], ref["losses"], ref["weights"], rank, rel=1e-5)


@distributed
def test_uneven_shards_over_three_ranks_equal_single_process():
    # within 1e-5, not bitwise: a sum of three gradients depends on the order gloo adds them in
    sharded = _spawn_and_load(_uneven_worker, UNEVEN_WORLD)
    for recipe in ("tensorwise", "rowwise"):
        model = _uneven_model(recipe)
        losses = _train(model, _optimizer(model), _batches(UNEVEN_WORLD, UNEVEN_DIMS), 2, range(UNEVEN_WORLD))
        for rank in range(UNEVEN_WORLD):
            run = sharded[rank][recipe]
            _assert_same_run(run["losses"], run["weights"], losses, _weights(model), rank, rel=1e-5)


def _lm_worker(rank, world, port, tmp_path):
    """The training loop (`scripts/train.py --fsdp`) in each process: whole, split + resumed."""
    from test_lm import small_run  # the LM tests' tiny run (cycle corpus, CPU emulation)

    from compile_fp8.lm.train import run

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)  # shared by the three runs
    quiet = dict(say=lambda *a: None)
    run(small_run(tmp_path, out="whole", fp8="tensorwise", steps=6, fsdp=True), **quiet)
    run(small_run(tmp_path, out="split", fp8="tensorwise", steps=6, stop_after=3, fsdp=True), **quiet)
    run(small_run(tmp_path, out="split", fp8="tensorwise", steps=6, resume=True, fsdp=True), **quiet)
    _leave()


@distributed
def test_training_loop_fsdp_resumes_exactly_and_saves_plain_weights(tmp_path):
    from test_lm import PRESETS, VOCAB, TransformerLM, train_losses, write_corpus

    write_corpus(tmp_path / "data")
    spawn(_lm_worker, WORLD, SPAWN_TIMEOUT_S, tmp_path)
    whole, split = train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")
    assert whole == split, f"uninterrupted {whole} vs resumed {split}"
    assert whole[6] < whole[1] - 0.5, f"loss {whole[1]:.3f} -> {whole[6]:.3f}"
    state = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert state["fsdp_world_size"] == WORLD and state["step"] == 6, (state["fsdp_world_size"], state["step"])
    TransformerLM(PRESETS["tiny"].replace(vocab_size=VOCAB)).load_state_dict(state["model"])


# ---- one process: the gathered weight itself ---------------------------------------------------


def _gathered_pair(out_features=48, in_features=32):
    """The same weight as a training weight and as the FP8 all-gather's result."""
    weight = torch.randn(out_features, in_features)
    recipe = recipe_spec("tensorwise")
    scale = amax_to_scale(amax(weight), recipe.output.b.dtype)
    gathered = Float8GatheredWeight(saturated_cast(weight, scale, recipe.output.b.dtype), scale, recipe, False, weight.dtype)
    training = Float8TrainingWeight(weight, recipe, False)
    return nn.Parameter(training), nn.Parameter(gathered)


def test_gathered_weight_flatten_unflatten_round_trip():
    _, gathered = _gathered_pair()
    names, metadata = gathered.__tensor_flatten__()
    inner = {name: getattr(gathered, name) for name in names}
    rebuilt = Float8GatheredWeight.__tensor_unflatten__(inner, metadata, gathered.shape, gathered.stride())
    assert (rebuilt.shape, rebuilt.dtype, rebuilt._recipe) == (gathered.shape, gathered.dtype, gathered._recipe)
    assert bits_equal(rebuilt.fp8_data, gathered.fp8_data) and bits_equal(rebuilt.scale, gathered.scale)


def test_gathered_weight_linear_equals_training_weight_without_casting_the_weight(monkeypatch):
    """Forward, grad_input and grad_weight bit for bit; the weight is never cast again."""
    training, gathered = _gathered_pair()
    x, bias, grad = torch.randn(2, 8, 32), torch.randn(48), torch.randn(2, 8, 48)
    cast_shapes = []
    real_cast = fp8_autograd.saturated_cast

    def recording_cast(hp, scale, dtype):
        cast_shapes.append(tuple(hp.shape))
        return real_cast(hp, scale, dtype)

    results = []
    for weight in (training, gathered):
        cast_shapes.clear()
        monkeypatch.setattr(fp8_autograd, "saturated_cast", recording_cast)
        x_ = x.clone().requires_grad_()
        out = F.linear(x_, weight, bias)
        out.backward(grad)
        monkeypatch.undo()
        results.append((out, x_.grad, weight.grad, list(cast_shapes)))
    (out, grad_input, grad_weight, casts), (g_out, g_grad_input, g_grad_weight, g_casts) = results
    assert bits_equal(out, g_out) and bits_equal(grad_input, g_grad_input), "output / grad_input differ"
    assert type(g_grad_weight) is torch.Tensor and bits_equal(grad_weight, g_grad_weight), "grad_weight differs"
    # the training weight: cast once in forward, its float8 copy serves the backward GEMM too
    assert casts.count((48, 32)) + casts.count((32, 48)) == 1, casts
    assert (48, 32) not in g_casts and (32, 48) not in g_casts, g_casts


def test_gathered_weight_is_read_only_and_dequantizes_for_other_ops():
    _, gathered = _gathered_pair()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="read-only"):
        gathered.add_(1)
    doubled = gathered.detach() * 2
    assert type(doubled) is torch.Tensor and bits_equal(doubled, gathered.to_hp() * 2)


class _FakeMesh:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_pre_all_gather_pads_an_uneven_shard_with_zero_bytes(recipe):
    """Rank 2 of 3 holds 4 of 16 rows; FSDP gathers 6 rows per rank. Padding bytes are 0x00."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    full = torch.randn(16, 32)
    shard = Float8TrainingWeight(full[12:].clone(), recipe_spec(recipe), False)
    gather_amaxes(shard).next = amax(full)  # the global amax, as precompute would set it
    (sent,), scale = shard.fsdp_pre_all_gather(_FakeMesh(3), full.shape, (32, 1), nn.Linear(32, 16), MixedPrecisionPolicy())
    assert sent.shape == (6, 32), sent.shape
    assert not sent[4:].view(torch.uint8).any(), "padding rows are not zero bytes"
    if recipe == "tensorwise":
        expected = saturated_cast(full, amax_to_scale(amax(full), torch.float8_e4m3fn), torch.float8_e4m3fn)
        assert sent.dtype == torch.uint8 and bits_equal(sent[:4], expected[12:].view(torch.uint8))
    else:
        assert scale is None and sent.dtype == torch.float32 and bits_equal(sent[:4], full[12:])
