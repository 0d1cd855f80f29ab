"""Where a first training step's compile time goes: bf16 vs compile_fp8 vs torchao.

`bench_train_step.py` reports the first step (compile + one step) as one number; this splits it
with torch._dynamo's own timers (`torch._dynamo.utils.compilation_time_metrics`, the functions
tagged `dynamo_timed`), per variant, after a `torch._dynamo.reset()` and with inductor's caches
turned off (`TORCHINDUCTOR_FORCE_DISABLE_CACHES=1` is set here before torch is imported), so
every variant compiles cold:

* dynamo: tracing the Python (bytecode -> FX graph), `_compile.compile_inner` minus the backend;
* aot: AOT autograd (joint graph, partition; tensor subclasses are desugared here), without
  the inductor forward compile it calls;
* inductor fwd / bwd: lowering, scheduling, code generation and compiling the kernels of each
  graph (`compile_fx...fw_compiler_base` / `bw_compiler`);
* the remainder of the first step (running it, the optimizer, the backward's lazy compile wait).

    python3 scripts/profile_compile.py --out runs/profile_compile      # GPU, the 956M model
    python3 scripts/profile_compile.py --layers 4 --d-model 256 --device cpu   # CPU, small

The counts of graphs and of generated kernels come from dynamo's and inductor's counters, to say
whether a variant compiles longer because it has more to compile or because each piece costs more.

`--out DIR` (default runs/profile_compile) gets profile_compile.md (the table) and
profile_compile.json (its rows), rewritten after every variant.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch._inductor.metrics  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import add_out_argument, device_name, write_results  # noqa: E402
from bench_train_step import convert, make_step, timed  # noqa: E402

VARIANTS = ("bf16", "ours-tensorwise", "ours-rowwise", "torchao-tensorwise", "torchao-rowwise")
# dynamo_timed keys (torch 2.11 / 2.13) -> our column; the first key present wins
PHASES = {
    "dynamo+backend": ("_compile.compile_inner",),
    "backend": ("OutputGraph.call_user_compiler",),
    "aot": ("create_aot_dispatcher_function", "aot_collect_metadata"),
    "inductor fwd": ("compile_fx.<locals>.fw_compiler_base", "compile_fx_forward"),
    "inductor bwd": ("compile_fx.<locals>.bw_compiler", "compile_fx_backward"),
}


def build_model(args, device):
    from compile_fp8.lm.model import TransformerLM, get_preset

    cfg = get_preset("anchor").replace(seq_len=args.seq, n_layers=args.layers)
    if args.d_model:
        cfg = cfg.replace(d_model=args.d_model, d_ff=args.d_model * 11 // 4 // 16 * 16, vocab_size=1024)
    torch.manual_seed(0)
    return TransformerLM(cfg).to(device, torch.bfloat16), cfg


def phase_seconds() -> dict[str, float]:
    metrics = torch._dynamo.utils.compilation_time_metrics
    out = {}
    for name, keys in PHASES.items():
        key = next((k for k in keys if k in metrics), None)
        out[name] = sum(metrics[key]) if key else float("nan")
    return out


def warm_up(device):
    """One tiny compile first, so one-time costs (imports, worker pools) land on no variant."""
    layer = torch.nn.Linear(16, 16).to(device)
    torch.compile(layer)(torch.randn(4, 16, device=device, requires_grad=True)).sum().backward()


def profile_variant(name, base, batch, device) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.compilation_time_metrics.clear()
    torch._dynamo.utils.counters.clear()
    torch._inductor.metrics.reset()
    emulate = True if device.type == "cpu" else None
    model = convert(name, copy.deepcopy(base), batch, emulate)
    first = timed(make_step(model, batch, device), device)
    phases = phase_seconds()
    return {
        "variant": name,
        "first_step_s": first,
        "dynamo_s": phases["dynamo+backend"] - phases["backend"],
        "aot_s": phases["aot"] - phases["inductor fwd"],  # the forward compiles inside AOT
        "inductor_fwd_s": phases["inductor fwd"],
        "inductor_bwd_s": phases["inductor bwd"],
        "rest_s": first - phases["dynamo+backend"] - phases["inductor bwd"],
        "kernels": torch._inductor.metrics.generated_kernel_count,
        "graphs": torch._dynamo.utils.counters["stats"].get("unique_graphs", 0),
    }


def render(rows, args) -> str:
    lines = [
        f"# profile_compile {datetime.datetime.now().isoformat(timespec='seconds')} | "
        f"{device_name(args.device)} | "
        f"torch {torch.__version__} | {args.layers} layers, d_model {args.d_model or 2048}, batch {args.batch} x {args.seq}",
        "",
        "| variant | first step s | dynamo s | aot s | inductor fwd s | inductor bwd s | rest s | kernels | graphs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['first_step_s']:.1f} | {r['dynamo_s']:.1f} | {r['aot_s']:.1f} | "
            f"{r['inductor_fwd_s']:.1f} | {r['inductor_bwd_s']:.1f} | {r['rest_s']:.1f} | {r['kernels']} | {r['graphs']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="bf16,ours-tensorwise,torchao-tensorwise")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=None, help="shrink the anchor model (CPU runs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_out_argument(p, "profile_compile")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choices: {','.join(VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    base, cfg = build_model(args, device)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1)).to(device)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    warm_up(device)
    rows = []
    for name in args.variants:
        rows.append(profile_variant(name, base, batch, device))
        print(f"  {name}: {rows[-1]}", file=sys.stderr, flush=True)
        text = render(rows, args)
        write_results(args.out, "profile_compile", text, {"rows": rows})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
