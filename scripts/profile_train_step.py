"""Where does one LM training step's GPU time go? Kernel time per category, per variant.

    python3 scripts/profile_train_step.py --layers 2 [--variants bf16,ours-tensorwise,torchao-tensorwise]

Builds bench_train_step's model (the 956M `anchor` preset's shapes; `--layers` cuts its depth so
it compiles fast: every layer runs the same kernels), profiles `--steps` steps after warm-up and
sums CUDA kernel time into categories: GEMMs (cuBLAS), attention, amax reductions, float8 casts,
other inductor kernels, optimizer, other. Per step, in ms, plus each variant's top kernels, and
the GPU's idle time: the stretches between the profiled steps' first and last kernel when no
kernel ran, with the kernels on either side of the largest ones (where the GPU waited: for the
host, a sync, or the profiler's own per-launch overhead, which adds a little to every gap).
Variants are bench_train_step's (with its `+EXPERIMENT` suffixes). Needs a CUDA GPU with FP8
(sm89+); `--small` is a CPU smoke run of a toy model (top-level CPU ops instead of kernels).

`--out DIR` (default runs/profile_train_step) gets profile_train_step.md (the category table
and the top kernels) and profile_train_step.json (ms per step per category and kernel).
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_train_step  # noqa: E402
from _bench_common import add_out_argument, write_results  # noqa: E402

CATEGORIES = (  # first match wins; names lower-cased
    ("gemm", ("nvjet", "gemm", "xmma", "cutlass", "sm90_", "cublas")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("amax", ("abs_max", "amax")),
    ("fp8 cast", ("clamp",)),
    ("other inductor", ("triton_",)),
)


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(key in low for key in keys):
            return label
    return "other"


def kernel_times(prof, device) -> dict[str, float]:
    """Kernel name -> total microseconds: CUDA kernels, or (CPU smoke run) top-level CPU ops."""
    times: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if device.type == "cpu":
            if event.cpu_parent is None:
                times[event.name] += event.cpu_time_total
        elif str(getattr(event, "device_type", "")).endswith("CUDA"):
            times[event.name] += event.device_time if hasattr(event, "device_time") else event.cuda_time
    return times


def idle_gaps(prof, steps: int, top: int = 12) -> dict:
    """GPU idle time per step: the span from the first kernel to the last, less the time some
    kernel ran. Each gap is named by the kernels before and after it; the `top` largest pairs."""
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in prof.events()
        if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > e.time_range.start
    )
    if not spans:
        return {"span_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    by_pair: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    end, last = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            pair = by_pair[(last[:60], name[:60])]
            pair[0] += (start - end) / steps / 1e3
            pair[1] += 1
        if stop >= end:
            end, last = stop, name
    span = (end - spans[0][0]) / steps / 1e3
    idle = sum(ms for ms, _ in by_pair.values())
    gaps = sorted(((ms, n / steps, a, b) for (a, b), (ms, n) in by_pair.items()), reverse=True)[:top]
    return {"span_ms": span, "idle_ms": idle, "gaps": gaps}


@bench_train_step.in_experiment  # a variant may carry +EXPERIMENT (bench_train_step.py)
def profile_variant(name, base, batch, args, device) -> tuple[dict, list, dict]:
    torch._dynamo.reset()
    emulate = True if device.type == "cpu" else None
    model = bench_train_step.convert(name, copy.deepcopy(base), batch, emulate)
    step = bench_train_step.make_step(model, batch, device, bench_train_step.weight_refresh(name))
    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(args.steps):
            step()
        sync()
    times = kernel_times(prof, device)
    per_cat: dict[str, float] = defaultdict(float)
    for kernel, us in times.items():
        per_cat[category(kernel)] += us / args.steps / 1e3
    top = sorted(times.items(), key=lambda kv: -kv[1])[: args.top]
    idle = idle_gaps(prof, args.steps) if device.type == "cuda" else {}
    return per_cat, [(k, us / args.steps / 1e3) for k, us in top], idle


def build_batch(args, device):
    """bench_train_step's model cut to `--layers` layers, and one batch of random tokens."""
    targs = bench_train_step.parse_args(["--small"] if args.small else [])
    base, cfg = bench_train_step.build_model(targs, device, n_layers=args.layers)
    return base, bench_train_step.random_batch(cfg.vocab_size, targs.batch, targs.seq, device)


def render_idle(idle: dict) -> list[str]:
    """A variant's idle-time lines: span and idle ms per step, then the largest gaps."""
    if not idle:
        return []
    lines = [f"GPU span {idle['span_ms']:.2f} ms per step, idle {idle['idle_ms']:.2f} ms; largest gaps "
             "(ms per step, gaps per step, kernel before -> kernel after):", ""]
    lines += [f"- {ms:7.3f} {n:5.1f}  {a} -> {b}" for ms, n, a, b in idle["gaps"]]
    return lines + [""]


def render(cats: dict, tops: dict, args, batch, idles: dict) -> str:
    """The category table (ms per step, one column per variant), then each variant's top kernels."""
    head = [f"# profile_train_step: anchor shape, {args.layers} layers, batch {batch[0].shape[0]} x "
            f"{batch[0].shape[1]}, CUDA kernel ms per step", "",
            "| category | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]  # fmt: skip
    for label in [c for c, _ in CATEGORIES] + ["other", "total"]:
        vals = [sum(c.values()) if label == "total" else c.get(label, 0.0) for c in cats.values()]
        head.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    lines = []
    for name, top in tops.items():
        lines += [f"## {name}: top kernels (ms per step)", ""]
        lines += [f"- {ms:8.3f}  {category(k):14s} {k[:110]}" for k, ms in top] + [""]
        lines += render_idle(idles.get(name, {}))
    return "\n".join(head + [""] + lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="bf16,ours-tensorwise,torchao-tensorwise")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    add_out_argument(p, "profile_train_step")
    p.add_argument("--small", action="store_true", help="toy model, on CPU if no GPU (smoke test)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        print("profile_train_step.py profiles CUDA kernels; no GPU here (--small: a CPU smoke run)",
              file=sys.stderr)
        return 2
    base, batch = build_batch(args, device)
    cats, tops, idles = {}, {}, {}
    for name in args.variants.split(","):
        cats[name], tops[name], idles[name] = profile_variant(name, base, batch, args, device)
        text = render(cats, tops, args, batch, idles)
        write_results(args.out, "profile_train_step", text,
                      {"categories_ms": cats, "top_kernels_ms": tops, "gpu_idle": idles})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
