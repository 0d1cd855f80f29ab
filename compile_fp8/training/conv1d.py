"""transformers' `Conv1D` (GPT-2, GPT, ...): a linear layer with its weight stored transposed.

`Conv1D(nf, nx)` holds `weight` as [in, out] = [nx, nf] and computes `addmm(bias, x, weight)`,
i.e. `x @ weight + bias`: the same function as `nn.Linear(nx, nf)` with `linear.weight =
conv1d.weight.T`. GPT-2's every projection (`c_attn`, `c_proj`, `c_fc`) is one, so a converter
that sees only `nn.Linear` would leave all of GPT-2 in high precision.

`compile_fp8` converts a Conv1D like a Linear: its `weight` Parameter becomes a
`Float8TrainingWeight` around the same [in, out] master tensor (state_dict keys and shapes do not
change), and its `forward` becomes `conv1d_forward` (an instance attribute, as for static
scaling in `stateful_scaling.py`), which hands the FP8 autograd function the transposed view::

    output = input @ weight          # [M, K] @ [K, N] -> [M, N]   (Conv1D's weight is [K, N])
           = input @ weight_t.T      # weight_t = weight.t(): [N, K], the nn.Linear layout

so the three GEMMs, recipes and scales are exactly those of the equivalent nn.Linear (a
tensorwise scale does not depend on the layout; a rowwise one runs along K either way).
grad_weight comes out [N, K] and autograd transposes it back through the view onto the [K, N]
Parameter.

Dynamic scaling only: static and delayed scaling (`stateful_scaling.py`) are written for
nn.Linear, so a Conv1D stays in high precision under them (`layers.forward_skip_reason`), and
`fp8_layers` says so. transformers is never
imported here: a model can only hold a Conv1D if the user already imported transformers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .linear_fn import float8_linear


def use_fp8_forward(module: nn.Module) -> None:
    """Route this (converted) Conv1D's forward through the FP8 linear."""
    module.forward = functools.partial(conv1d_forward, module)


def conv1d_forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """Conv1D.forward in FP8: `input @ weight + bias` as the equivalent nn.Linear computes it."""
    weight = module.weight  # Float8TrainingWeight, [K, N]
    # .t() is a plain, autograd-tracked view [N, K] of the master weight (the training weight
    # unwraps every op but F.linear), so grad_weight flows back transposed onto the Parameter.
    return float8_linear(input, weight.t(), module.bias, weight._recipe, weight._emulate)
