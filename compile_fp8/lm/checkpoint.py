"""Checkpoints: saved atomically, loaded with `torch.load(weights_only=True)`, checked on resume.

A checkpoint is one dict of tensors and plain Python values (so the safe unpickler of
`weights_only=True` loads it)::

    {"format": 1, "step": int, "preset": str, "model_config": {field: value},
     "fp8": "none" | recipe, "model": state_dict, "optimizer": state_dict,
     "data": BatchSampler.state_dict(), "fsdp_world_size": None | int}

An `--fsdp` run (`distributed.py`) stores the same full weights; its optimizer state is keyed by
parameter name (torch.distributed.checkpoint's full state dict) and `fsdp_world_size` says over
how many processes it ran.

`compile_fp8` keeps `state_dict()` keys and plain tensors, so a checkpoint of an FP8 run loads
into a bf16 model and the other way round: resuming with another `--fp8` is allowed (said in
the log). A different preset or model shape is refused before anything is loaded.

Writes go to `ckpt.pt.tmp`, then `os.replace` renames it over `ckpt.pt`: a crash mid-save leaves
the previous checkpoint whole.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .model import ModelConfig

CHECKPOINT_NAME = "ckpt.pt"
FORMAT = 1


def checkpoint_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINT_NAME


def save_checkpoint(path: Path, *, step: int, preset: str, model_config: ModelConfig, fp8: str,
                    model_state: dict, optimizer_state: dict, data_state: dict,
                    fsdp_world_size: int | None = None) -> None:
    """Write the checkpoint to `path` atomically (tmp file + os.replace)."""
    state = {
        "format": FORMAT,
        "step": step,
        "preset": preset,
        "model_config": dataclasses.asdict(model_config),
        "fp8": fp8,
        "model": model_state,
        "optimizer": optimizer_state,
        "data": dict(data_state),
        "fsdp_world_size": fsdp_world_size,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, *, preset: str, model_config: ModelConfig) -> dict:
    """Load `path` (weights_only=True) and refuse it if it is of another preset or shape."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from; run without --resume "
                                "to start a fresh run (or pass the --out folder of the run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a cut or foreign file: say which, keep the cause
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); "
                         "start a fresh run with another --out") from err
    check_compatible(state, path, preset=preset, model_config=model_config)
    return state


def check_compatible(state: dict, path: Path, *, preset: str, model_config: ModelConfig) -> None:
    """ValueError unless the checkpoint's preset and model shape are this run's."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a compile_fp8.lm checkpoint (format {FORMAT})")
    ours = dataclasses.asdict(model_config)
    theirs = state["model_config"]
    diffs = [f"{k}: checkpoint {theirs.get(k)!r}, this run {v!r}"
             for k, v in ours.items() if theirs.get(k) != v]
    if state["preset"] != preset or diffs:
        detail = "; ".join(diffs) if diffs else "same shape"
        raise ValueError(
            f"{path} was written by preset {state['preset']!r}, this run builds preset "
            f"{preset!r} ({detail}). Resume with --preset {state['preset']} (and the same "
            "--vocab-size), or start a fresh run in another --out folder.")
