"""Sibling small-M linears in one launch: a graph pass torch.compile runs on converted models.

A decode step (M = 16 tokens) runs every linear as one small kernel that streams its weight
from HBM (`kernels/small_m_gemm.py`). Each launch pays a fixed cost - the launch gap, the first loads'
latency, the tail where the last programs finish while the rest of the GPU idles: on an H200 a
kernel that only *reads* 4.2 MB takes ~3.1 us and one that reads 11.5 MB ~6 us, so ~2 us of every launch is not bandwidth. Two passes cut launches:

1. **Siblings in one launch** (`group_small_m_linears`). Linears that read the same input -
   gate and up, or separate q, k, v - share a launch::

       gate = self.gate(h); up = self.up(h)             # two launches, two fixed costs
       gate, up = small_mm_group([hg, hu], ...)         # one: programs 0..P0 gate, P0.. up

   The weights stay separate parameters (nothing concatenated, state_dict unchanged); one
   launch walks both, each member with its own x (its own static scale's cast), scales, bias.
2. **The cast after an extern kernel, into the GEMM** (`cast_in_kernel.py`).

Where and how: inductor's `pre_grad_custom_pass` (`passes.install()`), on the graph dynamo captured,
where each converted small-M linear is one call of `compile_fp8::fp8_small_mm` or
`compile_fp8::weight_only_mm`. A group is up to `small_m_gemm.MAX_GROUP` such calls that follow each
other (no other linear between them), agree on what the grouped kernel shares (`_key`,
`small_m_gemm.check_group`), and are independent: a later member needs nothing an earlier one
computes. The group runs where its first member ran; what later members need that comes after
that point (x's cast, a reshape: pure nodes, at most MAX_HOIST) moves up before it; nothing
moves where a node between the first and the last member mutates anything. A pass never
changes what the graph computes, only how many kernels compute it: the grouped kernel runs each
member's tiles of math exactly as the single kernel does (same bits, tested).

docs/benchmarks.md has what each pass saves in a decode step.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Optional

import torch
from torch import fx

from ..kernels import small_m_gemm
from .graph_utils import value_of

MAX_HOIST = 32  # nodes a later member may need moved up (its x's cast and reshape: ~5)


def _ops() -> dict:
    """The grouped ops by target (OpOverload and packet): the x flavour they run."""
    ops = torch.ops.compile_fp8
    found = {}
    for name, flavour in (("fp8_small_mm", "fp8"), ("weight_only_mm", "hp")):
        if hasattr(ops, name):
            found[getattr(ops, name)] = found[getattr(ops, name).default] = flavour
    return found


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
    `small_m_gemm.check_group` requires of x, the weights, the scales and the biases."""
    parts = _parts(node, flavour)
    x, weight, scale = (value_of(parts.get(name)) for name in ("x", "weight", "weight_scale"))
    if x is None or weight is None or scale is None or x.dim() != 2 or weight.dim() != 2:
        return None
    if not all(type(size) is int for size in (*x.shape, *x.stride(), *weight.shape, *weight.stride())):
        return None  # dynamic shapes (a SymInt M): left alone
    x_scale = value_of(parts.get("x_scale")) if flavour == "fp8" else None
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
        for node in run[i + 1 : i + small_m_gemm.MAX_GROUP]:
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
    x_value, n_total = value_of(parts[0]["x"]), sum(value_of(w).shape[0] for w in weights)
    tiles = small_m_gemm.tiles_for(n_total, x_value.shape[1], flavour, small_m_gemm.sm_count(x_value.device))
    args = ([p["x"] for p in parts], [p["x_scale"] for p in parts] if flavour == "fp8" else [], weights,
            [p["weight_scale"] for p in parts], [p["bias"] for p in parts],
            parts[0].get("out_dtype", x_value.dtype), tiles)  # fmt: skip
    with graph.inserting_before(first):
        group = graph.call_function(torch.ops.compile_fp8.small_mm_group.default, args)
        group.meta["example_value"] = [value_of(member) for member in members]
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
