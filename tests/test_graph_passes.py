"""The decode graph passes (`inference/passes.py`): sibling small-M linears in one launch
(`inference/group_linears.py`) and the cast after attention inside the GEMM
(`inference/cast_in_kernel.py`).

The passes always run under inductor (installed as its pre-grad custom pass by the conversion).
The tests run them by hand on the graph dynamo captured (a custom backend: no inductor, no
pass) and compare with the untouched graph; on the GPU, inductor with the pass against inductor
with `pre_grad_custom_pass` unset.
"""

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

from compile_fp8 import calibrate
from compile_fp8.inference import passes
from compile_fp8.inference.cast_in_kernel import cast_in_kernel
from compile_fp8.inference.group_linears import group_small_m_linears
from helpers import bits_equal
from inference_helpers import (
    BF16,
    _dynamo_graph,
    _gated,
    _inference,
    _ops_in,
    _static_lm,
    _x,
    interpreter,
    run_small_m_kernel,
)


# ---- sibling small-M linears in one launch ----------------------------------------------------


@interpreter
@pytest.mark.parametrize("scaling, op", [("static", "fp8_small_mm"), ("dynamic", "weight_only_mm")])
def test_interpreted_group_pass_runs_gate_and_up_in_one_launch_same_bits(scaling, op, monkeypatch):
    """Each block's gate and up become one small_mm_group call (their x casts hoisted before it);
    down, which reads their product, stays alone; the graph computes the same bits."""
    run_small_m_kernel(monkeypatch)  # the interpreter runs it
    gm, inputs = _dynamo_graph(_gated(scaling), _x(2, 4, 64))
    with torch.no_grad():
        expected = gm(*inputs)[0]
        assert group_small_m_linears(gm.graph) == 2
        gm.graph.lint()
        gm.recompile()
        actual = gm(*inputs)[0]
    ops = _ops_in(gm)
    assert ops.count("compile_fp8.small_mm_group.default") == 2 and sum(op in name for name in ops) == 2, ops
    assert bits_equal(expected, actual), (expected - actual).abs().max()


@interpreter
def test_interpreted_group_pass_leaves_dependent_and_mutation_separated_linears(monkeypatch):
    """No group across an in-place write between the siblings; none of x's producer and consumer."""
    run_small_m_kernel(monkeypatch)
    model = _gated()
    for block in model:
        block.mutate_between = True
    gm, _ = _dynamo_graph(model, _x(2, 4, 64))
    passes.SmallMPasses()(gm.graph)  # both passes
    assert len(_ops_in(gm)) == 6 and "small_mm_group" not in str(_ops_in(gm)), _ops_in(gm)
    assert sum(node.target == "add_" for node in gm.graph.nodes) == 2  # the writes are still there
    chain = _inference(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(BF16), weight_only_max_m=16)
    gm, _ = _dynamo_graph(chain, _x(4, 64))  # the second reads the first's output: not independent
    assert group_small_m_linears(gm.graph) == 0 and len(_ops_in(gm)) == 2, _ops_in(gm)


@interpreter
def test_interpreted_group_pass_leaves_dynamic_shapes_alone(monkeypatch):
    """A graph traced with a symbolic M (dynamic shapes: dynamo turns them on by itself when a
    model sees a second shape) is left as it was, not an error (seen on the H200: a SymInt in
    the grouping key could not be hashed)."""
    run_small_m_kernel(monkeypatch)
    gm, _ = _dynamo_graph(_gated("dynamic"), _x(2, 4, 64), dynamic=True)
    assert len(_ops_in(gm)) == 6 and group_small_m_linears(gm.graph) == 0


def test_group_pass_finds_nothing_without_the_kernel():
    """Where the kernel does not run (CPU without the interpreter), layers run torch math: no ops."""
    gm, _ = _dynamo_graph(_gated(), _x(2, 4, 64))
    assert _ops_in(gm) == [] and group_small_m_linears(gm.graph) == 0 and cast_in_kernel(gm.graph) == 0


