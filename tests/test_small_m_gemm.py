"""The small-M GEMM of inference (`kernels/small_m_gemm.py`, bodies in `kernels/small_m_kernels.py`).

The Triton kernel runs in Triton's CPU interpreter with TRITON_INTERPRET=1 (`interpreter`
tests) and on CUDA under the `gpu` marker; its torch reference runs everywhere. Tile configs
are module constants: tests pass tiles to the ops (their `tiles` argument) or to the launchers,
never patch the tables.
"""

import pytest
import torch
from torch import nn

from compile_fp8.kernels import small_m_gemm
from compile_fp8.scaling import saturated_cast
from helpers import bits_equal, sqnr
from inference_helpers import (
    BF16,
    E4M3,
    RECIPES,
    _inference,
    _quantized,
    _x,
    interpreter,
    needs_triton,
    run_small_m_kernel,
)


def _tiles(**config):
    """A tile config as the ops' `tiles` argument (ints in TILE_KEYS order)."""
    return [int(config.get(key, False)) for key in small_m_gemm.TILE_KEYS]


def test_weight_only_fallback_is_exact_dequantized_matmul():
    x = _x(5, 64)
    for granularity in RECIPES:
        w_fp8, w_scale = _quantized(torch.randn(48, 64, dtype=BF16), granularity)
        out = small_m_gemm.weight_only_linear(x, w_fp8, w_scale)
        expected = (x.float() @ (w_fp8.float() / w_scale).t()).to(BF16)
        assert sqnr(expected, out) > 50, f"{granularity}: sqnr {sqnr(expected, out):.1f} dB"


def test_fp8_small_m_reference_casts_high_precision_x_as_the_layer_does():
    """The float8-x op takes x already cast, or bf16 x that it casts itself (the cast-in-kernel
    pass): the same bits."""
    x = _x(5, 64)
    x_scale = _quantized(x, "rowwise")[1]
    w_fp8, w_scale = _quantized(torch.randn(48, 64, dtype=BF16), "rowwise")
    bias = _x(48)
    cast = small_m_gemm.fp8_small_m_reference(saturated_cast(x, x_scale, E4M3), x_scale, w_fp8, w_scale, bias, BF16)
    in_kernel = small_m_gemm.fp8_small_m_reference(x, x_scale, w_fp8, w_scale, bias, BF16)
    assert bits_equal(cast, in_kernel)


@interpreter
@pytest.mark.parametrize("granularity", RECIPES)
@pytest.mark.parametrize("m, k, n", [(16, 64, 48), (5, 100, 40), (33, 256, 96)], ids=str)
@pytest.mark.parametrize("split_k, swap_ab", [(1, False), (2, False), (1, True), (2, True)], ids=str)
def test_interpreted_weight_only_kernel(m, k, n, granularity, split_k, swap_ab):
    # several K steps (block_k 32); swap_ab: out.T = w @ x.T
    tiles = _tiles(**{**small_m_gemm.WEIGHT_ONLY_CONFIG, "block_k": 32, "split_k": split_k, "swap_ab": swap_ab})
    x = _x(m, k)
    w_fp8, w_scale = _quantized(torch.randn(n, k, dtype=BF16) * 0.05, granularity)
    for weight in (w_fp8, w_fp8.t().contiguous().t()):  # row-major, then column-major
        bias = _x(n)
        out = torch.ops.compile_fp8.weight_only_mm(x, weight, w_scale, bias, tiles)
        expected = small_m_gemm.weight_only_reference(x, weight, w_scale, bias)
        assert out.dtype == BF16 and out.shape == (m, n), (out.dtype, out.shape)
        # float32 sums in another order, then one bf16 rounding: at most one bf16 step apart
        assert torch.allclose(out.float(), expected.float(), rtol=2**-7, atol=1e-6), (out - expected).abs().max()


