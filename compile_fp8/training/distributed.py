"""FSDP2 from the user's side: one all-reduce for every weight's amax, and what FSDP gathers in.

`training/fsdp.py` has the math of the FP8 all-gather; this module finds the sharded FP8 weights
of a model (a DTensor whose local shard is a `Float8TrainingWeight`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import unwrap_compiled
from .fsdp import all_reduce_max, gather_amaxes, gathers_fp8, local_amax
from .weight import training_weight


def sharded_weights(model: nn.Module) -> list:
    """(FSDP's 1-D shard mesh, local training weight) of every FSDP2-sharded FP8 weight."""
    found = []
    for param in model.parameters():
        weight = training_weight(param)
        if weight is not None and weight is not param:
            mesh = param.device_mesh
            found.append((mesh if mesh.ndim == 1 else mesh[mesh.mesh_dim_names[-1]], weight))
    return found


@torch.no_grad()
def precompute_float8_dynamic_scale_for_fsdp(model: nn.Module) -> None:
    """FSDP2: every FP8-gathered weight's amax in one all-reduce, for the next forward.

    Call it right after `opt.step()` (as torchao's function of the same name). Without it each
    weight all-reduces its own amax when it is gathered; the scales are the same either way.
    """
    model = unwrap_compiled(model)
    weights = [w for w in sharded_weights(model) if gathers_fp8(w[1]._recipe)]
    by_mesh: dict = {}  # one collective per mesh (FSDP applied to every module with one mesh: one)
    for mesh, weight in weights:
        by_mesh.setdefault(mesh, []).append(weight)
    for mesh, group in by_mesh.items():
        amaxes = all_reduce_max(torch.stack([local_amax(w._hp) for w in group]), mesh)
        for weight, amax in zip(group, amaxes):
            gather_amaxes(weight).next = amax


def fsdp_param_dtypes(model: nn.Module) -> dict:
    """id(sharded parameter) -> FSDP's all-gather dtype (mp_policy.param_dtype), where set.

    FSDP2 has no public getter for its mixed-precision policy: this reads its module state and
    returns {} if that changes (fp8_layers then names the master weight's dtype).
    """
    dtypes = {}
    for module in model.modules():
        try:
            group = module._get_fsdp_state()._fsdp_param_group
            for fsdp_param in group.fsdp_params if group is not None else ():
                dtypes[id(fsdp_param.sharded_param)] = group.mp_policy.param_dtype
        except AttributeError:
            continue
    return dtypes
