"""Benchmark forward+backward of one linear layer: bf16 vs compile_fp8 vs torchao.

What it measures
----------------
For each (K, N) shape, one ``nn.Linear(K, N, bias=False)`` (bf16 weight) wrapped
in ``nn.Sequential`` so float8 conversion applies to a child, fed an
``(M, K)`` bf16 input with ``requires_grad=True``. One timed step is: forward,
``out.backward(grad)`` with a pre-made random grad, then all grads set to None.
Every variant gets a fresh deep copy of the same initial layer and is
``torch.compile``'d (``dynamic=False``):

* ``bf16``               plain ``nn.Linear``
* ``ours-tensorwise``    ``compile_fp8(model, Float8Config(recipe="tensorwise"))``
* ``ours-rowwise``       ``compile_fp8(model, Float8Config(recipe="rowwise"))``
* ``torchao-tensorwise`` ``convert_to_float8_training`` with
                         ``Float8LinearConfig.from_recipe_name("tensorwise")``
* ``torchao-rowwise``    same with ``"rowwise"``

On CUDA the step is timed in interleaved rounds (see bench_shape) with
``triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")``, or with
``--timer kernels`` as the sum of its CUDA kernel times (torch profiler, 20 steps): for small
layers, which alone are bound by the host on the clock.
With ``--small`` tiny shapes are run (on CPU when there is no GPU) and timed
with ``time.perf_counter`` over a few iterations; that mode only checks that
the script works.

The result is a markdown table with per-variant milliseconds, our speedup over
bf16 (bf16_ms / ours_ms) and ours vs torchao (torchao_ms / ours_ms; >1 means
compile_fp8 is faster).

How to run
----------
On a CUDA GPU with FP8 (sm89+), torch and torchao installed::

    python scripts/bench_linear.py --out runs/bench_linear

Subsets, and the grid of layer shapes (``--shapes layers``: every K, N in 512 .. 8192 and the
956M model's projections, smallest first; with ``--timer kernels`` it answers "which layer
shapes are faster in FP8?")::

    python scripts/bench_linear.py --variants bf16,ours-tensorwise \\
        --shapes 4096x4096,8192x8192 --m 8192
    python scripts/bench_linear.py --shapes layers --timer kernels --rounds 1 \\
        --variants bf16,ours-tensorwise,ours-rowwise

Smoke test (CPU is fine)::

    python scripts/bench_linear.py --small

``--out DIR`` (default ``runs/bench_linear``) gets ``bench_linear.md`` (the table) and
``bench_linear.json`` (header, rows, notes), rewritten after every shape.

``compile_fp8`` is imported only when an ``ours-*`` variant is requested; a
missing torchao skips the torchao variants with a note. ``main`` returns 0, or
1 when any variant failed (failures are reported and shown as ``err``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import pathlib
import statistics
import sys
import time
import traceback

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    add_out_argument,
    device_name,
    kernel_timeline,
    raise_compile_limits,
    sync,
    versions,
    write_results,
)

VARIANTS = (
    "bf16",
    "ours-tensorwise",
    "torchao-tensorwise",
    "ours-rowwise",
    "torchao-rowwise",
    "ours-static",
    "ours-delayed",
    "ours-triton",
    "ours-tensorwise-fastaccum",
    "ours-rowwise-fastaccum",
)
DEFAULT_M = 16384
DEFAULT_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))
GRID_SIDES = (512, 1024, 2048, 4096, 8192)
MODEL_SHAPES = ((2048, 6144), (2048, 5632), (5632, 2048))  # the 956M model's q/k/v, gate/up, down
SMALL_M = 64
SMALL_SHAPES = ((32, 48), (64, 32))
SMALL_WARMUP, SMALL_ITERS = 2, 5


class Skip(Exception):
    """A variant that cannot run here (e.g. torchao is not installed)."""


# --------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------


def layer_grid() -> list[tuple[int, int]]:
    """Every (K, N) of GRID_SIDES and the MODEL_SHAPES, smallest first (a run cut short by a time
    limit keeps the small shapes, where the answer to "is FP8 faster?" changes)."""
    shapes = set(itertools.product(GRID_SIDES, GRID_SIDES)) | set(MODEL_SHAPES)
    return sorted(shapes, key=lambda kn: (kn[0] * kn[1], kn))


SHAPE_SETS = {"default": lambda: list(DEFAULT_SHAPES), "layers": layer_grid}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """Parse ``"4096x4096,8192x8192"`` into ``[(4096, 4096), (8192, 8192)]``; a name of
    SHAPE_SETS (``"default"``, ``"layers"``) gives that set."""
    if text.strip() in SHAPE_SETS:
        return SHAPE_SETS[text.strip()]()
    shapes = []
    for item in text.split(","):
        k, sep, n = item.strip().lower().partition("x")
        if not sep:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}, want KxN or one of {list(SHAPE_SETS)}")
        shapes.append((int(k), int(n)))
    return shapes


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {bad}; choices: {','.join(VARIANTS)}"
        )
    return [v for v in VARIANTS if v in names]  # canonical order


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark fwd+bwd of one compiled linear: bf16, "
        "compile_fp8 and torchao float8 (tensorwise / rowwise)."
    )
    p.add_argument("--small", action="store_true",
                   help="tiny shapes and a perf_counter timer (smoke test)")
    p.add_argument("--device", default=None,
                   help="default: cuda if available else cpu")
    p.add_argument("--variants", type=parse_variants, default=list(VARIANTS),
                   help=f"comma list from: {','.join(VARIANTS)}")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma list of KxN, e.g. 4096x4096,8192x8192, or a named set: default (four "
                        "large shapes, used without --shapes) or layers (every K, N in 512 .. 8192 "
                        "and the 956M model's projections, smallest first)")
    p.add_argument("--m", type=int, default=None,
                   help=f"tokens (default {DEFAULT_M}, {SMALL_M} with --small)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds per variant on CUDA (median taken)")
    p.add_argument("--rep-ms", type=int, default=60,
                   help="milliseconds of repetitions per do_bench call")
    p.add_argument("--timer", choices=("wall", "kernels"), default="wall",
                   help="wall: do_bench's clock time of the step; kernels: the sum of its CUDA "
                        "kernel times from the profiler (what a layer costs inside a model whose "
                        "GPU queue stays full; small layers alone are host-bound on the clock)")
    add_out_argument(p, "bench_linear")
    p.add_argument("--fail-fast", action="store_true",
                   help="re-raise the first variant error instead of going on")
    return p


# --------------------------------------------------------------------------
# model variants
# --------------------------------------------------------------------------


def make_base(k: int, n: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(k, n, bias=False)).to(device, torch.bfloat16)


def import_torchao_float8():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise Skip(f"torchao not importable ({e})") from None
    return Float8LinearConfig, convert_to_float8_training


def build_variant(name: str, base: nn.Module, x: torch.Tensor) -> nn.Module:
    """Fresh deep copy of ``base`` converted and compiled for ``name``.

    ours-static is calibrated on ``x`` (tensorwise, static input and weight scales, dynamic
    grads); ours-delayed is tensorwise with a 16-step amax history; ours-triton is tensorwise
    with ``Float8Config(cast_kernels="triton")``; ``-fastaccum``: ``Float8Config(fast_accum="all")``.
    """
    model = copy.deepcopy(base)
    if name == "bf16":
        return torch.compile(model, dynamic=False)
    kind, recipe, *flags = name.split("-")
    if kind == "ours":
        from compile_fp8 import Float8Config, calibrate, compile_fp8  # lazy on purpose

        if recipe == "triton":  # tensorwise with the Triton amax / dual-layout cast kernels
            return compile_fp8(model, Float8Config(cast_kernels="triton"), dynamic=False)
        if recipe in ("static", "delayed"):
            model = compile_fp8(model, Float8Config(scaling=recipe), dynamic=False)
            if recipe == "static":
                calibrate(model, [x.detach()])
            return model
        fast_accum = "all" if flags == ["fastaccum"] else "forward"
        return compile_fp8(model, Float8Config(recipe=recipe, fast_accum=fast_accum), dynamic=False)
    config_cls, convert = import_torchao_float8()
    model = convert(model, config=config_cls.from_recipe_name(recipe))
    return torch.compile(model, dynamic=False)


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------


def make_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    params = list(model.parameters())

    def step():
        out = model(x)
        out.backward(grad)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def time_simple(fn, device: str) -> float:
    """Median ms of a few iterations after a short warmup (smoke test only)."""
    for _ in range(SMALL_WARMUP):
        fn()
    sync(device)
    times = []
    for _ in range(SMALL_ITERS):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_do_bench(fn, device: str, rep_ms: int = 100) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def time_kernels(fn, steps: int = 20) -> float:
    """ms of CUDA kernel time per call of `fn` (profiler, `steps` calls): no launch or host time."""
    return sum(us for _, _, us in kernel_timeline(fn, steps)) / steps / 1e3


def time_step(step, args) -> float:
    if args.small:
        return time_simple(step, args.device)
    if args.timer == "kernels":
        return time_kernels(step)
    return time_do_bench(step, args.device, args.rep_ms)


def build_step(name, base, x, grad, args):
    """The compiled step of one variant, run twice so compilation stays out of the timing."""
    step = make_step(build_variant(name, base, x), x, grad)
    for _ in range(2):
        step()
    sync(args.device)
    return step


def bench_shape(k, n, args, notes: list[str]) -> dict:
    """Time every requested variant on one (K, N); ms or None per variant.

    On CUDA the variants are timed in `--rounds` interleaved rounds (A B C, A B C, ...) and each
    variant's result is the median of its rounds, so clock or thermal drift during the run
    does not favour whichever variant happened to run first.
    """
    dev = args.device
    base = make_base(k, n, dev)
    x = torch.randn(args.m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.m, n, device=dev, dtype=torch.bfloat16)
    row = {"M": args.m, "K": k, "N": n, "ms": {}, "errors": {}}
    steps = {}
    for name in args.variants:
        try:
            steps[name] = build_step(name, base, x, grad, args)
        except Skip as e:
            row["ms"][name] = None
            add_note(notes, f"skipped {name}: {e}")
        except Exception as e:  # report and go on with the other variants
            if args.fail_fast:
                raise
            row["ms"][name] = None
            row["errors"][name] = "".join(traceback.format_exception_only(e)).strip()
            add_note(notes, f"{name} failed on K={k} N={n}: {row['errors'][name]}")
    rounds = {name: [] for name in steps}
    for _ in range(1 if args.small else args.rounds):
        for name, step in steps.items():
            rounds[name].append(time_step(step, args))
    for name, times in rounds.items():
        row["ms"][name] = statistics.median(times)
        print(f"  {k}x{n} {name}: {fmt_ms(row['ms'][name])} ms (rounds {times})", file=sys.stderr)
    del steps
    free_memory(dev)
    return row


def add_note(notes: list[str], note: str) -> None:
    if note not in notes:
        notes.append(note)
        print(f"note: {note}", file=sys.stderr)


def free_memory(device: str) -> None:
    """After a shape: drop its compiled code too. Each shape recompiles every variant's forward;
    without a reset dynamo's per-function cache limit is reached after ~21 shapes x 3 variants and
    the later shapes silently run eager (and slow)."""
    torch._dynamo.reset()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------

COLUMNS = (
    "K", "N", "bf16 ms", "ours tw ms", "torchao tw ms", "ours rw ms",
    "torchao rw ms", "tw speedup vs bf16", "rw speedup vs bf16",
    "tw torchao/ours", "rw torchao/ours",
    "ours static ms", "ours delayed ms", "static: torchao tw/ours", "delayed: torchao tw/ours",
    "ours triton ms", "triton: torchao tw/ours",
)


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def ratio(num, den) -> str:
    if num is None or den is None or den == 0:
        return "-"
    return f"{num / den:.2f}x"


def table_row(row: dict) -> list[str]:
    ms = row["ms"]

    def cell(name):
        return "err" if name in row["errors"] else fmt_ms(ms.get(name))

    bf16, otw, orw = ms.get("bf16"), ms.get("ours-tensorwise"), ms.get("ours-rowwise")
    atw, arw = ms.get("torchao-tensorwise"), ms.get("torchao-rowwise")
    return [
        str(row["K"]), str(row["N"]), cell("bf16"), cell("ours-tensorwise"),
        cell("torchao-tensorwise"), cell("ours-rowwise"), cell("torchao-rowwise"),
        ratio(bf16, otw), ratio(bf16, orw), ratio(atw, otw), ratio(arw, orw),
        cell("ours-static"), cell("ours-delayed"),
        ratio(atw, ms.get("ours-static")), ratio(atw, ms.get("ours-delayed")),
        cell("ours-triton"), ratio(atw, ms.get("ours-triton")),
    ]


def header(args) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(args.device),
        "versions": versions(),
        "M": args.m,
        "timer": "perf_counter (small)" if args.small else (
            "CUDA kernel time per step (profiler)" if args.timer == "kernels" else "do_bench median"),
    }


def render(meta: dict, rows: list[dict], notes: list[str]) -> str:
    v = meta["versions"]
    lines = [
        f"# bench_linear {meta['date']} | {meta['device']} | torch {v['torch']}"
        f" | triton {v['triton']} | torchao {v['torchao']}",
        "",
        f"fwd+bwd of one bias-free bf16 linear, M={meta['M']}, timer: "
        f"{meta['timer']}; speedup = bf16_ms/ours_ms, torchao/ours = "
        "torchao_ms/ours_ms (>1: ours faster)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
    lines += [""] + [f"- note: {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def resolve_defaults(args) -> None:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.m is None:
        args.m = SMALL_M if args.small else DEFAULT_M
    if args.shapes is None:
        args.shapes = list(SMALL_SHAPES if args.small else DEFAULT_SHAPES)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    resolve_defaults(args)
    raise_compile_limits()
    meta = header(args)
    notes: list[str] = []
    rows = []
    for k, n in args.shapes:
        rows.append(bench_shape(k, n, args, notes))
        text = render(meta, rows, notes)
        write_results(args.out, "bench_linear", text, {**meta, "rows": rows, "notes": notes})
    print(text, end="")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
