"""Weight-only FP8 linear for small M (decode): read float8 weights, multiply in high precision.

A decode step pushes a handful of tokens (M = batch x 1) through every linear layer::

    output = input @ weight.T        # [M, K] @ [K, N] -> [M, N]

With M = 16 the GEMM does 2 * 16 FLOPs per weight element read: it is bound by reading the
weight, not by arithmetic. Storing the weight in float8 halves those bytes, but `_scaled_mm`
also needs a float8 *activation*: an amax reduction and a cast per layer, plus a GEMM kernel
tuned for large tiles. At M = 16 that costs more than the bytes it saves (torchao's float8
inference decodes ~3x slower than bf16 on an H200; docs/benchmarks.md).

The weight-only path keeps the activation in high precision and dequantizes the weight inside
the GEMM, in registers::

    out[m, n] = sum_k x[m, k] * w_fp8[n, k]  /  w_scale[n]  +  bias[n]    # w_scale: [] or [N, 1]

Every float8 e4m3 value is exactly a bf16 (and fp16) value, so `w_fp8.to(x.dtype)` is exact and
the products run on the tensor cores (`tl.dot`) with a float32 accumulator; the scale divides the
accumulator once per output (it is constant along the contracted K), and the bias is added to
the float32 accumulator before the one rounding to x's dtype. One kernel per layer, no
activation cast, half the bytes of a bf16 GEMM: the numerics are those of `x @ dequant(w).T`
(no activation quantization at all, so it is *more* accurate than the `_scaled_mm` path).

Work split: a program owns BLOCK_N output columns (weight rows) for all M rows (BLOCK_M, M <=
64 in one block, so each weight byte is read once) and walks K in BLOCK_K steps; the weight tile
[BLOCK_N, BLOCK_K] is contiguous along K (row-major [N, K]), so loads are coalesced. SPLIT_K > 1
cuts K into interleaved slices run by separate programs (more programs for small N); each writes
its float32 partial sums to a [SPLIT_K, M, N] workspace and the epilogue (sum, scales, bias,
rounding) runs in torch: under torch.compile inductor unrolls that short sum into the kernel
that consumes the output (the residual add, the norm), so split K costs no extra kernel there,
needs no zero-filled buffer, and sums in a fixed order (bit-deterministic run to run).
SWAP_AB computes out.T = w @ x.T instead: the same products and sums, with the weight tile as the
MMA's first operand, so a program can own 64-128 weight rows against M = 16 tokens (the
small-M trick of GEMM libraries); `config_for` chooses between the two.

The float8-x flavour (`fp8_small_mm`) takes x already cast to e4m3 by the layer (the cast of
the `_scaled_mm` path, which inductor fuses into the producer) and multiplies float8 by float8,
with no dequantization in the loop.

Which flavour a layer runs is `Float8Config.small_m_activation` (the inference layer decides,
`inference/linear.py`); the tiles below won sweeps on an H200 at M = 16 with the weights read
from HBM. docs/benchmarks.md has the measurements behind every choice.

Two more entry points serve the decode graph passes (`inference/passes.py`): the float8-x op also takes x in
bf16/fp16 and casts it in the kernel's prologue (`saturated_cast`'s bits; where x comes from
attention, whose cast would otherwise be a kernel of its own), and `compile_fp8::small_mm_group`
runs 2-3 linears of one K in one launch (`_grouped_kernel`: each program computes one member's
tile exactly as `_weight_only_kernel` would, so grouping changes no bit).

The ops are `torch.library.triton_op`s (as in `cast.py`): eager calls launch the
kernel, torch.compile (fullgraph, CUDA graphs) sees the kernel itself. `weight_only_linear` uses
it on CUDA sm89+ with triton importable and falls back to the same math in torch elsewhere
(CPU, CI without triton). The kernel runs on CPU under Triton's interpreter (TRITON_INTERPRET=1)
for the tests.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..scaling import saturated_cast
from .triton_support import interpreting, triton, triton_available

if triton is not None:
    from .small_m_kernels import _grouped_kernel, _weight_only_kernel

KERNEL_X_DTYPES = (torch.bfloat16, torch.float16)  # float32 x would run tl.dot in tf32: torch
# Weight-only flavour: 32 output columns a program won at every shape of the sweep; BLOCK_K
# 128-512 came within 5%.
WEIGHT_ONLY_CONFIG = {"block_n": 32, "block_k": 256, "split_k": 1, "num_warps": 4, "num_stages": 3}
# Both operands float8 (`fp8_small_mm`): no dequantization, float8 MMAs with the weight tile as
# the tall operand (swap_ab); 64 rows x 512 K a program won or came within 2% at every shape.
FP8_X_CONFIG = {"block_n": 64, "block_k": 512, "split_k": 1, "num_warps": 4, "num_stages": 4, "swap_ab": True}
# Where a weight has so few rows that fewer than half the SMs get a program (N = 2048 at 64 rows
# a program: 32 programs on 132 SMs), K is cut into slices until ~all SMs work (`split_for_sms`).
# Only there: each slice's partial sums cost their consumer (the norm or SwiGLU kernel that sums
# them, or a kernel of its own), which outweighs the gain where the SMs are busy anyway.
SPLIT_BELOW_SM_FRACTION, SPLIT_TO_SM_FRACTION, MAX_SPLIT_K = 0.5, 0.9, 8
# Where 64-row programs would be more than one per SM (a grouped gate + up: N = 11264, 176
# programs, one resident per SM at ~160 KiB of shared memory), 128 rows a program: one wave.
WIDE_BLOCK_N = 128
# Weight-only flavour: SPLIT_K_LONG slices where K >= LONG_K, and where fewer than
# SPLIT_BELOW_SM_FRACTION of the SMs would get a program (N = 2048 at 32 rows: 64 programs on 132
# SMs), for the same trade-off as above.
LONG_K, SPLIT_K_LONG = 4096, 4


TILE_KEYS = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "swap_ab")


def tiles_for(n: int, k: int, flavour: str = "hp", sms: Optional[int] = None) -> list[int]:
    """`config_for` as the ops' `tiles` argument (ints in TILE_KEYS order). Passed by the layer,
    the tiles are constants of the traced graph, so torch.compile's caches key on them: a tile
    config read inside the op would not be (AOTAutograd's cache key sees only the op's name and
    arguments)."""
    config = config_for(n, k, flavour, sms)
    return [int(config.get(key, False)) for key in TILE_KEYS]


def split_for_sms(n: int, k: int, config: dict, sms: int) -> int:
    """K slices for a weight [N, K] on a GPU of `sms` SMs: 1 unless fewer than
    SPLIT_BELOW_SM_FRACTION of the SMs get a program (one per `block_n` rows); then doubled until
    the programs cover SPLIT_TO_SM_FRACTION of them, at most MAX_SPLIT_K, each slice >= 1 K block."""
    if not _few_programs(n, config, sms):
        return 1
    programs, split = _programs(n, config), 1
    k_blocks = -(-k // config["block_k"])
    while programs * split < SPLIT_TO_SM_FRACTION * sms and split * 2 <= min(MAX_SPLIT_K, k_blocks):
        split *= 2
    return split


def _few_programs(n: int, config: dict, sms: Optional[int]) -> bool:
    """Would fewer than SPLIT_BELOW_SM_FRACTION of `sms` SMs get a program (one per `block_n`
    rows of a weight [N, K])? False where the SM count is unknown."""
    return bool(sms) and _programs(n, config) < SPLIT_BELOW_SM_FRACTION * sms


def _programs(n: int, config: dict) -> int:
    """Programs along N for a weight of N rows: one per `block_n` rows."""
    return -(-n // config["block_n"])


def _tile_config(tiles: Optional[list[int]], n: int, k: int, flavour: str) -> dict:
    """The launch config of `tiles`; None (an eager call without them): `config_for`."""
    if tiles is None:
        return config_for(n, k, flavour)
    config = dict(zip(TILE_KEYS, tiles))
    return {**config, "swap_ab": bool(config["swap_ab"])}


def config_for(n: int, k: int, flavour: str = "hp", sms: Optional[int] = None) -> dict:
    """The tile config the kernel uses for a weight of shape [N, K] and an x flavour
    ("hp": weight-only, "fp8": float8 x) on a GPU of `sms` SMs (None: unknown, no K slices for
    the float8-x flavour)."""
    if flavour == "fp8":
        if not sms:
            return FP8_X_CONFIG
        if _programs(n, FP8_X_CONFIG) > sms:  # more than one wave of programs: wider ones
            return {**FP8_X_CONFIG, "block_n": WIDE_BLOCK_N}
        return {**FP8_X_CONFIG, "split_k": split_for_sms(n, k, FP8_X_CONFIG, sms)}
    slices = k >= LONG_K or _few_programs(n, WEIGHT_ONLY_CONFIG, sms)
    return {**WEIGHT_ONLY_CONFIG, "split_k": SPLIT_K_LONG} if slices else WEIGHT_ONLY_CONFIG


def sm_count(device: torch.device) -> Optional[int]:
    """The GPU's SM count, None off CUDA (the interpreter). Dynamo folds `get_device_properties`
    to a constant of the graph."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


