"""Where does one LM training step's GPU time go? Kernel time per category, per variant.

    python3 scripts/profile_train_step.py --layers 2 [--variants bf16,ours-tensorwise,torchao-tensorwise]

Builds bench_train_step's model (the 956M `anchor` preset's shapes; `--layers` cuts its depth so
it compiles fast: every layer runs the same kernels), profiles `--steps` steps after warm-up and
sums CUDA kernel time into categories: GEMMs (cuBLAS), attention, amax reductions, float8 casts,
other inductor kernels, optimizer, other. Per step, in ms, plus each variant's top kernels.
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


@bench_train_step.in_experiment  # a variant may carry +EXPERIMENT (bench_train_step.py)
def profile_variant(name, base, batch, args, device) -> tuple[dict, list]:
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
    return per_cat, [(k, us / args.steps / 1e3) for k, us in top]


def build_batch(args, device):
    """bench_train_step's model cut to `--layers` layers, and one batch of random tokens."""
    targs = bench_train_step.parse_args(["--small"] if args.small else [])
    base, cfg = bench_train_step.build_model(targs, device, n_layers=args.layers)
    return base, bench_train_step.random_batch(cfg.vocab_size, targs.batch, targs.seq, device)


def render(cats: dict, tops: dict, args, batch) -> str:
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
    cats, tops = {}, {}
    for name in args.variants.split(","):
        cats[name], tops[name] = profile_variant(name, base, batch, args, device)
        text = render(cats, tops, args, batch)
        write_results(args.out, "profile_train_step", text, {"categories_ms": cats, "top_kernels_ms": tops})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
