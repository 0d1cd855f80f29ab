"""Benchmark one LM training step: bf16 vs compile_fp8 vs torchao, all in one process.

The default model is the 956M Llama-style LM of compile_fp8.lm (`anchor` preset: 16 layers,
d_model 2048, 16 heads, SwiGLU 5632, vocab 32768, LM head kept in bf16), batch 8 x 2048 tokens,
bf16 parameters, fused AdamW, SDPA attention, torch.compile. For every variant it builds the
same model from the same seed, compiles it, and reports:

* first step seconds (compilation + one step), step ms (median of `--steps` timed steps after
  `--warmup`, each synchronized), tokens/s, speed-up over bf16, back-to-back ms (the mean step
  of `--steps` steps launched one after another with one synchronization at the end, as a
  training loop runs them: the host launches a step while the GPU still runs the one before),
  peak memory of the steps (torch.cuda.max_memory_allocated from the first step on:
  `calibrate`'s eager high-precision passes are not counted).

Variants: bf16 (whole-model torch.compile), bf16-regional (each block compiled in place; the final
norm, head and loss compiled as one more region: `TransformerLM.compile_loss`), ours-tensorwise
(compile_fp8's default, regional compile, with that region compiled as well),
ours-tensorwise-model (`compile="model"`: one whole-model compile), ours-rowwise, ours-static
(calibrated on one batch; weight scales refreshed after every optimizer step, whose cost is also
timed alone), ours-staticgrads (the same with `static_grads=True`: calibrated grad_output scales
too), ours-delayed (its histories seeded by `calibrate` on one batch, gradients too),
ours-tensorwise-fastaccum, ours-rowwise-fastaccum and ours-staticgrads-fastaccum
(`fast_accum="all"`: fast accumulation in the gradient GEMMs too),
ours-staticgrads-fastaccum-model (the same in one whole-model compile),
ours-staticgrads-fastaccum-stepweights[-model] (`static_weights=False`: each weight's amax
measured inside the step, no `refresh_weight_scales`), ours-staticgrads-fastaccum-prevweights
(`static_weights="previous"`: each weight cast with the amax its previous step's forward
measured, this step's measured in the step for the next), ours-tensorwise-fp8saved and
ours-staticgrads-fastaccum-fp8saved (`saved_activations="fp8"`: float8 activations kept for
backward), ours-staticgrads-fastaccum-e5m2saved (`saved_activations="e5m2"`: kept as unscaled
float8 e5m2, no amax pass), ours-triton (tensorwise, `cast_kernels="triton"`),
ours-tensorwise-auto and ours-rowwise-auto (`layer_filter="auto"`: only the layer shapes measured faster in FP8),
torchao-tensorwise, torchao-rowwise (skipped with a note when torchao is missing). Any variant can
take experiments as suffixes, `VARIANT+EXPERIMENT[+EXPERIMENT...]` (e.g. bf16+cdt,
ours-staticgrads+nd+cg), most of them inductor's own settings: "cdt" coordinate-descent tuning
of its generated kernels (slower compile), "nd" N-d tiling of pointwise kernels
(triton.prefer_nd_tiling), "tr" the same plus tiled reductions, "mapw" autotuned pointwise kernels (max_autotune_pointwise), "nomix" no mixed-order
reductions (triton.mix_order_reduction off), "cg" CUDA graphs (triton.cudagraphs, what
torch.compile's mode="reduce-overhead" turns on: each compiled graph replayed as one launch),
"pin" each linear's float8 input kept for its weight-gradient GEMM where the forward cast it with
a known scale (static scaling), instead of re-cast in backward from a high-precision tensor
(`linear_fn.SAVE_FLOAT8_INPUTS`, read while tracing: run it with compile caches off,
TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, or a cached graph of the other setting may serve it),
"attnhp" (with -fp8saved or -e5m2saved) attention's q, k, v and output left in bf16 by the
activation-quantization pass (`saved_activations.attention_kept_in_high_precision`; caches off
as for "pin").

On a CUDA GPU with FP8 (sm89+), torch and torchao installed:

    python3 scripts/bench_train_step.py --out runs/bench_train_step
    python3 scripts/bench_train_step.py --variants bf16,ours-tensorwise --preset medium --batch 16 --seq 1024

`--out DIR` (default runs/bench_train_step) gets bench_train_step.md (the table) and
bench_train_step.json (its rows and notes), rewritten after every variant.

On CPU, `--small` runs a one-layer toy model for a few steps so CI can check the script works
(its timings mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import add_out_argument, device_name, try_variant, write_results  # noqa: E402

VARIANTS = (
    "bf16",
    "bf16-regional",
    "ours-tensorwise",
    "ours-tensorwise-model",
    "ours-rowwise",
    "ours-static",
    "ours-staticgrads",
    "ours-delayed",
    "ours-tensorwise-fastaccum",
    "ours-rowwise-fastaccum",
    "ours-staticgrads-fastaccum",
    "ours-staticgrads-fastaccum-model",
    "ours-staticgrads-fastaccum-stepweights",
    "ours-staticgrads-fastaccum-stepweights-model",
    "ours-staticgrads-fastaccum-prevweights",
    "ours-tensorwise-fp8saved",
    "ours-staticgrads-fastaccum-fp8saved",
    "ours-staticgrads-fastaccum-e5m2saved",
    "ours-triton",
    "ours-tensorwise-auto",
    "ours-rowwise-auto",
    "torchao-tensorwise",
    "torchao-rowwise",
)


def _attention_kept_in_high_precision():
    from compile_fp8 import saved_activations

    return saved_activations.attention_kept_in_high_precision()


# VARIANT+EXPERIMENT: a context (torch's own settings) the variant compiles and runs in
EXPERIMENTS = {
    "cdt": lambda: torch._inductor.config.patch(coordinate_descent_tuning=True),
    "nd": lambda: torch._inductor.config.patch({"triton.prefer_nd_tiling": True}),
    "tr": lambda: torch._inductor.config.patch({"triton.prefer_nd_tiling": True, "triton.tile_reductions": True}),
    "mapw": lambda: torch._inductor.config.patch(max_autotune_pointwise=True),
    "nomix": lambda: torch._inductor.config.patch({"triton.mix_order_reduction": False}),
    "cg": lambda: torch._inductor.config.patch({"triton.cudagraphs": True}),
    "pin": lambda: _patched("compile_fp8.training.linear_fn", SAVE_FLOAT8_INPUTS=True),
    "attnhp": _attention_kept_in_high_precision,
}


def _patched(module: str, **settings):
    """A context that sets `settings` on `module` while it lasts."""
    import importlib
    from unittest import mock

    return mock.patch.multiple(importlib.import_module(module), **settings)


def check_variants(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """parser.error (exit 2) naming the variants that are not VARIANT[+EXPERIMENT]."""
    unknown = [v for v in names
               if split_variant(v)[0] not in VARIANTS or not set(split_variant(v)[1]) <= set(EXPERIMENTS)]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choices: {','.join(VARIANTS)}, "
                     f"each optionally +EXPERIMENT(+EXPERIMENT...) from {','.join(EXPERIMENTS)}")


def split_variant(name: str, sep: str = "+") -> tuple[str, tuple[str, ...]]:
    """"ours-tensorwise+cdt+nd" -> ("ours-tensorwise", ("cdt", "nd")); no suffix -> (name, ())."""
    base, *experiments = name.split(sep)
    return base, tuple(experiments)


def not_head(module, fqn: str) -> bool:
    return fqn != "head"  # the LM head stays bf16


def build_model(args, device, n_layers: int = 0):
    """The `--preset` LM in bf16 (cut to `n_layers` layers when given) and its config."""
    from compile_fp8.lm.model import TransformerLM, get_preset

    cfg = get_preset(args.preset).replace(seq_len=args.seq)
    if args.small:
        cfg = cfg.replace(vocab_size=256, d_model=64, n_layers=1, n_heads=4, d_ff=176)
    if n_layers:
        cfg = cfg.replace(n_layers=n_layers)
    torch.manual_seed(0)
    return TransformerLM(cfg).to(device, torch.bfloat16), cfg


def random_batch(vocab_size: int, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets), each [batch, seq]: random tokens, the same ones in every run (seed 1)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, vocab_size, (batch, seq + 1), generator=gen).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def convert(name: str, model, batch, emulate):
    """`model` converted and compiled as variant `name`."""
    if name == "bf16":
        return torch.compile(model)
    if name == "bf16-regional":  # each transformer block compiled in place, as compile_fp8 does
        for block in model.blocks:
            block.compile()
        return model.compile_loss()
    kind, what, *flags = name.split("-")
    if kind == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(what)
        return torch.compile(convert_to_float8_training(model, config=config, module_filter_fn=not_head))
    from compile_fp8 import Float8Config, calibrate, compile_fp8

    fast_accum = "all" if "fastaccum" in flags else "forward"
    static_weights = "stepweights" not in flags  # the weight amax measured in the step instead
    if "prevweights" in flags:  # the cast uses the amax the previous step's forward measured
        static_weights = "previous"
    # float8 activations kept for backward: -fp8saved, -e5m2saved
    saved = next((f.removesuffix("saved") for f in flags if f.endswith("saved")), "hp")
    common = dict(emulate=emulate, fast_accum=fast_accum, saved_activations=saved)
    if what == "static":
        config = Float8Config(scaling=what, static_weights=static_weights, **common)
    elif what == "delayed":
        config = Float8Config(scaling=what, **common)
    elif what == "staticgrads":  # static scales for grad_output too: no amax pass at all
        config = Float8Config(scaling="static", static_grads=True, static_weights=static_weights, **common)
    elif what == "triton":  # tensorwise with the Triton amax / dual-layout cast kernels
        config = Float8Config(cast_kernels="triton", emulate=emulate)
    else:
        layer_filter = "auto" if "auto" in flags else "all"
        config = Float8Config(recipe=what, layer_filter=layer_filter, **common)
    how = "model" if "model" in flags else True  # default: regional (each block in place)
    compiled = compile_fp8(model, config, module_filter_fn=not_head, compile=how)
    if how is True:  # the blocks compiled one by one: norm, head and loss as one more region
        compiled.compile_loss()
    if what == "static":
        calibrate(compiled, [batch[0]])
    elif what in ("staticgrads", "delayed"):  # the model returns the loss given targets: backward it
        calibrate(compiled, [batch], loss_fn=lambda loss, _: loss)
    return compiled


def weight_refresh(name: str):
    """`refresh_weight_scales` for the variants whose static weight scales are read from their
    buffers (static, staticgrads and their -flags, but -stepweights and -prevweights), else None."""
    kind_what, flags = name.split("-")[:2], name.split("-")[2:]
    in_step = "stepweights" in flags or "prevweights" in flags
    if kind_what in (["ours", "static"], ["ours", "staticgrads"]) and not in_step:
        from compile_fp8 import refresh_weight_scales

        return refresh_weight_scales
    return None


def make_step(model, batch, device, refresh=None):
    """One training step; `refresh` (static scaling: `refresh_weight_scales`) runs after
    `opt.step()`, as a user keeps static weight scales exact."""
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    tokens, targets = batch

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs ("+cg"); else a no-op
        loss = model(tokens, targets)
        loss.backward()
        opt.step()
        if refresh is not None:
            refresh(model)
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def timed(fn, device) -> float:
    """Seconds of one call, synchronized."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def in_experiment(fn):
    """`fn(name, ...)` for a variant that may carry `+EXPERIMENT` suffixes: `fn` gets the plain
    name and runs (compiles too) inside the experiments' contexts."""

    def wrapped(name, *args, **kwargs):
        name, experiments = split_variant(name)
        with contextlib.ExitStack() as stack:
            for experiment in experiments:
                stack.enter_context(EXPERIMENTS[experiment]())
            return fn(name, *args, **kwargs)

    return wrapped


