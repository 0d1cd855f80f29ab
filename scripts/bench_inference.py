"""Benchmark FP8 inference forwards: bf16 vs compile_fp8 inference vs torchao, in one process.

The default model is the 956M Llama-style LM of compile_fp8.lm (`anchor` preset, bf16
parameters, LM head kept in bf16 for every variant), forward only under torch.inference_mode and
torch.compile. Cases (no KV cache: a decode step is a forward of 1 token per sequence):

* prefill: 4 x 2048 tokens (M = 8192 rows per linear), compile mode "default";
* decode:  16 sequences x 1 token (M = 16), compile mode "default" and "reduce-overhead" (CUDA
  graphs; launch overhead dominates "default" at this size).

Within one row (case, compile mode) every variant is compiled the same way. Columns: ms per
forward (CUDA events over `--iters` calls after `--warmup`, median of `--repeats` rounds),
speed-up over bf16, bytes of the converted linear weights (every Linear but the head) relative
to bf16, and the logits' SQNR against bf16.

Variants: bf16, ours-tensorwise, ours-rowwise (`Float8Config(mode="inference")`; small M runs
the small-M kernel, `--weight-only-max-m` overrides the threshold), ours-static (tensorwise
with `scaling="static"` input scales from `calibrate` on the benchmark's batch: no amax pass
before each `_scaled_mm`; at small M `small_m_activation="auto"` then takes the float8 x float8
kernel), ours-tensorwise-fp8x, ours-rowwise-fp8x and ours-static-fp8x (the same with
`small_m_activation="fp8"`: small M casts x to float8 too and runs the kernel on two float8
operands), torchao-tensorwise, torchao-rowwise (`Float8DynamicActivationFloat8WeightConfig`,
PerTensor / PerRow).

On a CUDA GPU with FP8 (sm89+), torch and torchao installed:

    python3 scripts/bench_inference.py --out runs/bench_inference
    python3 scripts/bench_inference.py --cases decode --modes reduce-overhead --profile
    python3 scripts/bench_inference.py --sweep --out runs/bench_inference   # small-M kernel tiles / M

`--out DIR` (default runs/bench_inference) gets bench_inference.md (the table) and
bench_inference.json (its rows and notes), rewritten after every variant; with `--profile` also
bench_inference_profile.md and .json (each variant's CUDA kernels per call, where the GPU idles);
with `--sweep` bench_inference_sweep.md and .json instead.

`--sweep [tiles|m|all]` times, per linear shape of the model (replayed from CUDA graphs, so
without launch overhead), the small-M kernel at M = 16 for a grid of tiles (passed to the
kernel's launcher as arguments), and/or a compiled rowwise layer on each path (bf16, small-M
kernel, `_scaled_mm`) for M = 16 .. 256: the measurements behind the tile tables of
compile_fp8/kernels/small_m_gemm.py and `Float8Config.weight_only_max_m` on another GPU.

On CPU, `--small` runs a one-layer toy model for a few iterations so CI can check the script
works (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    add_out_argument,
    device_name,
    kernel_timeline,
    kernels_by_name,
    try_variant,
    write_results,
)

VARIANTS = ("bf16", "ours-tensorwise", "ours-rowwise", "ours-static", "ours-tensorwise-fp8x", "ours-rowwise-fp8x",
            "ours-static-fp8x", "torchao-tensorwise", "torchao-rowwise")  # fmt: skip
DEFAULT_VARIANTS = ("bf16", "ours-tensorwise", "ours-rowwise", "torchao-tensorwise")
CASES = {"prefill": ("default",), "decode": ("default", "reduce-overhead")}


def is_body_linear(module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn != "head"  # the LM head stays bf16


def build_model(args, device):
    from compile_fp8.lm.model import TransformerLM, get_preset

    cfg = get_preset(args.preset).replace(seq_len=max(args.prefill_seq, 1))
    if args.small:
        cfg = cfg.replace(vocab_size=256, d_model=64, n_layers=1, n_heads=4, d_ff=176, seq_len=args.prefill_seq)
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(device, torch.bfloat16).eval().requires_grad_(False)
    return model, cfg


def inference_config(name: str, args, device):
    """The Float8Config of an `ours-*` variant: "static" is tensorwise with calibrated input
    scales; "-fp8x" runs small M with float8 x (`small_m_activation="fp8"`), the others "auto"."""
    from compile_fp8 import Float8Config

    _, recipe, *flags = name.split("-")
    scaling, recipe = ("static", "tensorwise") if recipe == "static" else ("dynamic", recipe)
    extra = {} if args.weight_only_max_m is None else {"weight_only_max_m": args.weight_only_max_m}
    emulate = True if device.type == "cpu" else None  # CPU _scaled_mm is a slow reference kernel
    small_m = "fp8" if flags == ["fp8x"] else "auto"
    return Float8Config(mode="inference", recipe=recipe, scaling=scaling, emulate=emulate,
                        small_m_activation=small_m, **extra)  # fmt: skip


def convert(name: str, model, args, device, tokens=None):
    """`model` converted (not compiled) as variant `name`; the static variants are calibrated
    on `tokens` (the benchmark's own batch: the best case for their scales)."""
    if name == "bf16":
        return model
    if name.startswith("torchao-"):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

        granularity = PerTensor() if name == "torchao-tensorwise" else PerRow()
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=granularity), filter_fn=is_body_linear)
        return model
    from compile_fp8 import calibrate, compile_fp8

    config = inference_config(name, args, device)
    model = compile_fp8(model, config, module_filter_fn=lambda m, fqn: fqn != "head", compile=False)
    if config.scaling == "static":
        calibrate(model, [tokens])
    return model


