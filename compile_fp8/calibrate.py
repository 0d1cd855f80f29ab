"""calibrate(): measure the amaxes that static scaling uses, in high precision.

    model = compile_fp8(model, Float8Config(scaling="static"))
    calibrate(model, batches, num_batches=8)        # eager forward passes, no FP8
    train(model)                                    # casts use the stored scales: no amax pass

Each static layer switches to a high-precision forward that records the running max of |input|
and |weight| (and, with `static_grads=True`, of |grad_output| through a backward of `loss_fn`)
into its `fp8_amax_*` buffers; then the layers switch back and are marked ready (also when a
batch raises: the flags always match the buffers). Re-running calibrate starts from zero again.
Inference layers (`Float8Config(mode="inference", scaling="static")`, `inference.py`) record max
|input| only (`fp8_amax_input`): their weight is already float8 with its own scale, and their
input scale (`fp8_scale_input`) is computed here, once, from the recorded amax.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from . import inference
from .api import unwrap_compiled
from .linear import CALIBRATING_ATTR, CONFIG_ATTR, READY_ATTR, buffer_names, refresh_ready, uses_scaled_forward

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
    layers = _static_layers(unwrap_compiled(model))
    configs = [getattr(m, CONFIG_ATTR, None) for _, m in layers]  # None: an inference layer
    needs_grads = any(c is not None and c.static_grads for c in configs)
    _check_calibrate_args(layers, num_batches, needs_grads, loss_fn)
    seen = 0
    with _calibrating(layers), torch.enable_grad() if needs_grads else torch.no_grad():
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            _calibration_step(unwrap_compiled(model), batch, loss_fn if needs_grads else None)
            seen += 1
            logger.info("compile_fp8: calibrate batch %d%s", seen, f"/{num_batches}" if num_batches else "")
    if seen == 0:
        raise ValueError("calibrate got no batches: pass an iterable with at least one batch")
    uncalibrated = [fqn for fqn, m in layers if not getattr(m, READY_ATTR)]  # set by _calibrating
    if uncalibrated:
        logger.warning(
            "compile_fp8: %d layer(s) saw no data (or only zeros) and stay dynamic: %s",
            len(uncalibrated),
            ", ".join(uncalibrated),
        )


def _static_layers(model: nn.Module, training_only: bool = False) -> list:
    """(fqn, layer) of every static-scaled layer: training ones, and inference ones unless
    `training_only`."""
    return [
        (fqn, m)
        for fqn, m in model.named_modules()
        if (uses_scaled_forward(m) and getattr(m, CONFIG_ATTR).scaling == "static")
        or (inference.is_static_layer(m) and not training_only)
    ]


def _amax_buffers(module: nn.Module) -> tuple[str, ...]:
    if inference.is_static_layer(module):
        return (inference.INPUT_AMAX,)
    return buffer_names(getattr(module, CONFIG_ATTR))


def _refresh_ready(module: nn.Module) -> bool:
    """Ready flag (and an inference layer's input scale) from the amax buffers just recorded."""
    return inference.refresh_ready(module) if inference.is_static_layer(module) else refresh_ready(module)


def _check_calibrate_args(layers, num_batches, needs_grads, loss_fn):
    if not layers:
        raise ValueError(
            "calibrate needs a model converted with compile_fp8(model, Float8Config(scaling='static'))"
            " (mode 'training' or 'inference')"
        )
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches={num_batches!r} must be None or an int >= 1")
    if needs_grads and loss_fn is None:
        raise ValueError(
            "Float8Config(static_grads=True) calibrates gradients too: pass "
            "loss_fn=lambda output, batch: ... so calibrate can run backward"
        )


@contextlib.contextmanager
def _calibrating(layers):
    for _, module in layers:
        for name in _amax_buffers(module):
            getattr(module, name).zero_()
        setattr(module, CALIBRATING_ATTR, True)
    try:
        yield
    finally:  # the amaxes were zeroed and (maybe partly) recorded: flags and scales follow them
        for _, module in layers:
            setattr(module, CALIBRATING_ATTR, False)
            _refresh_ready(module)


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
    layers = [m for _, m in _static_layers(unwrap_compiled(model), training_only=True)]  # not inference
    if not layers:
        return
    # All weights in one multi-tensor kernel (max |w| is the inf-norm; exact, NaN propagates):
    # one amax launch per layer cost 4.03 ms per step for the 80 linears of the 956M model on
    # the H200 (bench_train_step.py, ours-static), mostly launches: reading them takes ~0.5 ms.
    amaxes = torch._foreach_norm([m.weight.hp for m in layers], ord=float("inf"))
    torch._foreach_copy_([m.fp8_amax_weight for m in layers], amaxes)