@interpreter
@pytest.mark.parametrize("granularity", RECIPES)
@pytest.mark.parametrize("m, k, n", [(16, 64, 48), (5, 100, 40)], ids=str)
@pytest.mark.parametrize("split_k, swap_ab", [(1, True), (2, False)], ids=str)
def test_interpreted_fp8_small_m_kernel(m, k, n, granularity, split_k, swap_ab):
    """Both operands float8 (small_m_activation="fp8"): the kernel against its torch math."""
    tiles = _tiles(**{**small_m_gemm.FP8_X_CONFIG, "block_k": 32, "split_k": split_k, "swap_ab": swap_ab})
    x_fp8, x_scale = _quantized(_x(m, k), granularity)  # the same cast the layer applies
    w_fp8, w_scale = _quantized(torch.randn(n, k, dtype=BF16) * 0.05, granularity)
    bias = _x(n)
    out = torch.ops.compile_fp8.fp8_small_mm(x_fp8, x_scale, w_fp8, w_scale, bias, BF16, tiles)
    expected = small_m_gemm.fp8_small_m_reference(x_fp8, x_scale, w_fp8, w_scale, bias, BF16)
    assert out.dtype == BF16 and out.shape == (m, n), (out.dtype, out.shape)
    assert torch.allclose(out.float(), expected.float(), rtol=2**-7, atol=1e-6), (out - expected).abs().max()


@interpreter
@pytest.mark.parametrize("activation", ["hp", "fp8"])
def test_compiled_small_m_graph_carries_the_tiles(activation, monkeypatch):
    """The layer passes the kernel's tiles to the op: they are constants of the traced graph, so
    torch.compile's caches key on them (tiles read inside the op would not be: a changed tile
    table could come back from the cache as the old kernel), and they are the tiles run. K =
    4096 gives the weight-only flavour its long-K split (tiles other than the default)."""
    run_small_m_kernel(monkeypatch)  # the interpreter runs it
    launched = []
    original = small_m_gemm._launch_weight_only

    def launch(*args, **kwargs):
        launched.append({key: kwargs[key] for key in small_m_gemm.TILE_KEYS})
        return original(*args, **kwargs)

    monkeypatch.setattr(small_m_gemm, "_launch_weight_only", launch)
    flavour_config = small_m_gemm.config_for(32, 4096, activation)
    tiles = small_m_gemm.tiles_for(32, 4096, activation)
    if activation == "hp":
        assert flavour_config["split_k"] == small_m_gemm.SPLIT_K_LONG > 1, flavour_config
    model = _inference(nn.Linear(4096, 32).to(BF16), weight_only_max_m=16, small_m_activation=activation)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    x = _x(4, 4096)
    with torch.no_grad():
        out = torch.compile(model, backend=record, fullgraph=True)(x)
        expected = model(x)
    op = "weight_only_mm" if activation == "hp" else "fp8_small_mm"
    assert op in graphs[0] and str(tiles) in graphs[0], (tiles, graphs[0])
    assert launched and all(config == {**flavour_config, "swap_ab": bool(flavour_config.get("swap_ab"))}
                            for config in launched), (launched, flavour_config)  # fmt: skip
    assert torch.allclose(out.float(), expected.float(), rtol=2**-7, atol=1e-6), (out - expected).abs().max()


def test_float8_x_tiles_split_k_only_where_few_sms_have_work():
    """K slices where a weight has fewer programs (64 rows each) than half the SMs: the 956M
    model's two N = 2048 projections on the H200's 132 SMs get 4 slices (128 programs), the wide
    ones (88-96 programs) none; never more slices than K blocks, none when the SM count is unknown."""
    split = {shape: small_m_gemm.config_for(*shape, "fp8", sms=132)["split_k"]
             for shape in [(2048, 2048), (2048, 5632), (5632, 2048), (6144, 2048), (1024, 1024), (2048, 512)]}  # fmt: skip
    assert split == {(2048, 2048): 4, (2048, 5632): 4, (5632, 2048): 1, (6144, 2048): 1, (1024, 1024): 2,
                     (2048, 512): 1}, split  # fmt: skip
    assert small_m_gemm.config_for(2048, 2048, "fp8") == small_m_gemm.FP8_X_CONFIG  # no SM count: one slice
    # more 64-row programs than SMs (a grouped gate + up): 128 rows each, one wave
    assert small_m_gemm.config_for(2 * 5632, 2048, "fp8", sms=132)["block_n"] == small_m_gemm.WIDE_BLOCK_N == 128
    assert small_m_gemm.config_for(6144, 2048, "fp8", sms=132)["block_n"] == 64
    assert small_m_gemm.tiles_for(2048, 5632, "fp8", sms=132) == [64, 512, 4, 4, 4, 1]
    assert small_m_gemm.sm_count(torch.device("cpu")) is None