def linear_weight_bytes(model) -> int:
    from compile_fp8.inference.convert import parameter_bytes

    return sum(parameter_bytes(m) for fqn, m in model.named_modules() if is_body_linear(m, fqn))


def time_ms(fn, args, device) -> float:
    """ms per call: `--repeats` rounds of `--iters` calls, the median round."""
    for _ in range(args.warmup):
        fn()
    rounds = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            rounds.append(start.elapsed_time(end) / args.iters)
        else:
            begin = time.perf_counter()
            for _ in range(args.iters):
                fn()
            rounds.append((time.perf_counter() - begin) * 1e3 / args.iters)
    return statistics.median(rounds)


def host_ms(fn, args, device) -> float:
    """ms per call the CPU spends issuing `--iters` calls (no sync inside): about `time_ms` when
    the step is bound by the host (CUDA graph replay bookkeeping), below it when the GPU is."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(args.iters):
        fn()
    host = (time.perf_counter() - begin) * 1e3 / args.iters
    if device.type == "cuda":
        torch.cuda.synchronize()
    return host


def python_profile(fn, args, top: int = 30) -> str:
    """Where the CPU's time per call goes: cProfile over `--iters` calls, the `top` functions by
    cumulative time (the host side of a step: guards, AOTAutograd's and CUDA graphs' wrappers)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.iters):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def kernel_profile(fn, device, calls: int = 20) -> dict:
    """The CUDA kernels of one call of `fn`, from the torch profiler over `calls` calls: per kernel
    name its launches and microseconds per call, and the totals (kernel time excludes the gaps
    between kernels, so total_us against the measured ms says how much of a step is idle)."""
    if device.type != "cuda":
        return {"kernels": [], "total_us": 0.0, "launches": 0.0, "gaps": None}
    timeline = kernel_timeline(fn, calls)
    per_name = kernels_by_name(timeline)
    kernels = sorted(([name, n / calls, us / calls] for name, (n, us) in per_name.items()), key=lambda k: -k[2])
    return {"kernels": kernels, "total_us": sum(k[2] for k in kernels), "launches": sum(k[1] for k in kernels),
            "gaps": kernel_gaps(timeline, calls)}


