"""The cast after an extern kernel, into the GEMM: a graph pass torch.compile runs on converted models.

A static layer casts x to float8 (`saturated_cast`: to float32, times the scale, clamp, to
e4m3). Inductor fuses that cast into x's producer where the producer is its own kernel (a norm,
silu * up), but attention's output comes from SDPA's kernel: there the cast is a kernel of its
own (one per layer per decode step). The small-M kernel can take x in bf16 and cast it in its
prologue instead (the same bits, `kernels/small_m_gemm.py`): this pass hands it x where x comes
from such an extern kernel. Everywhere else the producer's kernel is the cheaper place (casting
every layer's x in the GEMM costs more than it saves: docs/benchmarks.md).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from ..kernels import small_m_gemm
from .graph_utils import value_of


EXTERN_PRODUCERS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
LAYOUT_METHODS = ("reshape", "view", "transpose", "permute", "contiguous", "flatten")


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _is_method(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _cast_input(x_fp8, x_scale) -> Optional[fx.Node]:
    """The bf16/fp16 tensor that `x_fp8` is `saturated_cast(hp, x_scale, e4m3)` of, as dynamo
    records it (`.to(float32) * scale`, `.clamp(-448, 448)`, `.to(float8_e4m3fn)`), else None."""
    if not (_is_method(x_fp8, "to") and _arg(x_fp8, 1, "dtype") == torch.float8_e4m3fn):
        return None
    clamp = x_fp8.args[0]
    fmax = torch.finfo(torch.float8_e4m3fn).max
    if not (_is_method(clamp, "clamp") and _arg(clamp, 1, "min") == -fmax and _arg(clamp, 2, "max") == fmax):
        return None
    scaled = clamp.args[0]
    if not (isinstance(scaled, fx.Node) and scaled.target is operator.mul and scaled.args[1] is x_scale):
        return None
    upcast = scaled.args[0]
    if not (_is_method(upcast, "to") and _arg(upcast, 1, "dtype") == torch.float32):
        return None
    hp = upcast.args[0]
    value = value_of(hp)
    return hp if value is not None and value.dtype in small_m_gemm.KERNEL_X_DTYPES else None


def _from_extern(node: fx.Node) -> bool:
    """Is `node` an extern kernel's output (through reshapes, views, transposes)?"""
    while any(_is_method(node, name) for name in LAYOUT_METHODS):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in EXTERN_PRODUCERS


def cast_in_kernel(graph: fx.Graph) -> int:
    """Where a float8-x linear's x is the cast of an extern kernel's output, pass the kernel x
    itself (it casts in its prologue); returns how many linears changed."""
    op = getattr(torch.ops.compile_fp8, "fp8_small_mm", None)
    changed = 0
    for node in graph.nodes:
        if op is None or node.op != "call_function" or node.target not in (op, op.default):
            continue
        x_fp8, x_scale = _arg(node, 0, "x_fp8"), _arg(node, 1, "x_scale")
        hp = _cast_input(x_fp8, x_scale)
        if hp is not None and _from_extern(hp):
            if node.args:
                node.update_arg(0, hp)
            else:
                node.update_kwarg("x_fp8", hp)
            _erase_unused_chain(graph, x_fp8, stop=hp)
            changed += 1
    return changed


def _erase_unused_chain(graph: fx.Graph, node: fx.Node, stop: fx.Node) -> None:
    """Erase the cast `node` and its inputs up to `stop` while nothing else uses them (not
    `eliminate_dead_code`: it takes an unused in-place method call for dead)."""
    while node is not stop and not node.users:
        inputs = node.all_input_nodes
        graph.erase_node(node)
        node = inputs[0]
