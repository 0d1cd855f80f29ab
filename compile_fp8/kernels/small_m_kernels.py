"""The Triton bodies of the small-M GEMM (`small_m_gemm.py` has the math, the tiles and the ops).

`_mm_tile` computes one [BLOCK_M, BLOCK_N] tile of `x @ w.T` over one K slice, with the weight
dequantized in registers (weight-only) or both operands float8; `_weight_only_kernel` runs one
linear, `_grouped_kernel` 2-3 linears of one K in one launch (each program one member's tile,
exactly as the single kernel computes it).
"""

from __future__ import annotations

from .triton_support import tl, triton

if triton is not None:
    from .triton_support import to_fp8

    @triton.jit
    def _dequantize(w, dtype: tl.constexpr):
        """A float8 e4m3 tile -> `dtype` (bf16/fp16/fp32), exactly: every e4m3 value is one of each.

        To bfloat16 by way of float16 and float32: for sm90 triton 3.6 lowers a plain e4m3 -> bf16
        as e4m3x2 -> f16x2 (one F2FP a pair) then an F2F f16 -> bf16 per element, a conversion
        instruction of lower throughput; this chain gives f16 -> f32 (HADD2.F32) and f32x2 ->
        bf16x2 (F2FP) instead: as many instructions, no F2F (a test compiles the kernel for sm_90a
        and counts). The values cannot change (each step is exact)."""
        if dtype == tl.bfloat16:
            return w.to(tl.float16).to(tl.float32).to(dtype)
        return w.to(dtype)

    @triton.jit
    def _mm_tile(
        x_ptr, w_ptr, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, pid_n, pid_k, pid_m, M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, stride_os,
        K_TILES: tl.constexpr, SPLIT_K: tl.constexpr, ROWWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
        FP32_DOT: tl.constexpr, SWAP_AB: tl.constexpr, X_FP8: tl.constexpr, X_ROWWISE: tl.constexpr,
        X_CAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One [BLOCK_M, BLOCK_N] tile of out (rows pid_m, columns pid_n), over K slice pid_k of SPLIT_K."""
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        if SWAP_AB:  # out.T = w @ x.T: the weight tile is the MMA's tall operand (BLOCK_N >= 64)
            acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # K_TILES is a constexpr: the interpreter (triton 3.6) cannot loop to a runtime bound
        for i in range(K_TILES):
            offs_k = ((pid_k + i * SPLIT_K) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
            x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=x_mask, other=0.0)  # [BLOCK_M, BLOCK_K], bf16/fp16 (float8 if X_FP8)  # fmt: skip
            if X_CAST and X_ROWWISE:  # x in bf16/fp16: `saturated_cast` to e4m3 in the prologue
                x_scale = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=1.0)[:, None]
                x = to_fp8(x, x_scale, 448.0, 3, 7, FP32_DOT)  # software cast where interpreted
            elif X_CAST:
                x = to_fp8(x, tl.load(x_scale_ptr), 448.0, 3, 7, FP32_DOT)
            w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K], float8  # fmt: skip
            if not X_FP8:  # dequantize in registers: float8 -> x's dtype is exact (scale at the end)
                w = _dequantize(w, x.dtype)
            if FP32_DOT:  # the interpreter's bf16 tl.dot is wrong (triton 3.6); float32 is exact
                x, w = x.to(tl.float32), w.to(tl.float32)
            if SWAP_AB:
                acc_t = tl.dot(w, tl.trans(x), acc_t)  # [BN, BK] @ [BK, BM] -> [BN, BM]
            else:
                acc = tl.dot(x, tl.trans(w), acc)  # [BM, BK] @ [BK, BN] -> [BM, BN]
        if SWAP_AB:
            acc = tl.trans(acc_t)
        out_offs = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K > 1:  # float32 partial sums of slice pid_k; the epilogue runs in torch
            tl.store(out_ptr + pid_k * stride_os + out_offs, acc, mask=out_mask)
            return
        if ROWWISE:
            scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=1.0)  # [BLOCK_N]
            acc = acc / scale[None, :]
        else:
            acc = acc / tl.load(scale_ptr)
        if X_FP8 and X_ROWWISE:  # the activation's scales: one per token (row of x)
            acc = acc / tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=1.0)[:, None]
        elif X_FP8:
            acc = acc / tl.load(x_scale_ptr)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _weight_only_kernel(
        x_ptr, w_ptr, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, stride_os,
        K_TILES: tl.constexpr, SPLIT_K: tl.constexpr, ROWWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
        FP32_DOT: tl.constexpr, SWAP_AB: tl.constexpr, X_FP8: tl.constexpr, X_ROWWISE: tl.constexpr,
        X_CAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One linear: program (n, k, m) computes `_mm_tile` (n, k, m)."""
        _mm_tile(x_ptr, w_ptr, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, tl.program_id(0), tl.program_id(1),
                 tl.program_id(2), M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                 stride_os, K_TILES, SPLIT_K, ROWWISE, HAS_BIAS, FP32_DOT, SWAP_AB, X_FP8, X_ROWWISE,
                 X_CAST, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip

    @triton.jit
    def _grouped_kernel(
        x0, w0, s0, xs0, b0, o0, N0, x1, w1, s1, xs1, b1, o1, N1, x2, w2, s2, xs2, b2, o2, N2,
        M, K, P0, P1, stride_xm, stride_xk, stride_wn, stride_wk,
        GROUP: tl.constexpr, K_TILES: tl.constexpr, SPLIT_K: tl.constexpr, ROWWISE: tl.constexpr,
        HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, SWAP_AB: tl.constexpr, X_FP8: tl.constexpr,
        X_ROWWISE: tl.constexpr, X_CAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """GROUP (2 or 3) linears of one K in one launch: programs [0, P0) of axis 0 run member 0,
        [P0, P0 + P1) member 1, the rest member 2. Outputs contiguous ([SPLIT_K,] M, N_i)."""
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if pid_n < P0:
            _mm_tile(x0, w0, s0, xs0, b0, o0, pid_n, pid_k, pid_m, M, N0, K, stride_xm, stride_xk, stride_wn,
                     stride_wk, N0, 1, M * N0, K_TILES, SPLIT_K, ROWWISE, HAS_BIAS, FP32_DOT, SWAP_AB, X_FP8,
                     X_ROWWISE, X_CAST, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        elif GROUP == 2 or pid_n < P0 + P1:
            _mm_tile(x1, w1, s1, xs1, b1, o1, pid_n - P0, pid_k, pid_m, M, N1, K, stride_xm, stride_xk, stride_wn,
                     stride_wk, N1, 1, M * N1, K_TILES, SPLIT_K, ROWWISE, HAS_BIAS, FP32_DOT, SWAP_AB, X_FP8,
                     X_ROWWISE, X_CAST, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        else:
            _mm_tile(x2, w2, s2, xs2, b2, o2, pid_n - P0 - P1, pid_k, pid_m, M, N2, K, stride_xm, stride_xk,
                     stride_wn, stride_wk, N2, 1, M * N2, K_TILES, SPLIT_K, ROWWISE, HAS_BIAS, FP32_DOT, SWAP_AB,
                     X_FP8, X_ROWWISE, X_CAST, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
