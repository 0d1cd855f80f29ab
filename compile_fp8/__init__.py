"""compile_fp8: FP8 training for PyTorch in one line, `model = compile_fp8(model)`.

The package, in the order its modules build on each other (imports go one way, down this list)::

    config.py        what the user chooses (Float8Config) and the per-GEMM recipes
    scaling.py       amax -> scale -> saturated float8 cast (the numerics of every cast)
    gemm.py          torch._scaled_mm with the layouts it needs, or its emulation
    tensor.py        Float8Tensor (float8 data + scale), with its op table tensor_ops.py
    layers.py        which layers convert and why not; the one state object a layer carries
    kernels/         Triton kernels: training's casts, inference's small-M GEMM
    training/        the FP8 linear function, the training weight, scaling state, FSDP2
    inference/       frozen float8 weights, the inference forward, the decode graph passes
    calibrate.py     static scales from data (both modes)
    api.py           compile_fp8, fp8_layers, plain_state_dict

docs/design.md walks through the data flow; docs/api.md documents every public name.
"""

from .api import compile_fp8, fp8_layers, plain_state_dict
from .calibrate import calibrate, refresh_weight_scales
from .config import Float8Config
from .tensor import Float8Tensor, register_safe_globals
from .training.distributed import precompute_float8_dynamic_scale_for_fsdp
from .training.weight import Float8TrainingWeight

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
