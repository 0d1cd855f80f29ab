"""compile_fp8: FP8 training for PyTorch in one line, `model = compile_fp8(model)`.

Data flow (one module per stage)::

    model -> api.compile_fp8 -> weight.Float8TrainingWeight (master weight, F.linear hook)
          -> autograd.Float8LinearFn (three GEMMs) -> scaling (amax -> scale -> float8 cast)
          -> gemm.scaled_mm (torch._scaled_mm, layouts) ; tensor.Float8Tensor (data + scale)

`config.py` holds the user's choices and the per-GEMM recipes. Inference
(`Float8Config(mode="inference")`): `inference.py` stores weights as Float8Tensors once,
`fp8_gemv.py` is the weight-only kernel for small M. See docs/design.md, docs/inference.md.
"""

from .api import compile_fp8, fp8_layers, plain_state_dict, precompute_float8_dynamic_scale_for_fsdp
from .calibrate import calibrate, refresh_weight_scales
from .config import Float8Config
from .tensor import Float8Tensor, register_safe_globals
from .weight import Float8TrainingWeight

register_safe_globals()  # so torch.load(weights_only=True) can rebuild a saved Float8Tensor

__all__ = [
    "compile_fp8",
    "calibrate",
    "fp8_layers",
    "plain_state_dict",
    "precompute_float8_dynamic_scale_for_fsdp",
    "refresh_weight_scales",
    "Float8Config",
    "Float8Tensor",
    "Float8TrainingWeight",
]
__version__ = "0.1.0"