def kernel_gaps(timeline, calls: int, top: int = 8) -> dict | None:
    """Where the GPU idles: `timeline` (kernel_timeline over `calls` identical calls) cut into
    calls of equal kernel count; the idle time before each kernel position, averaged over calls.
    Returns the idle us per call inside a call and between calls, and the `top` largest gaps
    (mean us, kernel before, kernel after); None when the calls do not have equal kernel counts."""
    if not timeline or len(timeline) % calls:
        return None
    per_call = len(timeline) // calls
    gaps = [0.0] * per_call  # gaps[i]: total idle before kernel i of a call, over the calls
    for j in range(1, len(timeline)):
        _, prev_start, prev_us = timeline[j - 1]
        gaps[j % per_call] += max(0.0, timeline[j][1] - (prev_start + prev_us))
    largest = sorted(range(1, per_call), key=lambda i: -gaps[i])[:top]
    before: dict[str, list] = {}  # kernel name -> [positions, idle us per call before them]
    for i in range(1, per_call):
        entry = before.setdefault(timeline[i][0], [0, 0.0])
        entry[0] += 1
        entry[1] += gaps[i] / calls
    return {
        "in_call_us": sum(gaps[1:]) / calls,
        "between_calls_us": gaps[0] / max(1, calls - 1),
        "largest": [(gaps[i] / calls, timeline[i - 1][0], timeline[i][0]) for i in largest],
        "by_kernel": sorted(([name, n, us] for name, (n, us) in before.items()), key=lambda k: -k[2])[:top],
    }


def render_profiles(rows) -> str:
    lines = ["# bench_inference --profile: CUDA kernels per call", ""]
    for r in (r for r in rows if r.get("profile")):
        prof = r["profile"]
        lines += [f"## {r['case']} {r['mode']} {r['variant']}: {r['ms'] * 1e3:.0f} us per call measured "
                  f"({r.get('host_ms', float('nan')) * 1e3:.0f} us of it issuing the call on the CPU), "
                  f"{prof['total_us']:.0f} us of kernels in {prof['launches']:.0f} launches", "",
                  "| kernel | launches | us per call |", "|---|---:|---:|"]  # fmt: skip
        lines += [f"| `{name[:90]}` | {n:.0f} | {us:.1f} |" for name, n, us in prof["kernels"][:25]]
        gaps = prof.get("gaps")
        if gaps:
            lines += ["", f"GPU idle per call: {gaps['in_call_us']:.0f} us between its kernels, "
                      f"{gaps['between_calls_us']:.0f} us between calls. Largest gaps (mean us, before -> after):", ""]  # fmt: skip
            lines += [f"- {us:.1f} us: `{before[:60]}` -> `{after[:60]}`" for us, before, after in gaps["largest"]]
            lines += ["", "Idle per call before each kernel, by kernel (launches per call, us):", ""]
            lines += [f"- {us:.1f} us before {n} x `{name[:80]}`" for name, n, us in gaps.get("by_kernel", [])]
        if r.get("host_profile"):
            lines += ["", f"CPU per call, cProfile over {r['host_profile_calls']} calls:", "", "```", r["host_profile"], "```"]
        lines.append("")
    return "\n".join(lines)


def sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref, actual = ref.double(), actual.double()
    noise = (ref - actual).norm()
    return float("inf") if noise == 0 else (20 * torch.log10(ref.norm() / noise)).item()


