"""FSDP2 for the training loop (`--fsdp`): one process per GPU (or CPU gloo), started by torchrun.

    torchrun --nproc_per_node 2 scripts/train.py --preset tiny --fsdp --use_fp8 ...

What changes against a single-process run (`train.py` calls these):

* each process joins the process group torchrun describes (NCCL on CUDA, gloo on CPU) and uses
  `cuda:LOCAL_RANK` (or the CPU);
* the model is built and loaded whole, converted by `compile_fp8(..., compile=False)`, then
  `fully_shard` each Transformer block and the root (embedding, final norm, head), then
  compiled: FP8 weights all-gather in FP8 (tensorwise) or bf16 (rowwise), see
  `compile_fp8/training/fsdp.py`; after each optimizer step one all-reduce takes every FP8 weight's amax;
* `--batch-size` is per process: process r trains on batch `W * step + r` of the run's sampler,
  so W processes see W times the tokens per step, and the data position is the same number on
  every rank;
* the logged loss is the mean over the processes; rank 0 alone prints and writes metrics;
* checkpoints hold the full (unsharded) weights and optimizer state, gathered to every rank and
  written by rank 0, in the single-process format plus `"fsdp_world_size"`: the weights load
  anywhere; resuming needs the same number of processes (the optimizer state is keyed by name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool
    """Whether `init_from_torchrun` created the process group (then `close` destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_torchrun(device: str | None) -> Ranks:
    """Join the process group torchrun set up; ValueError (how to start it) when it did not."""
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"--fsdp runs one process per device under torchrun ({', '.join(missing)} "
                         "not set): torchrun --nproc_per_node N scripts/train.py --fsdp ...")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    where = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), where, owns_group)


def shard(model: nn.Module) -> nn.Module:
    """FSDP2: each block its own all-gather group, the rest (embedding, norm, head) the root's."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


class RankBatches:
    """Process `rank` of `world_size` draws batch `world_size * step + rank` of `sampler`."""

    def __init__(self, sampler, ranks: Ranks):
        self.sampler, self.ranks = sampler, ranks

    def next_batch(self):
        step = self.sampler.step
        batch = self.sampler.batch_at(self.ranks.world_size * step + self.ranks.rank)
        self.sampler.step = step + 1
        return batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the processes (SUM / W: gloo has no AVG)."""
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. clip_grad_norm_'s total norm of sharded grads)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, unsharded, on CPU, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def load_optimizer(model: nn.Module, optimizer, state: dict) -> None:
    """Load a `full_state` optimizer state into the sharded optimizer (each rank its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def barrier() -> None:
    dist.barrier()


def close(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()
