"""calibrate(): measure the amaxes that static scaling uses (and that seed delayed scaling's
histories), in high precision.

    model = compile_fp8(model, Float8Config(scaling="static"))
    calibrate(model, batches, num_batches=8)        # eager forward passes, no FP8
    train(model)                                    # casts use the stored scales: no amax pass

A delayed layer (`scaling="delayed"`) records into the newest entry of its histories, input,
weight and grad_output (through a backward of `loss_fn`): its first training step then already
takes every scale from the history (see `training/stateful_scaling.py`).

Each static layer switches to a high-precision forward that records the running max of |input|
and |weight| (and, with `static_grads=True`, of |grad_output| through a backward of `loss_fn`)
into its `fp8_amax_*` buffers; then the layers switch back and are marked ready (also when a
batch raises: the flags always match the buffers). Re-running calibrate starts from zero again.
Inference layers (`Float8Config(mode="inference", scaling="static")`) record max |input| only:
their weight is already float8 with its own scale, and their `input_scale` is set from the
recorded amax when calibration ends. Each layer's state object says what it records
(`layers.ConvertedLayer`), so this module needs no knowledge of either mode.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .layers import converted_layers, unwrap_compiled
from .training.state import TrainingState

logger = logging.getLogger("compile_fp8")


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    num_batches: Optional[int] = None,
    loss_fn: Optional[Callable] = None,
) -> None:
    """Record per-layer static scales from `batches` (each passed as `model(batch)`,
    `model(*batch)` for a tuple/list, `model(**batch)` for a dict).

    `loss_fn(output, batch) -> loss` is needed only with `Float8Config(static_grads=True)`.
    """
    model = unwrap_compiled(model)
    layers = [(fqn, m, state) for fqn, m, state in converted_layers(model) if state.takes_calibration]
    needs_grads = any(state.calibrates_grads for _, _, state in layers)
    _check_calibrate_args(layers, num_batches, needs_grads, loss_fn)
    seen = 0
    # eager, also where compile_fp8 compiled the model in place: the recording forward is a
    # different graph, and compiling it would cost a compile and a recompile for a few batches
    eager = torch.compiler.set_stance("force_eager")
    with _calibrating(layers), eager, torch.enable_grad() if needs_grads else torch.no_grad():
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            _calibration_step(model, batch, loss_fn if needs_grads else None)
            seen += 1
            logger.info("compile_fp8: calibrate batch %d%s", seen, f"/{num_batches}" if num_batches else "")
    if seen == 0:
        raise ValueError("calibrate got no batches: pass an iterable with at least one batch")
    uncalibrated = [fqn for fqn, _, state in layers if not state.ready]  # set by _calibrating
    if uncalibrated:
        logger.warning(
            "compile_fp8: %d layer(s) saw no data (or only zeros) and stay dynamic: %s",
            len(uncalibrated),
            ", ".join(uncalibrated),
        )


def _check_calibrate_args(layers, num_batches, needs_grads, loss_fn):
    if not layers:
        raise ValueError(
            "calibrate needs a model converted with compile_fp8(model, Float8Config(scaling='static'))"
            " (mode 'training' or 'inference') or Float8Config(scaling='delayed') (training)"
        )
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches={num_batches!r} must be None or an int >= 1")
    if needs_grads and loss_fn is None:
        raise ValueError(
            "Float8Config(static_grads=True) and scaling='delayed' calibrate gradients too: pass "
            "loss_fn=lambda output, batch: ... so calibrate can run backward"
        )


@contextlib.contextmanager
def _calibrating(layers):
    for _, module, state in layers:
        state.begin_calibration(module)
    try:
        yield
    finally:  # the amaxes were zeroed and (maybe partly) recorded: flags and scales follow them
        for _, module, state in layers:
            state.end_calibration(module)


def _calibration_step(model, batch, loss_fn):
    if isinstance(batch, dict):
        output = model(**batch)
    elif isinstance(batch, (tuple, list)):
        output = model(*batch)
    else:
        output = model(batch)
    if loss_fn is not None:
        loss_fn(output, batch).backward()
        model.zero_grad(set_to_none=True)


@torch.no_grad()
def refresh_weight_scales(model: nn.Module) -> None:
    """Static scaling: re-measure each weight's amax, e.g. once per optimizer step::

        opt.register_step_post_hook(lambda *_: refresh_weight_scales(model))

    A weight changes only when the optimizer steps, so this keeps its static scale exact for one
    read of each weight per step, outside the compiled step (the compiled graph reads the
    buffer: no recompile). Without it the calibrated weight scale stays fixed, and weight values
    that grow past `amax * amax_margin` saturate.
    """
    model = unwrap_compiled(model)
    layers = [
        m for _, m, state in converted_layers(model, TrainingState)
        if state.is_static and state.config.static_weights is True
    ]  # static_weights=False / "previous": the step measures its weights itself
    if not layers:
        return
    # All weights in one multi-tensor kernel (max |w| is the inf-norm; exact, NaN propagates):
    # one amax launch per layer would cost more in launches than in reading the weights.
    amaxes = torch._foreach_norm([m.weight.hp for m in layers], ord=float("inf"))
    torch._foreach_copy_([m.fp8_amax_weight for m in layers], amaxes)