@in_experiment
def bench_variant(name, base, batch, args, device) -> dict:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    emulate = True if device.type == "cpu" else None  # CPU _scaled_mm is a slow reference kernel
    refresh = weight_refresh(name)
    model = convert(name, copy.deepcopy(base), batch, emulate)
    if device.type == "cuda":  # the step's peak, not calibrate's eager high-precision passes
        torch.cuda.reset_peak_memory_stats()
    step = make_step(model, batch, device, refresh)
    first_s = timed(step, device)
    for _ in range(args.warmup):
        step()
    times = [timed(step, device) for _ in range(args.steps)]
    ms = statistics.median(times) * 1e3
    back_to_back_ms = timed(lambda: [step() for _ in range(args.steps)], device) / args.steps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    row = {"first_step_s": first_s, "step_ms": ms, "tokens_per_s": batch[0].numel() / ms * 1e3,
           "back_to_back_ms": back_to_back_ms, "peak_gib": peak}
    if refresh is not None:  # what keeping the weight scales exact costs per step (in step_ms)
        row["refresh_ms"] = statistics.median(timed(lambda: refresh(model), device) for _ in range(5)) * 1e3
    return row


def run(args) -> tuple[list[dict], list[str]]:
    device = torch.device(args.device)
    base, cfg = build_model(args, device)
    batch = random_batch(cfg.vocab_size, args.batch, args.seq, device)
    rows, notes = [], []
    for name in args.variants:
        result = try_variant(lambda: bench_variant(name, base, batch, args, device), name, notes)
        if result is None:
            continue
        row = {"variant": name, **result}
        rows.append(row)
        print(f"  {name}: {row['step_ms']:.1f} ms/step, first step {row['first_step_s']:.1f} s",
              file=sys.stderr, flush=True)
        save(rows, notes, args)  # after every variant: a run cut short by a time limit keeps its rows
    return rows, notes


