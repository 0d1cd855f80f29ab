"""The FP8 state of a layer converted for inference (layers.py, [Note] A layer's FP8 state).

A converted layer holds its weight as a plain float8 e4m3 Parameter (frozen) and these float32
buffers, the layout FP8 serving checkpoints use (scales are dequantization scales, inference/
scales.py [Note] Inference scales):

    weight_scale        [] (tensorwise) or [out_features, 1] (rowwise)    saved
    input_scale         []                       scaling="static" only    saved (0: uncalibrated)
    weight_quant_scale  1 / weight_scale, as the kernels take it          derived, not saved
    input_quant_scale   1 / input_scale                                    derived, not saved

The derived buffers are computed once whenever a saved scale changes (conversion,
`load_state_dict`, `calibrate`: `InferenceState.refresh`), so a forward runs no scale arithmetic
(under torch.compile that would be a small kernel per layer per call), and they move with
`.to()` like any buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import E4M3
from ..layers import ConvertedLayer, replaced_weight_text
from .scales import amax_to_inverse_scale, scale_of_inverse

WEIGHT_SCALE, INPUT_SCALE = "weight_scale", "input_scale"
DERIVED = {WEIGHT_SCALE: "weight_quant_scale", INPUT_SCALE: "input_quant_scale"}
INPUT_AMAX = "input_amax"  # calibrate's running max |input| (a buffer only while calibrating)


@dataclass(frozen=True)
class InferenceSpec:
    """What a converted layer runs: small, hashable, a constant to torch.compile."""

    granularity: str  # "tensorwise" or "rowwise"
    scaling: str  # "dynamic" or "static"
    weight_only_max_m: int
    emulate: bool
    amax_margin: float = 1.0
    small_m_activation: str = "auto"


@dataclass(kw_only=True)
class InferenceState(ConvertedLayer):
    spec: InferenceSpec
    conv1d: bool = False  # weight stored [in, out] (transformers Conv1D), scales still [out, 1]

    @property
    def is_static(self) -> bool:
        return self.spec.scaling == "static"

    def saved_scales(self) -> tuple[str, ...]:
        return (WEIGHT_SCALE, INPUT_SCALE) if self.is_static else (WEIGHT_SCALE,)

    def amax_buffer_names(self) -> tuple[str, ...]:
        return (INPUT_AMAX,) if self.is_static else ()

    def begin_calibration(self, module: nn.Module) -> None:
        """Record max |input| from zero (the weight is already float8 with its own scale)."""
        module.register_buffer(INPUT_AMAX, torch.zeros_like(getattr(module, INPUT_SCALE)), persistent=False)
        self.calibrating = True

    def end_calibration(self, module: nn.Module) -> bool:
        """input_scale := the dequantization scale of the recorded amax (with `amax_margin`);
        0 where no data was seen (the layer stays dynamic)."""
        self.calibrating = False
        recorded = module._buffers.pop(INPUT_AMAX)
        margin = self.spec.amax_margin
        inv_scale = amax_to_inverse_scale(recorded * margin if margin != 1.0 else recorded)
        with torch.no_grad():
            getattr(module, INPUT_SCALE).copy_(torch.where(recorded > 0, inv_scale, 0.0))
        return self.refresh(module)

    @torch.no_grad()
    def refresh(self, module: nn.Module) -> bool:
        """The derived quantization scales from the saved ones; ready once input_scale is set."""
        for name in self.saved_scales():
            set_buffer(module, DERIVED[name], scale_of_inverse(getattr(module, name)))
        input_scale = getattr(module, INPUT_SCALE, None)
        self.ready = self.is_static and not input_scale.is_meta and bool(input_scale > 0)
        return self.ready

    def describe(self, module: nn.Module, gather_dtypes: dict) -> str:
        if module.weight.dtype != E4M3:
            return replaced_weight_text()
        scaling = self.spec.scaling
        if self.is_static and not self.ready:
            scaling += " (uncalibrated: dynamic until calibrate())"
        path = " (emulated)" if self.spec.emulate else ""
        return f"fp8 {self.spec.granularity} inference {scaling}{path}"


def set_buffer(module: nn.Module, name: str, value: torch.Tensor, persistent: bool = False) -> None:
    """`name` := value: in place where the buffer exists with the same device, dtype and shape
    (compiled graphs and CUDA graphs that captured it then read the new value), else a new
    buffer (e.g. after `load_state_dict(assign=True)` into a model built on meta)."""
    current = module._buffers.get(name)
    same = current is not None and (current.device, current.dtype, current.shape) == (
        value.device, value.dtype, value.shape,
    )  # fmt: skip
    if same and not current.is_meta:
        current.copy_(value)
    else:
        module.register_buffer(name, value, persistent=persistent)