def bench_variant(name, base, tokens, mode, reference, args, device) -> dict:
    """One variant converted, compiled in `mode` and timed on `tokens`; its logits for the SQNR."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = convert(name, copy.deepcopy(base), args, device, tokens)
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    with torch.inference_mode():
        first = time.perf_counter()
        logits = compiled(tokens).clone()  # reduce-overhead reuses its output buffer
        first_s = time.perf_counter() - first
        ms = time_ms(lambda: compiled(tokens), args, device)
        host = host_ms(lambda: compiled(tokens), args, device)
        host_profile = python_profile(lambda: compiled(tokens), args) if args.host_profile else None
        profile = kernel_profile(lambda: compiled(tokens), device) if args.profile else None
    return {
        "ms": ms,
        "host_ms": host,
        "host_profile": host_profile,
        "host_profile_calls": args.iters,
        "profile": profile,
        "first_call_s": first_s,
        "linear_weight_bytes": linear_weight_bytes(model),
        "sqnr_db": sqnr(reference, logits) if reference is not None else float("inf"),
        "logits": logits,
    }


def run(args) -> tuple[list[dict], list[str]]:
    device = torch.device(args.device)
    base, cfg = build_model(args, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    shapes = {"prefill": (args.prefill_batch, args.prefill_seq), "decode": (args.decode_batch, 1)}
    rows, notes = [], []
    for case in args.cases:
        tokens = torch.randint(0, cfg.vocab_size, shapes[case], generator=gen).to(device)
        for mode in (m for m in CASES[case] if m in args.modes):
            if mode == "reduce-overhead" and device.type != "cuda":
                notes.append(f"skipped {case} reduce-overhead: CUDA graphs need a GPU")
                continue
            reference = None
            for name in args.variants:
                result = try_variant(lambda: bench_variant(name, base, tokens, mode, reference, args, device),
                                     name, notes, label=f"{case} {mode} {name}")  # fmt: skip
                if result is None:
                    continue
                logits = result.pop("logits")
                reference = logits if name == "bf16" else reference
                rows.append({"case": case, "tokens": "x".join(map(str, shapes[case])), "mode": mode,
                             "variant": name, **result})  # fmt: skip
                print(f"  {case} {mode} {name}: {result['ms']:.3f} ms", file=sys.stderr, flush=True)
                write(rows, notes, args)  # a run cut short by its time limit keeps its rows
                if args.profile:
                    write(rows, notes, args, "bench_inference_profile", render_profiles(rows))
    return rows, notes


def render(rows, notes, args) -> str:
    lines = [
        f"# bench_inference {datetime.datetime.now().isoformat(timespec='seconds')} | "
        f"{device_name(args.device)} | torch {torch.__version__} | preset {args.preset}"
        f"{' (small)' if args.small else ''} | forward only, inference_mode, torch.compile",
        "",
        "| case | tokens | compile mode | variant | ms | speed-up | linear weight bytes | logits SQNR dB |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        bf16 = next((b for b in rows if b["variant"] == "bf16" and (b["case"], b["mode"]) == (r["case"], r["mode"])), None)
        speed = f"{bf16['ms'] / r['ms']:.2f}x" if bf16 else "-"
        ratio = f"{r['linear_weight_bytes'] / bf16['linear_weight_bytes']:.3f}x" if bf16 else "-"
        lines.append(f"| {r['case']} | {r['tokens']} | {r['mode']} | {r['variant']} | {r['ms']:.3f} | {speed} | "
                     f"{ratio} | {r['sqnr_db']:.1f} |")  # fmt: skip
    lines += [""] + [f"- note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write(rows, notes, args, name="bench_inference", text=None) -> str:
    """The table as text (`render`'s unless `text` is given); also written to `--out` as NAME.md
    and NAME.json."""
    text = render(rows, notes, args) if text is None else text
    write_results(args.out, name, text, {"rows": rows, "notes": notes})
    return text


# ---- --sweep: the small-M kernel's tiles, and the M threshold ----------------------------------

# Tiles per x flavour: "hp" (weight-only: x in bf16, the weight dequantized in registers) and
# "fp8" (float8 x too: float8 MMAs, the weight tile as the tall operand with swap_ab). K slices
# (split_k) give small N more programs; the sweep times the kernel alone, without the sum of
# the partial sums (which inductor fuses into the consumer in a model). `_distinct_tiles` drops
# the configs the launcher would run as another one at a shape's K.
SWEEP_TILES = {
    "hp": [dict(block_n=32, block_k=bk, split_k=sk, num_warps=4, num_stages=3) for bk in (128, 256, 512)
           for sk in (1, 4)]
    + [dict(block_n=64, block_k=256, split_k=sk, num_warps=4, num_stages=3, swap_ab=True) for sk in (1, 4)],
    "fp8": [dict(block_n=bn, block_k=bk, split_k=sk, num_warps=4, num_stages=4, swap_ab=True)
            for bn in (16, 32, 64, 128) for bk in (256, 512) for sk in (1, 2, 4, 8)]
    + [dict(block_n=64, block_k=bk, split_k=1, num_warps=4, num_stages=st, swap_ab=True) for bk, st in ((512, 2), (128, 3))],
}  # fmt: skip
# Each timed graph cycles through copies of the weight worth this many bytes (more than a large
# GPU's L2 cache), so every call reads its weight from HBM, as in the model.
ROTATE_BYTES = 200 * 2**20
SWEEP_M = (16, 32, 64, 128, 256)
GRAPH_CALLS = 10  # calls per captured CUDA graph: kernel time without launch overhead


def graph_ms(fn, args, device, calls: int = GRAPH_CALLS) -> float:
    """ms per call of `fn`, replayed from a CUDA graph of `calls` calls (CPU: plain)."""
    if device.type != "cuda":
        return time_ms(fn, args, device)
    return time_ms(capture_graph(fn, calls).replay, args, device) / calls


def capture_graph(fn, calls: int) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of `calls` calls of `fn`, after 3 warm-up calls (compiles, autotuning) on a
    side stream outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def sweep(args) -> tuple[list[dict], list[str]]:
    from compile_fp8.kernels.triton_support import triton_available

    device = torch.device(args.device)
    base, cfg = build_model(args, device)
    shapes = sorted({tuple(m.weight.shape) for fqn, m in base.named_modules() if is_body_linear(m, fqn)})
    rows, notes = [], []
    if args.sweep in ("tiles", "all") and not triton_available(device):
        notes.append("tile sweep skipped: the Triton kernel needs CUDA sm89+ and triton")
    elif args.sweep in ("tiles", "all"):
        for n, k in shapes:
            rows += _sweep_tiles(n, k, args, device)
            write(rows, notes, args, "bench_inference_sweep", render_sweep(rows, notes, args))
    if args.sweep in ("m", "all"):
        for n, k in shapes:
            rows += _sweep_m(n, k, args, device)
            write(rows, notes, args, "bench_inference_sweep", render_sweep(rows, notes, args))
    return rows, notes


def _quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 data, hp -> fp8 scale) of `t`, rowwise: the operands a converted layer hands
    the small-M kernel (`quantize_weight` returns the dequantization scale; the kernel divides by
    the quantization scale, its reciprocal)."""
    from compile_fp8.inference.scales import quantize_weight, scale_of_inverse

    data, inv_scale = quantize_weight(t, "rowwise")
    return data, scale_of_inverse(inv_scale)


def _reference_ms(x, xq, w_hp, w, args, device, calls) -> dict:
    """cuBLAS's bf16 mm and `_scaled_mm` (rowwise float8 x) on the sweep's shape, for scale."""
    import itertools

    from compile_fp8.gemm import scaled_mm

    (x_fp8, x_scale) = xq
    refs = {
        "bf16_ms": lambda hp, q: torch.mm(x, hp.t()),
        "scaled_mm_ms": lambda hp, q: scaled_mm(x_fp8, x_scale, q[0].t(), q[1].t(), x.dtype, use_fast_accum=True,
                                                emulate=False),
    }  # fmt: skip
    ref_ms = {}
    for name, fn in refs.items():
        pairs = itertools.cycle(zip(w_hp, w))
        ref_ms[name] = graph_ms(lambda: fn(*next(pairs)), args, device, calls)
    return ref_ms


def _sweep_tiles(n, k, args, device) -> list[dict]:
    """Per flavour ("hp": weight-only, "fp8": float8 x too) the fastest tiles at M = 16, each
    row with cuBLAS's bf16 mm and `_scaled_mm` (rowwise float8 x) on the same shape for scale."""
    copies = 1 if args.small else max(1, -(-ROTATE_BYTES // (n * k)))
    calls = max(GRAPH_CALLS, copies)
    x = torch.randn(16, k, device=device, dtype=torch.bfloat16)
    xq = _quantize(x)  # the activation cast of the rowwise _scaled_mm path
    w_hp = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    w = [_quantize(t) for t in w_hp]
    ref_ms = _reference_ms(x, xq, w_hp, w, args, device, calls)
    results = []
    for flavour in args.sweep_flavours:
        rows = _time_tiles(flavour, x, xq, w, args, device, calls)
        rows = sorted(({"sweep": "tiles", "x": flavour, "n": n, "k": k, "m": 16, "swap_ab": False, **r,
                        "gb_s": n * k / r["ms"] / 1e6, **ref_ms} for r in rows), key=lambda r: r["ms"])  # fmt: skip
        for r in rows[:2]:
            print(f"  [{n}, {k}] x {flavour} best tiles: {r}", file=sys.stderr, flush=True)
        results += rows[:6]
    return results


def _time_tiles(flavour, x, xq, w, args, device, calls) -> list[dict]:
    """The kernel alone at each of SWEEP_TILES[flavour] (the tiles are arguments of its launcher:
    nothing of the package is changed), cycling through the weight copies `w`: tiles and ms."""
    import itertools

    from compile_fp8.kernels.small_m_gemm import _launch_weight_only

    extra = {"x_scale": xq[1]} if flavour == "fp8" else {}
    xin = xq[0] if flavour == "fp8" else x

    def launch(tiles, q):  # split K: the kernel alone, its float32 partial sums unsummed
        return _launch_weight_only(xin, q[0], q[1], None, **tiles, **extra, out_dtype=x.dtype, reduce=False)

    grid = _distinct_tiles(SWEEP_TILES[flavour], x.shape[1])
    if device.type == "cuda":  # compile every config first, several at once (ptxas runs outside the GIL)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda t: _try(launch, t, w[0]), grid))
        torch.cuda.synchronize()
    rows = []
    for tiles in grid:
        weights = itertools.cycle(w)
        try:
            rows.append({**tiles, "ms": graph_ms(lambda: launch(tiles, next(weights)), args, device, calls)})
        except Exception as err:  # e.g. out of shared memory for a large tile
            print(f"  {flavour} tiles {tiles}: {type(err).__name__}", file=sys.stderr)
    return rows


def _try(fn, *args):
    try:
        fn(*args)
    except Exception:  # reported where the config is timed
        pass


def _distinct_tiles(grid: list[dict], k: int) -> list[dict]:
    """`grid` without the configs the launcher would run as another one at this K."""
    from compile_fp8.kernels.small_m_gemm import _launch_blocks

    seen, out = set(), []
    for tiles in grid:
        _, block_k, split_k = _launch_blocks(16, k, tiles)  # what the launcher runs at M = 16
        key = tuple(sorted({**tiles, "block_k": block_k, "split_k": split_k}.items()))
        if key not in seen:
            seen.add(key)
            out.append(dict(key))
    return out


def _sweep_m(n, k, args, device) -> list[dict]:
    """Compiled forward of one converted Linear(k, n) for each path and M; bf16 for reference."""
    from compile_fp8 import Float8Config, compile_fp8

    rows = []
    layer = nn.Linear(k, n, bias=False).to(device, torch.bfloat16).requires_grad_(False)
    paths = {"bf16": None, "weight-only": 10**9, "scaled_mm": 0}
    for path, max_m in paths.items():
        torch._dynamo.reset()
        model = copy.deepcopy(layer)
        if max_m is not None:
            config = Float8Config(mode="inference", recipe="rowwise", weight_only_max_m=max_m, small_m_activation="hp")
            model = compile_fp8(model, config, compile=False)
        compiled = torch.compile(model, dynamic=False)
        for m in SWEEP_M:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            with torch.inference_mode():
                ms = graph_ms(lambda: compiled(x), args, device)
            rows.append({"sweep": "m", "n": n, "k": k, "m": m, "path": path, "ms": ms})
            print(f"  [{n}, {k}] M={m} {path}: {ms:.4f} ms", file=sys.stderr, flush=True)
    return rows


def render_sweep(rows, notes, args) -> str:
    lines = [f"# bench_inference --sweep | {device_name(args.device)} | torch {torch.__version__}", ""]
    lines += ["| N | K | x | swap_ab | block_n | block_k | split_k | warps | stages | ms (M=16) | GB/s | bf16 mm ms | "
              "_scaled_mm ms | vs bf16 |", "|---|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    nan = float("nan")
    for r in (r for r in rows if r["sweep"] == "tiles"):
        lines.append(f"| {r['n']} | {r['k']} | {r.get('x', 'hp')} | {r.get('swap_ab', False)} | {r['block_n']} | {r['block_k']} | "
                     f"{r['split_k']} | {r['num_warps']} | {r['num_stages']} | {r['ms']:.4f} | {r['gb_s']:.0f} | "
                     f"{r.get('bf16_ms', nan):.4f} | {r.get('scaled_mm_ms', nan):.4f} | {r.get('bf16_ms', nan) / r['ms']:.2f}x |")  # fmt: skip
    lines += ["", "| N | K | M | bf16 ms | weight-only ms | scaled_mm ms |", "|---|---|---:|---:|---:|---:|"]
    by_key = {(r["n"], r["k"], r["m"], r["path"]): r["ms"] for r in rows if r["sweep"] == "m"}
    for n, k, m in sorted({key[:3] for key in by_key}):
        cells = [f"{by_key[(n, k, m, p)]:.4f}" if (n, k, m, p) in by_key else "-" for p in ("bf16", "weight-only", "scaled_mm")]
        lines.append(f"| {n} | {k} | {m} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ---- command line -----------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list from {VARIANTS}")
    p.add_argument("--cases", default="prefill,decode", help=f"comma list from {tuple(CASES)}")
    p.add_argument("--modes", default="default,reduce-overhead", help="compile modes to run (where a case has them)")
    p.add_argument("--preset", default="anchor")
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prefill-seq", type=int, default=2048)
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--weight-only-max-m", type=int, default=None, help="Float8Config.weight_only_max_m")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="a one-layer toy model (CI smoke test)")
    p.add_argument("--sweep", nargs="?", const="all", choices=("tiles", "m", "all"),
                   help="time the small-M kernel's tiles (at M=16) and/or each path per M, instead of the model")
    p.add_argument("--sweep-flavours", default=",".join(SWEEP_TILES), help="x flavours the tile sweep runs")
    p.add_argument("--profile", action="store_true",
                   help="also write bench_inference_profile.md: each variant's CUDA kernels per call "
                        "(torch profiler), to see where a step's time goes")
    p.add_argument("--host-profile", action="store_true",
                   help="with --profile: also cProfile the calls on the CPU (where a host-bound step's time goes)")
    add_out_argument(p, "bench_inference", "bench_inference.md and .json (and _profile / _sweep ones)")
    args = p.parse_args(argv)
    for key in ("variants", "cases", "modes", "sweep_flavours"):
        setattr(args, key, [v for v in getattr(args, key).split(",") if v])
    unknown = [v for v in args.variants if v not in VARIANTS]
    unknown += [c for c in args.cases if c not in CASES]
    unknown += [m for m in args.modes if m not in ("default", "reduce-overhead")]
    unknown += [f for f in args.sweep_flavours if f not in SWEEP_TILES]
    if unknown:
        p.error(f"unknown variant(s) or case(s) {unknown}; variants: {','.join(VARIANTS)}; cases: {','.join(CASES)}")
    if args.small:
        args.prefill_batch, args.prefill_seq, args.decode_batch = 2, 32, 4
        args.warmup, args.iters, args.repeats = 1, 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep:
        rows, notes = sweep(args)
        print(write(rows, notes, args, "bench_inference_sweep", render_sweep(rows, notes, args)))
        return 0
    rows, notes = run(args)
    print(write(rows, notes, args))
    failed = [n for n in notes if " failed: " in n]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
