"""Probe: how close does the small-M float8 GEMM come to the H200's read bandwidth, and would TMA
loads get closer? (issue 9, decode at M = 16)

For each weight shape of the 956M model at M = 16 this times, from CUDA graphs over copies of
the weight worth more than the L2 (every call reads HBM, as in the model):

* `floor`: a Triton kernel that only reads the weight's bytes and sums them (no MMA): the time
  a GEMM of this shape cannot beat, for several program counts;
* `ours`: `fp8_gemv`'s float8-x kernel at the tiles `config_for` picks, and variations;
* `tma`: the same math with the weight and x tiles loaded by the tensor memory accelerator
  (host `TensorDescriptor`s), swap AB, K slices as partial sums;

then the 80 GEMMs of one decode step in model order (16 layers x qkv, out, gate, up, down, each
its own weight) in one graph: `ours`, gate and up in one grouped launch (`fp8_gemv`'s grouped
kernel, several tiles), the fastest `tma` tiles per shape, and cuBLAS's bf16 mm on bf16 weights
for scale. Writes `probe_gemv.md` under --out. (`--sequence-only`: the last part alone.)

    PYTHONPATH=. python3 scripts/probe_gemv.py --out $OUT
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys
import time

import torch

SHAPES = ((6144, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632))  # qkv, out, gate, up, down
LAYERS, M, ROTATE_BYTES, CALLS = 16, 16, 200 * 2**20, 20


def graph_us(fn, calls: int) -> float:
    """us per call of `fn`, replayed from a CUDA graph of `calls` calls (median of 7 replays)."""
    from bench_inference import capture_graph  # scripts/ is on sys.path when run as a script

    graph = capture_graph(fn, calls)
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/probe_gemv")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new configs after this")
    p.add_argument("--sequence-only", action="store_true", help="skip the per-shape sweeps")
    args = p.parse_args()
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from compile_fp8 import fp8_gemv

    @triton.jit
    def read_kernel(w_ptr, out_ptr, n_elems, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in tl.range(0, CHUNK, BLOCK, num_stages=3):
            offs = pid.to(tl.int64) * CHUNK + i + tl.arange(0, BLOCK)
            acc += tl.load(w_ptr + offs, mask=offs < n_elems, other=0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc))

    @triton.jit
    def tma_kernel(x_desc, w_desc, out_ptr, N, stride_os, K_TILES: tl.constexpr, SPLIT_K: tl.constexpr,
                   STAGES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for i in tl.range(K_TILES, num_stages=STAGES):
            off_k = (pid_k + i * SPLIT_K) * BLOCK_K
            w = w_desc.load([pid_n * BLOCK_N, off_k])  # [BN, BK]
            x = x_desc.load([0, off_k])  # [BM, BK]
            acc = tl.dot(w, x.T, acc)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        tl.store(out_ptr + pid_k * stride_os + offs_m[None, :] * N + offs_n[:, None], acc, mask=offs_n[:, None] < N)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [f"# probe_gemv, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {sms} SMs, M = {M}", ""]  # fmt: skip
    began = time.time()

    def fp8(n, k):
        return (torch.randn(n, k, device="cuda") * 20).clamp(-400, 400).to(torch.float8_e4m3fn)

    def read_launch(w, programs, block):
        chunk = -(-w.numel() // programs)
        chunk = -(-chunk // block) * block
        out = torch.empty(programs, device="cuda")
        read_kernel[(programs,)](w.view(torch.uint8), out, w.numel(), CHUNK=chunk, BLOCK=block, num_warps=8)
        return out

    def tma_launch(x, w, bn, bk, split, stages, warps):
        n, k = w.shape
        k_tiles = -(-(-(-k // bk)) // split)
        out = torch.empty((split, M, n), device="cuda")
        x_desc = TensorDescriptor.from_tensor(x, [M, bk])
        w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
        tma_kernel[(-(-n // bn), split)](x_desc, w_desc, out, n, out.stride(0), K_TILES=k_tiles, SPLIT_K=split,
                                         STAGES=stages, BLOCK_M=M, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)  # fmt: skip
        return out

    def ours_launch(x, xs, w, ws, tiles):
        return fp8_gemv._launch_weight_only(x, w, ws, None, **tiles, x_scale=xs, out_dtype=torch.bfloat16, reduce=False)

    one = torch.ones((), device="cuda")
    best_tma, ours_tiles = {}, {}
    for n, k in () if args.sequence_only else dict.fromkeys(SHAPES):
        copies = max(2, -(-ROTATE_BYTES // (n * k)))
        ws = [fp8(n, k) for _ in range(copies)]
        x = fp8(M, k)
        ref = x.float() @ ws[0].float().t()
        rows = []
        for programs, block in itertools.product((sms, 2 * sms, 4 * sms), (4096, 16384)):
            it = itertools.cycle(ws)
            rows.append((f"floor {programs} programs x {block}", graph_us(lambda: read_launch(next(it), programs, block), max(CALLS, copies))))
        base = fp8_gemv.config_for(n, k, "fp8", sms)
        ours_tiles[(n, k)] = base
        variants = [base] + [{**base, **d} for d in (dict(num_warps=8), dict(split_k=max(1, base["split_k"] * 2)),
                                                     dict(block_n=128), dict(block_k=256, num_stages=6))]  # fmt: skip
        for tiles in variants:
            it = itertools.cycle(ws)
            try:
                us = graph_us(lambda: ours_launch(x, one, next(it), one, tiles), max(CALLS, copies))
            except Exception as err:
                print(f"ours {tiles}: {err!r}", file=sys.stderr)
                continue
            rows.append((f"ours {tiles}", us))
        for bn, bk, split, stages, warps in itertools.product((64, 128), (128, 256), (1, 2, 4), (3, 5, 8), (4,)):
            if time.time() - began > args.budget_s or -(-k // bk) < split:
                continue
            try:
                out = tma_launch(x, ws[0], bn, bk, split, stages, warps)
                err = (out.sum(0) - ref).abs().max().item() / ref.abs().max().item()
                it = itertools.cycle(ws)
                us = graph_us(lambda: tma_launch(x, next(it), bn, bk, split, stages, warps), max(CALLS, copies))
            except Exception as exc:
                print(f"tma {bn} {bk} {split} {stages}: {exc!r}"[:300], file=sys.stderr)
                continue
            rows.append((f"tma bn={bn} bk={bk} split={split} stages={stages} warps={warps} (rel err {err:.1e})", us))
            if err < 1e-3 and ((n, k) not in best_tma or us < best_tma[(n, k)][1]):
                best_tma[(n, k)] = ((bn, bk, split, stages, warps), us)
        lines += [f"## [{n}, {k}] ({n * k / 1e6:.1f} MB float8)", "", "| kernel | us | TB/s |", "|---|---:|---:|"]
        lines += [f"| {name} | {us:.2f} | {n * k / us / 1e6:.2f} |" for name, us in sorted(rows, key=lambda r: r[1])]
        lines.append("")
        print("\n".join(lines[-len(rows) - 3:]), flush=True)
        del ws
    # the 80 GEMMs of one decode step, model order, each its own weight
    layers = [[fp8(n, k) for n, k in SHAPES] for _ in range(LAYERS)]
    xs = {k: fp8(M, k) for k in {k for _, k in SHAPES}}

    group_tiles = {}

    def step(kind):
        for layer in layers:
            for i, w in enumerate(layer):
                n, k = w.shape
                if kind.startswith("grouped") and i in (2, 3):  # gate and up in one launch
                    if i == 2:
                        tiles = group_tiles[kind]
                        fp8_gemv._launch_group([xs[k], xs[k]], [one, one], layer[2:4], [one, one], [None, None],
                                               torch.bfloat16, **tiles, reduce=False)  # fmt: skip
                elif kind.startswith("ours") or kind.startswith("grouped"):
                    ours_launch(xs[k], one, w, one, fp8_gemv.config_for(n, k, "fp8", sms))
                else:
                    tma_launch(xs[k], w, *best_tma[(n, k)][0])

    base = fp8_gemv.config_for(2 * 5632, 2048, "fp8", sms)  # the grouped kernel's tiles
    group_tiles.update({"grouped": base, "grouped 64 rows": {**base, "block_n": 64},
                        "grouped 64 rows bk256 st6": {**base, "block_n": 64, "block_k": 256, "num_stages": 6},
                        "grouped 64 rows split2": {**base, "block_n": 64, "split_k": 2}})
    seq = [("ours (config_for)", graph_us(lambda: step("ours"), 1))]
    for kind, tiles in group_tiles.items():
        seq.append((f"{kind}: gate + up in one launch {tiles}", graph_us(lambda: step(kind), 1)))
    seq.append(("ours (config_for), again", graph_us(lambda: step("ours"), 1)))
    if len(best_tma) == len(set(SHAPES)):
        seq.append((f"tma (best per shape: {[v[0] for v in best_tma.values()]})", graph_us(lambda: step("tma"), 1)))
    layers.clear()
    bf = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in SHAPES] for _ in range(LAYERS)]
    xb = {k: torch.randn(M, k, device="cuda", dtype=torch.bfloat16) for k in xs}
    seq.append(("cuBLAS bf16 mm", graph_us(lambda: [torch.mm(xb[w.shape[1]], w.t()) for layer in bf for w in layer], 1)))
    lines += ["## The 80 GEMMs of a decode step (16 layers, model order, one graph)", "", "| kernels | us |", "|---|---:|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in seq]
    print("\n".join(lines[-len(seq) - 4:]), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_gemv.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