def test_weight_only_tiles_split_k_where_k_is_long_or_few_sms_have_work():
    """The weight-only flavour (32 rows a program): SPLIT_K_LONG slices from K = LONG_K, and where
    fewer than half the SMs get a program (the out projection, N = 2048: 64 programs on 132 SMs);
    the wide weights (qkv, the grouped gate + up) keep one slice; no SM count: K alone decides."""
    split = {shape: small_m_gemm.config_for(*shape, "hp", sms=132)["split_k"]
             for shape in [(2048, 2048), (2048, 5632), (6144, 2048), (2 * 5632, 2048), (2112, 1024)]}  # fmt: skip
    assert split == {(2048, 2048): 4, (2048, 5632): 4, (6144, 2048): 1, (2 * 5632, 2048): 1, (2112, 1024): 1}, split
    assert small_m_gemm.config_for(2048, 2048, "hp") == small_m_gemm.WEIGHT_ONLY_CONFIG
    assert small_m_gemm.config_for(2048, 5632, "hp")["split_k"] == small_m_gemm.SPLIT_K_LONG == 4
    assert small_m_gemm.tiles_for(2048, 2048, "hp", sms=132) == [32, 256, 4, 4, 3, 0]


@needs_triton
def test_weight_only_tiles_shrink_block_k_to_fit_shared_memory():
    tuned_at_m16 = dict(block_n=64, block_k=512, num_stages=3)  # 256 KiB of buffers at M = 64
    assert small_m_gemm._block_sizes(16, 2048, tuned_at_m16) == (16, 512)
    block_m, block_k = small_m_gemm._block_sizes(40, 2048, tuned_at_m16)
    assert block_m == 64 and block_k == 256, (block_m, block_k)
    assert 2 * block_k * 2 * (block_m + 64) <= small_m_gemm.SHARED_MEMORY_BUDGET


# ---- groups: 2-3 linears in one launch ---------------------------------------------------------


@interpreter
@pytest.mark.parametrize("granularity", RECIPES)
@pytest.mark.parametrize("x_fp8", [False, True], ids=["x_hp", "x_fp8"])
@pytest.mark.parametrize("split_k, swap_ab", [(1, True), (2, False)], ids=str)
@pytest.mark.parametrize("members", [2, 3])
def test_interpreted_grouped_kernel_matches_each_member(members, split_k, swap_ab, x_fp8, granularity):
    """One launch over 2-3 weights of different N computes each member's output bit for bit as
    the single-linear kernel does (the same tiles of math), bias included."""
    tiles = dict(block_n=16, block_k=32, split_k=split_k, num_warps=4, num_stages=2, swap_ab=swap_ab)
    ns = [40, 24, 48][:members]
    ws = [_quantized(torch.randn(n, 100, dtype=BF16) * 0.05, granularity) for n in ns]
    xs = [_x(5, 100) for _ in ns]
    x_scales = None
    if x_fp8:
        xs, x_scales = (list(t) for t in zip(*[_quantized(x, granularity) for x in xs]))
    biases = [_x(n) for n in ns]
    w_data, w_scales = [w for w, _ in ws], [s for _, s in ws]
    outs = small_m_gemm._launch_group(xs, x_scales, w_data, w_scales, biases, BF16, **tiles)
    for i, out in enumerate(outs):
        extra = dict(x_scale=x_scales[i], out_dtype=BF16) if x_fp8 else {}
        alone = small_m_gemm._launch_weight_only(xs[i], w_data[i], w_scales[i], biases[i], **tiles, **extra)
        assert out.shape == (5, ns[i]) and bits_equal(out, alone), (i, (out - alone).abs().max())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k=80), "weight K and strides"),
        (dict(rowwise=1), "weight scale granularity"),
        (dict(bias=1), "bias presence"),
        (dict(members=4), "a group runs 2-3 linears"),
        (dict(x_float32=1), "x must be float8_e4m3fn, bfloat16 or float16"),
    ],
)
def test_group_members_must_agree(change, match):
    """What one launch shares is checked (`check_group`), and the error names what differs."""
    members = change.get("members", 2)
    ws = [_quantized(torch.randn(32, 64, dtype=BF16), "tensorwise") for _ in range(members)]
    ws_data, scales = [w for w, _ in ws], [s for _, s in ws]
    if "k" in change:
        ws_data[1] = torch.zeros(32, change["k"], dtype=E4M3)
    if "rowwise" in change:
        scales[1] = torch.ones(32, 1)
    biases = [None] * members
    if "bias" in change:
        biases[1] = _x(32)
    xs, x_scales = [_x(4, 64)] * members, None
    if "x_float32" in change:  # float8-x flavour: x float8 or bf16/fp16 (cast in the kernel)
        xs, x_scales = [torch.randn(4, 64)] * members, [torch.ones(())] * members
    with pytest.raises(ValueError, match=match):
        small_m_gemm.small_m_group_reference(xs, x_scales, ws_data, scales, biases, BF16)


