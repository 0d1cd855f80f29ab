"""Fewer launches for a decode step: two graph passes torch.compile runs on converted models.

A decode step (M = 16 tokens) runs every linear as one small kernel that streams its weight
from HBM (`fp8_gemv.py`). Each launch pays a fixed cost - the launch gap, the first loads'
latency, the tail where the last programs finish while the rest of the GPU idles: on an H200 a
kernel that only *reads* 4.2 MB takes ~3.1 us and one that reads 11.5 MB ~6 us
(`scripts/probe_gemv.py`), so ~2 us of every launch is not bandwidth. Two passes cut launches:

1. **Siblings in one launch** (`group_small_m_linears`). Linears that read the same input -
   gate and up, or separate q, k, v - share a launch::

       gate = self.gate(h); up = self.up(h)             # two launches, two fixed costs
       gate, up = small_mm_group([hg, hu], ...)         # one: programs 0..P0 gate, P0.. up

   The weights stay separate parameters (nothing concatenated, state_dict unchanged); one
   launch walks both, each member with its own x (its own static scale's cast), scales, bias.
2. **The cast after an extern kernel, into the GEMM** (`cast_in_kernel`, below).

Where and how: inductor's `pre_grad_custom_pass` (`install()`), on the graph dynamo captured,
where each converted small-M linear is one call of `compile_fp8::fp8_small_mm` or
`compile_fp8::weight_only_mm`. A group is up to `fp8_gemv.MAX_GROUP` such calls that follow each
other (no other linear between them), agree on what the grouped kernel shares (`_key`,
`fp8_gemv.check_group`), and are independent: a later member needs nothing an earlier one
computes. The group runs where its first member ran; what later members need that comes after
that point (x's cast, a reshape: pure nodes, at most MAX_HOIST) moves up before it; nothing
moves where a node between the first and the last member mutates anything. A pass never
changes what the graph computes, only how many kernels compute it: the grouped kernel runs each
member's tiles of math exactly as the single kernel does (same bits; `tests/test_inference.py`).

Measured on the H200, 956M model, decode 16 x 1 with CUDA graphs (docs/benchmarks.md,
2026-11-29 22:02): kernels 715 us in 179 launches without the passes, 692 us in 163 launches
with gate + up grouped, 679 us in 147 with the cast moved too; 0.792 -> 0.768 -> 0.746-0.750 ms.
"""

from __future__ import annotations

import hashlib
import operator
import pathlib
from collections import defaultdict
from typing import Optional

import torch
from torch import fx

from . import fp8_gemv

# The passes' switches, on by default: read when torch.compile runs the passes (not when a model
# is converted), part of the passes' uuid, so inductor's caches keep the settings apart.
ENABLED = True  # False: every linear in its own launch
MAX_HOIST = 32  # nodes a later member may need moved up (its x's cast and reshape: ~5)


def _ops() -> dict:
    """The grouped ops by target (OpOverload and packet): the x flavour they run."""
    ops = torch.ops.compile_fp8
    found = {}
    for name, flavour in (("fp8_small_mm", "fp8"), ("weight_only_mm", "hp")):
        if hasattr(ops, name):
            found[getattr(ops, name)] = found[getattr(ops, name).default] = flavour
    return found


