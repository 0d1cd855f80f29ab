"""The decode graph passes, installed as inductor's pre-grad custom pass.

A decode step (M = 16 tokens) runs every linear as one small kernel that streams its weight from
HBM; each launch pays a fixed cost, so two passes cut launches without changing a bit:
`group_linears.py` (sibling linears in one launch) and `cast_in_kernel.py` (the cast after
attention inside the GEMM). They run on the graph dynamo captured, where each converted small-M
linear is one call of `compile_fp8::fp8_small_mm` or `compile_fp8::weight_only_mm`, and touch
nothing else, so installing them process-wide is safe.
"""

from __future__ import annotations

import hashlib
import pathlib

from torch import fx

from ..kernels import small_m_gemm, small_m_kernels
from . import cast_in_kernel, group_linears

try:  # torch >= 2.6: a pass with a uuid keeps inductor's caches on
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover
    CustomGraphPass = object


class SmallMPasses(CustomGraphPass):
    """`cast_in_kernel`, then `group_small_m_linears`, as inductor's pre-grad custom pass; its
    uuid (for inductor's caches) hashes the passes' and the kernels' sources."""

    def __call__(self, graph: fx.Graph) -> None:
        cast_in_kernel.cast_in_kernel(graph)
        group_linears.group_small_m_linears(graph)

    def uuid(self) -> str:
        modules = (cast_in_kernel, group_linears, small_m_gemm, small_m_kernels)
        sources = b"".join(pathlib.Path(m.__file__).read_bytes() for m in modules)
        return hashlib.sha256(sources).hexdigest()


def install() -> bool:
    """Make torch.compile run the passes (inductor's `pre_grad_custom_pass`; process-wide, and they
    only touch compile_fp8's ops). False, leaving things as they are, where another pass is set."""
    import torch._inductor.config as inductor_config

    current = inductor_config.pre_grad_custom_pass
    if isinstance(current, SmallMPasses):
        return True
    if current is not None:
        return False
    inductor_config.pre_grad_custom_pass = SmallMPasses()
    return True
