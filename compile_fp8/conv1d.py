"""transformers' `Conv1D` (GPT-2, GPT, ...): a linear layer with its weight stored transposed.

`Conv1D(nf, nx)` holds `weight` as [in, out] = [nx, nf] and computes `addmm(bias, x, weight)`,
i.e. `x @ weight + bias`: the same function as `nn.Linear(nx, nf)` with `linear.weight =
conv1d.weight.T`. GPT-2's every projection (`c_attn`, `c_proj`, `c_fc`) is one, so a converter
that sees only `nn.Linear` would leave all of GPT-2 in high precision.

`compile_fp8` converts a Conv1D like a Linear: its `weight` Parameter becomes a
`Float8TrainingWeight` around the same [in, out] master tensor (state_dict keys and shapes do not
change), and its `forward` becomes `conv1d_forward` (an instance attribute, as for static
scaling in `linear.py`), which hands the FP8 autograd function the transposed view::

    output = input @ weight          # [M, K] @ [K, N] -> [M, N]   (Conv1D's weight is [K, N])
           = input @ weight_t.T      # weight_t = weight.t(): [N, K], the nn.Linear layout

so the three GEMMs, recipes and scales are exactly those of the equivalent nn.Linear (a
tensorwise scale does not depend on the layout; a rowwise one runs along K either way).
grad_weight comes out [N, K] and autograd transposes it back through the view onto the [K, N]
Parameter.

Dynamic scaling only: static and delayed scaling (`linear.py`) are written for nn.Linear, so a
Conv1D stays in high precision under them, and `fp8_layers` says so. transformers is never
imported here: a model can only hold a Conv1D if the user already imported transformers.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
from torch import nn

from .autograd import float8_linear


def conv1d_class() -> Optional[type]:
    """transformers' Conv1D class, if transformers is imported (else no model can hold one)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear_like(module: nn.Module) -> bool:
    """The layers compile_fp8 converts: nn.Linear (subclasses too) and transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.nx, module.nf


def conv1d_skip_reason(module: nn.Module, scaling: str) -> Optional[str]:
    """Why this Conv1D stays in high precision (None: it converts)."""
    if type(module).forward is not conv1d_class().forward:
        return f"skipped: {type(module).__name__} overrides Conv1D.forward"
    if scaling != "dynamic":
        return (
            f"skipped: scaling={scaling!r} is implemented for nn.Linear only; "
            "transformers Conv1D layers convert with scaling='dynamic'"
        )
    return None


def use_fp8_forward(module: nn.Module) -> None:
    """Route this (converted) Conv1D's forward through the FP8 linear."""
    module.forward = functools.partial(conv1d_forward, module)


def conv1d_forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """Conv1D.forward in FP8: `input @ weight + bias` as the equivalent nn.Linear computes it."""
    weight = module.weight  # Float8TrainingWeight, [K, N]
    # .t() is a plain, autograd-tracked view [N, K] of the master weight (the training weight
    # unwraps every op but F.linear), so grad_weight flows back transposed onto the Parameter.
    return float8_linear(input, weight.t(), module.bias, weight._recipe, weight._emulate)