def _value(node) -> Optional[torch.Tensor]:
    """The fake tensor dynamo recorded for `node` (None when it is not a node or has none)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _parts(node: fx.Node, flavour: str) -> dict:
    """A grouped op's arguments by name (both ops' schemas, positional or keyword)."""
    names = (("x", "x_scale", "weight", "weight_scale", "bias", "out_dtype", "tiles") if flavour == "fp8"
             else ("x", "weight", "weight_scale", "bias", "tiles"))  # fmt: skip
    parts = dict(zip(names, node.args))
    parts.update(node.kwargs)
    parts.setdefault("bias", None)
    return parts


def _key(node: fx.Node, flavour: str) -> Optional[tuple]:
    """What the members of one group share (None: not groupable): the flavour and the properties
    `fp8_gemv.check_group` requires of x, the weights, the scales and the biases."""
    parts = _parts(node, flavour)
    x, weight, scale = (_value(parts.get(name)) for name in ("x", "weight", "weight_scale"))
    if x is None or weight is None or scale is None or x.dim() != 2 or weight.dim() != 2:
        return None
    if not all(type(size) is int for size in (*x.shape, *x.stride(), *weight.shape, *weight.stride())):
        return None  # dynamic shapes (a SymInt M): left alone
    x_scale = _value(parts.get("x_scale")) if flavour == "fp8" else None
    if flavour == "fp8" and x_scale is None:
        return None
    out_dtype = parts.get("out_dtype", x.dtype)
    return (flavour, tuple(x.shape), x.stride(), x.dtype, x.device, out_dtype, weight.shape[1], weight.stride(),
            weight.dtype, scale.numel() == 1, None if x_scale is None else x_scale.numel() == 1,
            parts["bias"] is None)  # fmt: skip


def _mutates(node: fx.Node) -> bool:
    """Might `node` write to a tensor or have another effect (conservative: in-place methods and
    functions, mutable ops, impure nodes)?"""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return node.op not in ("placeholder", "get_attr")
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return node.is_impure() or (name.endswith("_") and not name.endswith("__")) or node.target is operator.setitem


def _hoist(member: fx.Node, first: int, order: dict, earlier: set) -> Optional[set]:
    """The nodes after position `first` that `member` needs (its x's cast, a reshape), to move
    before the first member; None where one depends on an `earlier` member (not independent),
    mutates, or they are more than MAX_HOIST."""
    needed, stack = set(), list(member.all_input_nodes)
    while stack:
        node = stack.pop()
        if order[node] < first or node in needed:
            continue
        if node in earlier or _mutates(node) or len(needed) >= MAX_HOIST:
            return None
        needed.add(node)
        stack.extend(node.all_input_nodes)
    return needed


def _plan(run: list[fx.Node], order: dict, nodes: list[fx.Node]) -> list[tuple[list[fx.Node], set]]:
    """Groups from a `run` of linears of one key that follow each other in the graph: up to
    MAX_GROUP members, each independent of the ones before it, nothing between the first and the
    last member mutating anything; with the nodes to hoist."""
    groups, i = [], 0
    while i < len(run) - 1:
        members, hoisted = [run[i]], set()
        for node in run[i + 1 : i + fp8_gemv.MAX_GROUP]:
            window = nodes[order[members[0]] + 1 : order[node]]
            needed = _hoist(node, order[members[0]], order, set(members))
            if needed is None or any(_mutates(between) for between in window):
                break
            members.append(node)
            hoisted |= needed
        if len(members) > 1:
            groups.append((members, hoisted))
        i += len(members)
    return groups


def _replace(graph: fx.Graph, members: list[fx.Node], hoisted: set, order: dict, flavour: str) -> None:
    """Move `hoisted` before the first member (graph order kept), then one `small_mm_group` call
    there; each member's users read its item of the group's outputs."""
    first = members[0]
    for node in sorted(hoisted, key=order.__getitem__):
        first.prepend(node)
    parts = [_parts(member, flavour) for member in members]
    weights = [p["weight"] for p in parts]
    x_value, n_total = _value(parts[0]["x"]), sum(_value(w).shape[0] for w in weights)
    tiles = fp8_gemv.tiles_for(n_total, x_value.shape[1], flavour, fp8_gemv.sm_count(x_value.device))
    args = ([p["x"] for p in parts], [p["x_scale"] for p in parts] if flavour == "fp8" else [], weights,
            [p["weight_scale"] for p in parts], [p["bias"] for p in parts],
            parts[0].get("out_dtype", x_value.dtype), tiles)  # fmt: skip
    with graph.inserting_before(first):
        group = graph.call_function(torch.ops.compile_fp8.small_mm_group.default, args)
        group.meta["example_value"] = [_value(member) for member in members]
        for i, member in enumerate(members):
            item = graph.call_function(operator.getitem, (group, i))
            item.meta.update(member.meta)
            member.replace_all_uses_with(item)
    for member in members:
        graph.erase_node(member)


def group_small_m_linears(graph: fx.Graph) -> int:
    """Group the graph's sibling small-M linears (module docstring); returns the groups made."""
    ops = _ops()
    order = {node: i for i, node in enumerate(graph.nodes)}
    nodes = list(graph.nodes)
    runs = defaultdict(list)  # key -> runs of linears of that key with no other linear between
    previous = None
    for node in nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        key = _key(node, ops[node.target])
        if key is not None:
            if not runs[key] or runs[key][-1][-1] is not previous:
                runs[key].append([])
            runs[key][-1].append(node)
        previous = node
    plans = [(members, hoisted, key[0]) for key, key_runs in runs.items() for run in key_runs
             for members, hoisted in _plan(run, order, nodes)]  # fmt: skip
    for members, hoisted, flavour in plans:
        _replace(graph, members, hoisted, order, flavour)
    return len(plans)


# ---- the cast after an extern kernel, into the GEMM ----------------------------------------
#
# A static layer casts x to float8 (`saturated_cast`: to float32, times the scale, clamp, to
# e4m3). Inductor fuses that cast into x's producer where the producer is its own kernel (a
# norm, silu * up), but attention's output comes from SDPA's kernel: there the cast is a kernel
# of its own (16 per decode step of the 956M model, ~1.3 us each plus a launch gap). The kernel
# can take x in bf16 and cast it in its prologue instead (the same bits, `fp8_gemv`): the pass
# hands it x where x comes from such an extern kernel. Everywhere else the producer's kernel is
# the cheaper place (measured on the H200: casting every layer's x in the GEMM cost 78 us over
# the 80 GEMMs of a decode step).

EXTERN_PRODUCERS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
LAYOUT_METHODS = ("reshape", "view", "transpose", "permute", "contiguous", "flatten")
CAST_IN_KERNEL = True  # False: every cast stays torch's (the A/B of docs/benchmarks.md)


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
    value = _value(hp)
    return hp if value is not None and value.dtype in fp8_gemv.KERNEL_X_DTYPES else None


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


try:  # torch >= 2.6: a pass with a uuid keeps inductor's caches on
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover
    CustomGraphPass = object


class SmallMPasses(CustomGraphPass):
    """`cast_in_kernel`, then `group_small_m_linears`, as inductor's pre-grad custom pass; its
    uuid (for inductor's caches) hashes this file, the kernels' and the switches."""

    def __call__(self, graph: fx.Graph) -> None:
        if CAST_IN_KERNEL:
            cast_in_kernel(graph)
        if ENABLED:
            group_small_m_linears(graph)

    def uuid(self) -> str:
        sources = b"".join(pathlib.Path(path).read_bytes() for path in (__file__, fp8_gemv.__file__))
        return hashlib.sha256(sources + bytes([ENABLED, CAST_IN_KERNEL])).hexdigest()


def install() -> bool:
    """Make torch.compile run the passes (inductor's `pre_grad_custom_pass`; process-wide, and they
    only touch compile_fp8's ops). False, leaving things as they are, where another pass is set."""
    import torch._inductor.config as inductor_config

    current = inductor_config.pre_grad_custom_pass
    if isinstance(current, SmallMPasses):
        return True
    if current is not None:
        return False
    inductor_config.pre_grad_custom_pass = SmallMPasses()
    return True
