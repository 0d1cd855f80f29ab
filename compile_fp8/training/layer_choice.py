"""Which layers should be FP8? `Float8Config(layer_filter="auto")` answers from measurements.

An FP8 linear does its three GEMMs at up to ~1.9x the bf16 rate, but it also reads and writes
every operand once more to cast it (amax, scale, cast, the transposed copy for the weight
gradient). GEMM time grows as M * K * N, cast time as M * (K + N) + K * N, so the saving wins
only when K and N are both large: a narrow layer spends more on casting than it saves.

Where the line falls is a property of the GPU and the recipe, so it is measured, not derived:
`H200_SPEEDUP` holds, per weight shape (K = in_features, N = out_features), the time of one
compiled bf16 linear's forward + backward divided by ours, summed CUDA kernel time (torch
profiler: no launch or host time, as inside a model whose GPU queue stays full), at M = 16384
tokens, bf16 weights and inputs, on an H200 (`scripts/bench_linear.py --timer kernels`;
docs/benchmarks.md has the table). Tensorwise pays from min(K, N) = 2048; rowwise, whose
activations and gradients each need two amax passes and two casts, only from about 4096 x 8192.

`slow_layer_reason` looks a layer's shape up at the nearest measured shape (distance in
log2(K), log2(N): sizes are compared by ratio, so 3072 counts as nearer 4096 than 2048), and keeps
the layer in high precision when FP8 ran below `MIN_SPEEDUP` there. The ratios were measured at one M; both
the GEMM and the activation casts scale with M, so they move little with it, but a very small M
(a few hundred tokens per step) makes every layer launch-bound and FP8 pointless.
"""

from __future__ import annotations

import math
from typing import Optional

from ..layers import SkipKind, SkipReason

# (K, N): (tensorwise, rowwise) speed-up of FP8 over bf16, linear fwd+bwd kernel time, M = 16384.
H200_SPEEDUP: dict[tuple[int, int], tuple[float, float]] = {
    (512, 512): (0.52, 0.32),
    (512, 1024): (0.60, 0.41),
    (1024, 512): (0.63, 0.33),
    (512, 2048): (0.72, 0.51),
    (1024, 1024): (0.78, 0.48),
    (2048, 512): (0.70, 0.35),
    (512, 4096): (0.78, 0.59),
    (1024, 2048): (0.94, 0.63),
    (2048, 1024): (0.92, 0.53),
    (4096, 512): (0.78, 0.37),
    (512, 8192): (0.71, 0.63),
    (1024, 4096): (1.00, 0.75),
    (2048, 2048): (1.06, 0.70),
    (4096, 1024): (0.95, 0.55),
    (8192, 512): (0.72, 0.37),
    (1024, 8192): (0.96, 0.85),
    (2048, 4096): (1.18, 0.90),
    (4096, 2048): (1.20, 0.78),
    (8192, 1024): (0.97, 0.57),
    (2048, 5632): (1.27, 0.98),
    (5632, 2048): (1.28, 0.82),
    (2048, 6144): (1.20, 0.95),
    (2048, 8192): (1.11, 1.04),
    (4096, 4096): (1.21, 1.00),
    (8192, 2048): (1.17, 0.81),
    (4096, 8192): (1.45, 1.23),
    (8192, 4096): (1.46, 1.12),
    (8192, 8192): (1.56, 1.37),
    (4096, 14336): (1.58, 1.38),
    (14336, 4096): (1.53, 1.12),
}
MEASURED_ON = "an H200 (fwd+bwd kernel time, M=16384)"
# Below this FP8 is not worth it: the two runs behind the table differ by a few % on the same
# shape, and a layer that only breaks even still pays FP8's precision.
MIN_SPEEDUP = 1.02


def measured_speedup(k: int, n: int, recipe: str) -> tuple[float, tuple[int, int]]:
    """(FP8 speed-up over bf16, the measured (K, N) it comes from) for a [N, K] weight: the
    nearest measured shape in log2 space. rowwise_with_gw_hp uses the rowwise column (not
    measured on its own; its bf16 weight-gradient GEMM makes it no slower than rowwise)."""
    column = 0 if recipe == "tensorwise" else 1
    logk, logn = math.log2(k), math.log2(n)
    nearest = min(H200_SPEEDUP, key=lambda kn: (math.log2(kn[0]) - logk) ** 2 + (math.log2(kn[1]) - logn) ** 2)
    return H200_SPEEDUP[nearest][column], nearest


def slow_layer_reason(k: int, n: int, recipe: str) -> Optional[SkipReason]:
    """Why `layer_filter="auto"` keeps a Linear(k, n) in high precision, or None to convert it."""
    speedup, (mk, mn) = measured_speedup(k, n, recipe)
    if speedup >= MIN_SPEEDUP:
        return None
    where = "this shape" if (mk, mn) == (k, n) else f"the nearest measured shape K={mk}, N={mn}"
    return SkipReason(
        SkipKind.SLOW,
        f"layer_filter='auto': FP8 {recipe} ran {speedup:.2f}x bf16 (< {MIN_SPEEDUP}x) at {where} "
        f"on {MEASURED_ON}; in_features={k}, out_features={n}",
    )