def render(rows, notes, args) -> str:
    bf16 = next((r for r in rows if r["variant"] == "bf16"), None)
    lines = [
        f"# bench_train_step {datetime.datetime.now().isoformat(timespec='seconds')} | "
        f"{device_name(args.device)} | torch {torch.__version__} | preset {args.preset}"
        f"{' (small)' if args.small else ''} | batch {args.batch} x {args.seq}",
        "",
        "| variant | step ms | tokens/s | speed-up | back-to-back ms | its speed-up | first step s | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{bf16['step_ms'] / r['step_ms']:.2f}x" if bf16 else "-"
        speed_b2b = f"{bf16['back_to_back_ms'] / r['back_to_back_ms']:.2f}x" if bf16 else "-"
        lines.append(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {speed} | "
                     f"{r['back_to_back_ms']:.1f} | {speed_b2b} | {r['first_step_s']:.1f} | {r['peak_gib']:.1f} |")
    lines += [""] + [f"- note: {n}" for n in notes]
    lines += [f"- {r['variant']}: refresh_weight_scales after each opt.step() takes {r['refresh_ms']:.2f} ms "
              "(included in its step ms)" for r in rows if "refresh_ms" in r]
    return "\n".join(lines) + "\n"


def save(rows, notes, args) -> str:
    """The table as text; also written to `--out` (bench_train_step.md and .json)."""
    text = render(rows, notes, args)
    write_results(args.out, "bench_train_step", text, {"rows": rows, "notes": notes})
    return text


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {VARIANTS}")
    p.add_argument("--preset", default="anchor")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="a one-layer toy model (CI smoke test)")
    add_out_argument(p, "bench_train_step")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    check_variants(p, args.variants)
    if args.small:
        args.batch, args.seq, args.warmup, args.steps = 2, 32, 1, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, notes = run(args)
    print(save(rows, notes, args))
    failed = [n for n in notes if " failed: " in n]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