MAX_BLOCK_M = 64  # M above this runs in several M blocks (each re-reads the weight)


def weight_only_linear(
    x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ (weight_fp8 / weight_scale).T + bias` in x's dtype: [M, K] @ [K, N] -> [M, N].

    `weight_fp8` is float8 [N, K]; `weight_scale` the float32 hp -> fp8 scale, [] (tensorwise)
    or [N, 1] (rowwise); `bias` [N] or None. Runs the Triton kernel where it can (see module
    docstring).
    """
    if triton_available(x.device) and x.dtype in KERNEL_X_DTYPES and x.numel() > 0:
        return torch.ops.compile_fp8.weight_only_mm(x, weight_fp8, weight_scale, bias, tiles_for(*weight_fp8.shape))
    return weight_only_reference(x, weight_fp8, weight_scale, bias)


def fp8_small_m_linear(x_fp8, x_scale, weight_fp8, weight_scale, bias, out_dtype) -> torch.Tensor:
    """`(x_fp8 / x_scale) @ (weight_fp8 / weight_scale).T + bias` in `out_dtype`, both operands
    float8 (x's scale [] or [M, 1]): the small-M kernel with float8 MMAs, or its torch math.
    `x_fp8` may also be bf16/fp16 x itself: the kernel then casts it in its prologue, as
    `saturated_cast(x, x_scale)` would (the same bits). the cast-in-kernel pass passes x where it comes from
    a kernel inductor cannot fuse the cast into (attention's output): one kernel less per layer."""
    if triton_available(x_fp8.device) and x_fp8.numel() > 0:
        tiles = tiles_for(*weight_fp8.shape, "fp8", sm_count(x_fp8.device))
        return torch.ops.compile_fp8.fp8_small_mm(x_fp8, x_scale, weight_fp8, weight_scale, bias, out_dtype, tiles)
    return fp8_small_m_reference(x_fp8, x_scale, weight_fp8, weight_scale, bias, out_dtype)


def fp8_small_m_reference(x_fp8, x_scale, weight_fp8, weight_scale, bias, out_dtype):
    """The float8-x kernel's math in torch (`weight_only_reference` with x's scale); x in
    bf16/fp16 (see `fp8_small_m_linear`) is first cast as the kernel's prologue casts it."""
    if x_fp8.dtype in KERNEL_X_DTYPES:
        x_fp8 = saturated_cast(x_fp8, x_scale, torch.float8_e4m3fn)
    return weight_only_reference(x_fp8, weight_fp8, weight_scale, bias, x_scale=x_scale, out_dtype=out_dtype)


MAX_GROUP = 3  # linears one grouped launch runs (q, k, v)


def check_group(xs, x_scales, ws, w_scales, biases) -> None:
    """What one grouped launch needs of its 2-3 members (the grouping pass groups only such linears):
    one K, x's of one shape and strides, weights of one stride, the same scale granularities,
    all biased or none. A ValueError names the first difference."""
    n_members = len(ws)
    if not 2 <= n_members <= MAX_GROUP or not len(xs) == len(w_scales) == len(biases) == n_members:
        raise ValueError(f"a group runs 2-{MAX_GROUP} linears with one x, scale and bias each; got {len(xs)} x, "
                         f"{n_members} weights, {len(w_scales)} scales, {len(biases)} biases")  # fmt: skip
    if x_scales is not None and len(x_scales) != n_members:
        raise ValueError(f"float8 x: one x scale per member, got {len(x_scales)} for {n_members}")
    for x, x_scale in zip(xs, x_scales or [None] * n_members):
        check_x(x, x_scale)
    checks = {
        "x shape and strides": [(tuple(x.shape), x.stride(), x.dtype) for x in xs],
        "weight K and strides": [(w.shape[1], w.stride(), w.dtype) for w in ws],
        "weight scale granularity": [s.numel() == 1 for s in w_scales],
        "x scale granularity": [s.numel() == 1 for s in x_scales or ()],
        "bias presence": [b is None for b in biases],
    }
    for what, values in checks.items():
        if len(set(values)) > 1:
            raise ValueError(f"the members of a small-M group differ in {what}: {values}")


def check_x(x: torch.Tensor, x_scale: Optional[torch.Tensor]) -> None:
    """With an x scale the kernel takes float8 e4m3 x, or bf16/fp16 x that it casts itself."""
    if x_scale is not None and x.dtype not in (torch.float8_e4m3fn, *KERNEL_X_DTYPES):
        raise ValueError(f"float8-x small-M kernel: x must be float8_e4m3fn, bfloat16 or float16, got {x.dtype}")


def small_m_group_reference(xs, x_scales, ws, w_scales, biases, out_dtype) -> list[torch.Tensor]:
    """The grouped op's (`compile_fp8::small_mm_group`, which the grouping pass puts in compiled graphs)
    math in torch: each member's `weight_only_reference` / `fp8_small_m_reference`."""
    check_group(xs, x_scales, ws, w_scales, biases)
    if x_scales is None:
        return [weight_only_reference(*args, out_dtype=out_dtype) for args in zip(xs, ws, w_scales, biases)]
    members = zip(xs, x_scales, ws, w_scales, biases)
    return [fp8_small_m_reference(x, x_scale, w, w_scale, b, out_dtype) for x, x_scale, w, w_scale, b in members]


def weight_only_reference(x, weight_fp8, weight_scale, bias=None, x_scale=None, out_dtype=None):
    """The kernel's math in torch: float32 products and sums (exact for float8 x too), one divide
    by the weight's scale, then by x's scale if x is float8, the bias in float32, one rounding to
    `out_dtype` (default x's dtype), so eager and inductor agree bit for bit."""
    # [M, K] @ [K, N] -> [M, N]
    out = torch.mm(x.to(torch.float32), weight_fp8.to(torch.float32).t())
    return _epilogue(out, weight_scale, bias, x_scale, x.dtype if out_dtype is None else out_dtype)


def _epilogue(acc, weight_scale, bias, x_scale, out_dtype):
    """The kernel's epilogue on float32 sums `acc` [M, N]: divide by the weight's scale (the
    [N, 1] scale becomes [1, N], one per output column), by x's ([] or [M, 1], one per row of
    x), add the bias in float32, round once to `out_dtype`."""
    out = acc / weight_scale.reshape(1, -1)
    if x_scale is not None:
        out = out / x_scale.reshape(-1, 1)
    return (out if bias is None else out + bias.to(torch.float32)).to(out_dtype)


SHARED_MEMORY_BUDGET = 192 * 1024  # bytes; an H100/H200 has 227 KiB per block


def _block_sizes(m: int, k: int, config: dict) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K): M rounded up to a power of two (>= 16, tl.dot's minimum), K capped
    to K and halved until the pipeline's buffers fit in shared memory. Tiles are tuned at M = 16;
    at M = 64 the same BLOCK_K can need more than the GPU has (64 x 64 x 512 in 3 stages: 256
    KiB): (stages - 1) buffers of x's and the dequantized weight's tiles."""
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(m)))
    block_k = min(config["block_k"], max(16, triton.next_power_of_2(k)))
    buffers = max(1, config.get("num_stages", 3) - 1)
    while block_k > 16 and buffers * block_k * 2 * (block_m + config.get("block_n", 32)) > SHARED_MEMORY_BUDGET:
        block_k //= 2
    return block_m, block_k


def _launch_blocks(m: int, k: int, config: dict) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, SPLIT_K) of a launch: `_block_sizes`, and no more K slices than K blocks."""
    block_m, block_k = _block_sizes(m, k, config)
    return block_m, block_k, max(1, min(config["split_k"], -(-k // block_k)))


if triton is not None:

    def _launch_weight_only(
        x, weight_fp8, weight_scale, bias, block_n, block_k, split_k, num_warps, num_stages, swap_ab=False,
        x_scale=None, out_dtype=None, reduce=True,
    ):  # fmt: skip
        """Launch the kernel; with `x_scale` (float8 x and its scale, [] or [M, 1]) both operands
        are float8 and `out_dtype` is the output's dtype. `reduce=False` (the tile sweep, which
        times the kernel alone) returns split K's float32 partial sums [SPLIT_K, M, N] as they are."""
        check_x(x, x_scale)
        out_dtype = x.dtype if out_dtype is None else out_dtype
        m, k = x.shape
        n = weight_fp8.shape[0]
        block_m, block_k, split_k = _launch_blocks(m, k, dict(block_k=block_k, block_n=block_n, num_stages=num_stages,
                                                              split_k=split_k))  # fmt: skip
        k_tiles = triton.cdiv(triton.cdiv(k, block_k), split_k)
        if split_k == 1:
            out = torch.empty((m, n), dtype=out_dtype, device=x.device)
        else:  # every element written by one program per slice: no zero fill
            out = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
        launch = {} if interpreting() else {"num_warps": num_warps, "num_stages": num_stages}
        torch.library.wrap_triton(_weight_only_kernel)[grid](
            x, weight_fp8, weight_scale, weight_scale if x_scale is None else x_scale,
            weight_scale if bias is None else bias, out, m, n, k,
            x.stride(0), x.stride(1), weight_fp8.stride(0), weight_fp8.stride(1),
            out.stride(-2), out.stride(-1), out.stride(0) if split_k > 1 else 0,
            K_TILES=k_tiles, SPLIT_K=split_k, ROWWISE=weight_scale.numel() != 1, HAS_BIAS=bias is not None,
            FP32_DOT=interpreting(), SWAP_AB=swap_ab,
            X_FP8=x_scale is not None, X_ROWWISE=x_scale is not None and x_scale.numel() != 1,
            X_CAST=x_scale is not None and x.dtype in KERNEL_X_DTYPES,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch,
        )  # fmt: skip
        if split_k == 1 or not reduce:
            return out
        return _epilogue(out.sum(0), weight_scale, bias, x_scale, out_dtype)

    @torch.library.triton_op("compile_fp8::weight_only_mm", mutates_args=())
    def _weight_only_op(
        x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
        tiles: Optional[list[int]] = None,
    ) -> torch.Tensor:  # fmt: skip
        config = _tile_config(tiles, *weight_fp8.shape, "hp")
        return _launch_weight_only(x, weight_fp8, weight_scale, bias, **config)

    @_weight_only_op.register_fake
    def _(x, weight_fp8, weight_scale, bias, tiles=None):
        return x.new_empty((x.shape[0], weight_fp8.shape[0]))

    @torch.library.triton_op("compile_fp8::fp8_small_mm", mutates_args=())
    def _fp8_small_op(
        x_fp8: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
        bias: Optional[torch.Tensor], out_dtype: torch.dtype, tiles: Optional[list[int]] = None,
    ) -> torch.Tensor:  # fmt: skip
        config = _tile_config(tiles, *weight_fp8.shape, "fp8")
        return _launch_weight_only(x_fp8, weight_fp8, weight_scale, bias, **config, x_scale=x_scale, out_dtype=out_dtype)

    @_fp8_small_op.register_fake
    def _(x_fp8, x_scale, weight_fp8, weight_scale, bias, out_dtype, tiles=None):
        return x_fp8.new_empty((x_fp8.shape[0], weight_fp8.shape[0]), dtype=out_dtype)

    def _launch_group(xs, x_scales, ws, w_scales, biases, out_dtype, block_n, block_k, split_k, num_warps,
                      num_stages, swap_ab=False, reduce=True):  # fmt: skip
        """`_launch_weight_only` for 2-3 linears of one K in one launch (`_grouped_kernel`); x_scales
        None: weight-only (x in high precision). Returns one output per member."""
        check_group(xs, x_scales, ws, w_scales, biases)
        (m, k), ns, group = xs[0].shape, [w.shape[0] for w in ws], len(ws)
        block_m, block_k, split_k = _launch_blocks(m, k, dict(block_k=block_k, block_n=block_n, num_stages=num_stages,
                                                              split_k=split_k))  # fmt: skip
        k_tiles = triton.cdiv(triton.cdiv(k, block_k), split_k)
        programs = [triton.cdiv(n, block_n) for n in ns]
        shape, dtype = ((m,), out_dtype) if split_k == 1 else ((split_k, m), torch.float32)
        outs = [torch.empty((*shape, n), dtype=dtype, device=xs[0].device) for n in ns]
        x_scales_or = x_scales if x_scales is not None else w_scales  # unread when X_FP8 is False
        members = [(xs[i], ws[i], w_scales[i], x_scales_or[i], w_scales[i] if biases[i] is None else biases[i],
                    outs[i], ns[i]) for i in range(group)]  # fmt: skip
        members += [members[0]] * (3 - group)  # unused slot: any valid pointers
        launch = {} if interpreting() else {"num_warps": num_warps, "num_stages": num_stages}
        x, w = xs[0], ws[0]
        torch.library.wrap_triton(_grouped_kernel)[(sum(programs), split_k, triton.cdiv(m, block_m))](
            *[arg for member in members for arg in member], m, k, programs[0], programs[1],
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            GROUP=group, K_TILES=k_tiles, SPLIT_K=split_k, ROWWISE=w_scales[0].numel() != 1,
            HAS_BIAS=biases[0] is not None, FP32_DOT=interpreting(), SWAP_AB=swap_ab,
            X_FP8=x_scales is not None, X_ROWWISE=x_scales is not None and x_scales[0].numel() != 1,
            X_CAST=x_scales is not None and x.dtype in KERNEL_X_DTYPES,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch,
        )  # fmt: skip
        if split_k == 1 or not reduce:
            return outs
        return [_epilogue(out.sum(0), w_scales[i], biases[i], None if x_scales is None else x_scales[i], out_dtype)
                for i, out in enumerate(outs)]  # fmt: skip

    @torch.library.triton_op("compile_fp8::small_mm_group", mutates_args=())
    def _small_mm_group_op(
        xs: list[torch.Tensor], x_scales: list[torch.Tensor], ws: list[torch.Tensor],
        w_scales: list[torch.Tensor], biases: list[Optional[torch.Tensor]], out_dtype: torch.dtype, tiles: list[int],
    ) -> list[torch.Tensor]:  # fmt: skip
        x_scales = x_scales or None  # [] in the op's schema: weight-only (x in high precision)
        config = _tile_config(tiles, sum(w.shape[0] for w in ws), ws[0].shape[1], "hp" if x_scales is None else "fp8")
        return _launch_group(xs, x_scales, ws, w_scales, biases, out_dtype, **config)

    @_small_mm_group_op.register_fake
    def _(xs, x_scales, ws, w_scales, biases, out_dtype, tiles):
        return [xs[0].new_empty((xs[0].shape[0], w.shape[0]), dtype=out_dtype) for w in ws]
