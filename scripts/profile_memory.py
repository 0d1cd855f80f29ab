"""What holds the GPU memory at the peak of one LM training step? Per variant, per allocation site.

    python3 scripts/profile_memory.py --out DIR [--variants bf16,ours-tensorwise,torchao-tensorwise] [--layers N]

Builds bench_train_step's model (the 956M `anchor` preset, all 16 layers unless `--layers`; the
same `--preset`, `--batch`, `--seq` as bench_train_step) and, per variant, runs two steps to
compile and warm up, then records one step with torch's CUDA memory history
(`torch.cuda.memory._record_memory_history`). From that trace it finds the moment the tensors
allocated during the step take the most memory, and lists what is alive then, grouped by where
it was allocated: a line of Python (model code, or the wrapper code inductor generated for a
compiled graph, shown with its source line: the buffer's shape and dtype), largest first.

Memory allocated before the step (parameters, optimizer states, buffers that outlive a step) is
reported as one number, "before the step"; the step's peak is that plus the largest sum of live
step allocations, which is what `torch.cuda.max_memory_allocated` reports for the step. Compare
variants by the table; the sites say which tensors make the difference.

`--out DIR` (default runs/profile_memory) gets profile_memory.md (the table and each variant's
top sites) and profile_memory.json. Needs a CUDA GPU (and FP8, sm89+, for the FP8 variants).
"""

from __future__ import annotations

import argparse
import copy
import linecache
import pathlib
import sys
from collections import defaultdict

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_train_step  # noqa: E402
from _bench_common import add_out_argument, device_name, write_results  # noqa: E402

TORCH_DIR = str(pathlib.Path(torch.__file__).resolve().parent)
FREES = ("free_requested", "free_completed")


def allocation_site(frames: list[dict]) -> str:
    """The innermost frame outside torch's own package (model code, or inductor's generated
    wrapper of a compiled graph), with its source line; the innermost frame if all are torch's."""
    if not frames:
        return "(no Python frame)"
    outside = [f for f in frames if not str(f.get("filename", "")).startswith(TORCH_DIR)]
    frame = (outside or frames)[0]
    filename, line = str(frame.get("filename", "?")), int(frame.get("line", 0))
    source = linecache.getline(filename, line).strip() if line else ""
    where = f"{pathlib.Path(filename).name}:{line} ({frame.get('name', '?')})"
    return f"{where}  {source[:120]}" if source else where


def peak_breakdown(events: list[dict], top: int = 20) -> dict:
    """From a memory trace (dicts with action, addr, size, frames): the largest sum of the
    allocations alive at once, and what was alive then, by allocation site.

    Only allocations made inside the trace count: one freed in the trace but allocated before it
    is ignored (it belongs to "before the step").
    """
    live: dict[int, tuple[int, int]] = {}  # addr -> (size, index of its alloc event)
    total = peak = 0
    peak_live: dict[int, tuple[int, int]] = {}
    for index, event in enumerate(events):
        action, addr = event.get("action"), event.get("addr")
        if action == "alloc":
            live[addr] = (int(event["size"]), index)
            total += int(event["size"])
            if total > peak:
                peak, peak_live = total, dict(live)
        elif action in FREES and addr in live:
            total -= live.pop(addr)[0]
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # site -> [bytes, count]
    for size, index in peak_live.values():
        site = by_site[allocation_site(events[index].get("frames") or [])]
        site[0] += size
        site[1] += 1
    sites = sorted(by_site.items(), key=lambda kv: -kv[1][0])
    return {
        "peak_bytes": peak,
        "alive_at_peak": len(peak_live),
        "sites": [{"site": s, "bytes": b, "count": n} for s, (b, n) in sites[:top]],
        "other_sites_bytes": sum(b for _, (b, _n) in sites[top:]),
    }


def trace_one_step(step, device) -> tuple[list[dict], int]:
    """The memory trace of one call of `step` and the bytes allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    traces = snapshot.get("device_traces") or [[]]
    return list(traces[device.index or 0]), before


@bench_train_step.in_experiment  # a variant may carry +EXPERIMENT (bench_train_step.py)
def profile_variant(name, base, batch, args, device) -> dict:
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    model = bench_train_step.convert(name, copy.deepcopy(base), batch, emulate=None)
    step = bench_train_step.make_step(model, batch, device, bench_train_step.weight_refresh(name))
    for _ in range(2):
        step()
    torch.cuda.reset_peak_memory_stats(device)
    events, before = trace_one_step(step, device)
    result = peak_breakdown(events, args.top)
    result["before_bytes"] = before
    result["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    del model, step
    return result


def render(results: dict, args, batch, device) -> str:
    gib = 2**30
    lines = [
        f"# profile_memory: {device_name(device)}, preset {args.preset}, {args.layers or 'all'} layers, "
        f"batch {batch[0].shape[0]} x {batch[0].shape[1]}", "",
        "| variant | before the step GiB | step allocations at peak GiB | peak GiB | max_memory_allocated GiB |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['before_bytes'] / gib:.2f} | {r['peak_bytes'] / gib:.2f} | "
            f"{(r['before_bytes'] + r['peak_bytes']) / gib:.2f} | {r['max_memory_allocated'] / gib:.2f} |"
        )
    for name, r in results.items():
        lines += ["", f"## {name}: alive at the peak ({r['alive_at_peak']} allocations), by site", ""]
        lines += [f"- {s['bytes'] / 2**20:9.1f} MiB  x{s['count']:<4d} {s['site']}" for s in r["sites"]]
        lines.append(f"- {r['other_sites_bytes'] / 2**20:9.1f} MiB  other sites")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="bf16,ours-tensorwise,ours-tensorwise-model,torchao-tensorwise")
    p.add_argument("--preset", default="anchor")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--layers", type=int, default=0, help="cut the model to this many layers (0: all)")
    p.add_argument("--top", type=int, default=20, help="allocation sites listed per variant")
    add_out_argument(p, "profile_memory")
    p.set_defaults(small=False)  # bench_train_step.build_model's toy model: not here
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bench_train_step.check_variants(p, args.variants)
    if not torch.cuda.is_available():
        print("profile_memory.py traces CUDA memory; no GPU here", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    base, cfg = bench_train_step.build_model(args, device, n_layers=args.layers)
    batch = bench_train_step.random_batch(cfg.vocab_size, args.batch, args.seq, device)
    results = {}
    for name in args.variants:
        results[name] = profile_variant(name, base, batch, args, device)
        text = render(results, args, batch, device)
        write_results(args.out, "profile_memory", text, results)
        print(text.splitlines()[len(results) + 3], flush=True)  # this variant's table row
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