def test_group_reference_is_each_members_reference():
    ws = [_quantized(torch.randn(n, 64, dtype=BF16), "rowwise") for n in (32, 48)]
    xs = [_x(4, 64), _x(4, 64)]
    outs = small_m_gemm.small_m_group_reference(xs, None, [w for w, _ in ws], [s for _, s in ws], [None, None], BF16)
    for x, (w, s), out in zip(xs, ws, outs):
        assert bits_equal(out, small_m_gemm.weight_only_reference(x, w, s))


# ---- GPU ------------------------------------------------------------------------------------


GPU_TILES = [  # the kinds of configs the H200 sweep picks from (bench_inference.py --sweep)
    dict(block_n=32, block_k=256, split_k=1, num_warps=4, num_stages=3),
    dict(block_n=16, block_k=1024, split_k=2, num_warps=8, num_stages=2),
    dict(block_n=64, block_k=512, split_k=1, num_warps=4, num_stages=3, swap_ab=True),
    dict(block_n=128, block_k=256, split_k=4, num_warps=8, num_stages=3, swap_ab=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", GPU_TILES, ids=lambda t: "-".join(f"{v}" for v in t.values()))
@pytest.mark.parametrize("m", [1, 16, 40])
@pytest.mark.parametrize("x_fp8", [False, True], ids=["x_hp", "x_fp8"])
def test_gpu_weight_only_tile_configs_agree_with_reference(tiles, m, x_fp8):
    w_fp8, w_scale = _quantized(torch.randn(768, 2048, dtype=BF16, device="cuda") * 0.05, "rowwise")
    x, bias = _x(m, 2048).cuda(), _x(768).cuda()
    if x_fp8:  # both operands float8: the fp8_small_mm flavour
        x_data, x_scale = _quantized(x, "rowwise")
        out = small_m_gemm._launch_weight_only(x_data, w_fp8, w_scale, bias, **tiles, x_scale=x_scale, out_dtype=BF16)
        reference = small_m_gemm.fp8_small_m_reference(x_data, x_scale, w_fp8, w_scale, bias, BF16)
    else:
        out = small_m_gemm._launch_weight_only(x, w_fp8, w_scale, bias, **tiles)
        reference = small_m_gemm.weight_only_reference(x, w_fp8, w_scale, bias)
    assert out.shape == (m, 768) and sqnr(reference, out) >= 45, f"{sqnr(reference, out):.1f} dB"


@pytest.mark.gpu
@pytest.mark.parametrize("x_fp8", [False, True], ids=["x_hp", "x_fp8"])
def test_gpu_ops_run_the_default_tiles(x_fp8):
    """The ops as the layer calls them (`weight_only_linear`, `fp8_small_m_linear`: the tiles
    `tiles_for` picks for the GPU) against their torch math."""
    w_fp8, w_scale = _quantized(torch.randn(2048, 2048, dtype=BF16, device="cuda") * 0.05, "rowwise")
    x, bias = _x(16, 2048).cuda(), _x(2048).cuda()
    if x_fp8:
        x_data, x_scale = _quantized(x, "rowwise")
        out = small_m_gemm.fp8_small_m_linear(x_data, x_scale, w_fp8, w_scale, bias, BF16)
        reference = small_m_gemm.fp8_small_m_reference(x_data, x_scale, w_fp8, w_scale, bias, BF16)
    else:
        out = small_m_gemm.weight_only_linear(x, w_fp8, w_scale, bias)
        reference = small_m_gemm.weight_only_reference(x, w_fp8, w_scale, bias)
    assert sqnr(reference, out) >= 45, f"{sqnr(reference, out):.1f} dB"