def test_group_pass_is_installed_once_and_never_over_another_pass():
    # config.patch, not monkeypatch: undoing a monkeypatch deletes a config entry
    with inductor_config.patch(pre_grad_custom_pass=None):
        _inference(nn.Linear(64, 32).to(BF16))
        installed = inductor_config.pre_grad_custom_pass
        assert isinstance(installed, passes.SmallMPasses) and installed.uuid()
        _inference(nn.Linear(64, 32).to(BF16))
        assert inductor_config.pre_grad_custom_pass is installed
        assert passes.install() and inductor_config.pre_grad_custom_pass is installed
    theirs = lambda graph: None  # noqa: E731
    with inductor_config.patch(pre_grad_custom_pass=theirs):
        with pytest.warns(UserWarning, match="not grouped"):
            _inference(nn.Linear(64, 32).to(BF16))
        assert inductor_config.pre_grad_custom_pass is theirs and not passes.install()


def test_passes_uuid_hashes_the_passes_and_kernels():
    """Inductor's caches key on the pass's uuid: stable for the same sources."""
    first, second = passes.SmallMPasses().uuid(), passes.SmallMPasses().uuid()
    assert first == second and len(first) == 64, (first, second)


# ---- the cast after attention, in the kernel -------------------------------------------------


@interpreter
def test_interpreted_cast_after_attention_moves_into_the_kernel_same_bits(monkeypatch):
    """The out projection's x is the float8 cast of attention's output (no kernel inductor could
    fuse it into): the pass hands the kernel x itself, which casts it in its prologue. The other
    linears keep their casts (fused into the norms). Same bits."""
    run_small_m_kernel(monkeypatch)
    lm, tokens = _static_lm(), torch.randint(0, 256, (16, 1))
    calibrate(lm, [tokens])
    gm, inputs = _dynamo_graph(lm, tokens)
    with torch.no_grad():
        expected = gm(*inputs)[0]
        assert cast_in_kernel(gm.graph) == 2  # one out projection per block
        gm.recompile()
        actual = gm(*inputs)[0]
    casts = [node for node in gm.graph.nodes if node.op == "call_method" and node.args[1:] == (torch.float8_e4m3fn,)]
    assert len(casts) == 8, casts  # the two cast chains it bypassed are gone
    x_dtypes = [node.args[0].meta["example_value"].dtype for node in gm.graph.nodes if "fp8_small_mm" in str(node.target)]
    assert x_dtypes.count(BF16) == 2 and x_dtypes.count(torch.float8_e4m3fn) == 8, x_dtypes
    assert bits_equal(expected, actual), (expected - actual).abs().max()


# ---- GPU: inductor runs the passes --------------------------------------------------------------


def _inductor_run(model, x, with_passes: bool):
    """(output, generated code) of `model` compiled by inductor, with the decode passes or with
    `pre_grad_custom_pass` unset (the graph the passes did not touch)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    installed = inductor_config.pre_grad_custom_pass
    assert isinstance(installed, passes.SmallMPasses), installed
    with inductor_config.patch(pre_grad_custom_pass=installed if with_passes else None), torch.no_grad():
        return run_and_get_code(torch.compile(model, fullgraph=True), x)


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["static", "dynamic"])
def test_gpu_compiled_model_launches_gate_and_up_together(scaling):
    """Under torch.compile (inductor) the pass runs: the grouped kernel is in the generated code,
    and the logits are the bits of the same model compiled without the passes."""
    model, x = _gated(scaling).cuda(), _x(2, 8, 64).cuda()
    outs, codes = {}, {}
    for on in (False, True):
        outs[on], codes[on] = _inductor_run(model, x, on)
    assert "_grouped_kernel" in "".join(codes[True]) and "_grouped_kernel" not in "".join(codes[False])
    assert bits_equal(outs[True], outs[False]), (outs[True] - outs[False]).abs().max()


@pytest.mark.gpu
def test_gpu_compiled_lm_with_both_passes_same_bits():
    """The tiny LM under inductor: grouping and the cast after attention change launches, not
    bits."""
    lm, tokens = _static_lm().cuda(), torch.randint(0, 256, (16, 1), device="cuda")
    calibrate(lm, [tokens])
    outs, codes = {}, {}
    for on in (False, True):
        outs[on], codes[on] = _inductor_run(lm, tokens, on)
    assert "_grouped_kernel" in "".join(codes[True]) and "_grouped_kernel" not in "".join(codes[False])
    assert bits_equal(outs[True], outs[False]), (outs[True] - outs[False]).abs().max()
