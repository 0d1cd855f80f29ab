"""Train a Transformer LM on the prepared corpus, with or without FP8, and log metrics.

    python scripts/prepare_data.py                                    # once: data/corpus
    python scripts/train.py --preset tiny --steps 200 --out runs/base  # bf16 (CPU: float32)
    python scripts/train.py --preset tiny --steps 200 --out runs/fp8 --use_fp8
    python scripts/compare_runs.py runs/base runs/fp8 --out runs/compare

    python scripts/train.py --preset small --fp8 rowwise --batch-size 16 --out runs/small-rw
    python scripts/train.py ... --out runs/small-rw --resume           # continue from ckpt.pt
    torchrun --nproc_per_node 2 scripts/train.py --fsdp --use_fp8 ...  # FSDP2, one process per GPU

Writes OUT/metrics.jsonl (per-step loss, lr, tokens/s, MFU; val loss; a start and an end
record) and OUT/ckpt.pt (atomic; loads with torch.load(weights_only=True)). The loop itself is
compile_fp8/lm/train.py; docs/training.md walks through it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import traceback

from compile_fp8.config import FAST_ACCUMS, LAYER_FILTERS, SAVED_ACTIVATIONS, SCALINGS
from compile_fp8.lm.hardware import EMULATE_CHOICES
from compile_fp8.lm.model import PRESETS
from compile_fp8.lm.progress import MODES
from compile_fp8.lm.run_config import DTYPE_CHOICES, FP8_CHOICES, TrainConfig
from compile_fp8.lm.train import run


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--preset", choices=list(PRESETS), default="tiny", help="model shape (default: tiny)")
    add("--fp8", choices=FP8_CHOICES, default="none",
        help="FP8 recipe, or none for the baseline in --dtype")
    add("--use_fp8", action="store_true", help="the same as --fp8 tensorwise")
    add("--scaling", choices=SCALINGS, default="dynamic",
        help="FP8 scales (tensorwise): dynamic (each step's amax), static (calibrated on one "
             "batch, gradients included; weight scales refreshed each step), delayed (amax history)")
    add("--recalibrate-every", type=int, default=0,
        help="--scaling static: calibrate again after every N steps (0: once, before the first "
             "step); activations grow as the model trains, and a stale static scale saturates them")
    add("--fast-accum", choices=FAST_ACCUMS, default="forward",
        help="FP8 GEMMs with fast accumulation: forward (the output GEMM, as torchao) or all "
             "(the gradient GEMMs too: faster, coarser sums)")
    add("--layer-filter", choices=LAYER_FILTERS, default="all",
        help="FP8 for all eligible layers, or auto: only shapes measured faster than bf16 (H200)")
    add("--saved-activations", choices=SAVED_ACTIVATIONS, default="hp",
        help="what the blocks keep for backward: hp (as computed), fp8 (float8 e4m3 with a scale "
             "each, about half the activation memory) or e5m2 (float8 e5m2 without a scale: no "
             "amax pass; coarser); with fp8/e5m2 the blocks are compiled one by one")
    add("--steps", type=int, default=200, help="optimizer steps of the whole run")
    add("--batch-size", type=int, default=16)
    add("--seq-len", type=int, default=None, help="default: the preset's")
    add("--lr", type=float, default=None, help="peak learning rate (default: per preset)")
    add("--warmup-steps", type=int, default=None, help="default: 10%% of --steps, at most 200")
    add("--compile", action=argparse.BooleanOptionalAction, default=True,
        help="torch.compile the model (default: on)")
    add("--emulate", choices=EMULATE_CHOICES, default="auto",
        help="FP8 path: auto (FP8 hardware on sm89+ GPUs, emulation on CPU), on, off")
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--dtype", choices=DTYPE_CHOICES, default="auto",
        help="parameter dtype (baseline weights, FP8 master weights, LM head); auto: bfloat16 "
             "on CUDA, float32 on CPU (CPUs without native bf16 run bf16 matmuls ~10x slower)")
    add("--seed", type=int, default=0, help="weights and data order")
    add("--vocab-size", type=int, default=None, help="override the preset's vocab size")
    add("--data", default="data/corpus", help="folder with train.bin, val.bin, meta.json")
    add("--out", default=None,
        help="run folder (default: runs/<preset>-<bf16|fp32|fp8-recipe>)")
    add("--eval-every", type=int, default=100, help="val loss every N steps (0: at the end)")
    add("--eval-batches", type=int, default=20)
    add("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    add("--stop-after", type=int, default=None,
        help="end after this step with a checkpoint; --resume continues the same schedule")
    add("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    add("--progress", choices=MODES, default="auto", help="tqdm bar or printed lines")
    add("--fsdp", action="store_true",
        help="shard with FSDP2 over the processes torchrun starts (NCCL, or gloo on CPU); "
             "--batch-size is then per process")
    args = p.parse_args(argv)
    if args.use_fp8:
        if args.fp8 not in ("none", "tensorwise"):
            p.error("--use_fp8 means --fp8 tensorwise; pass only one of them")
        args.fp8 = "tensorwise"
    if args.scaling != "dynamic" and args.fp8 != "tensorwise":
        p.error(f"--scaling {args.scaling} needs --fp8 tensorwise")
    if args.fast_accum != "forward" and args.fp8 == "none":
        p.error(f"--fast-accum {args.fast_accum} needs an --fp8 recipe")
    try:  # TrainConfig checks the combinations (e.g. --saved-activations fp8 needs --fp8, --compile)
        cfg = TrainConfig(
            preset=args.preset, fp8=args.fp8, scaling=args.scaling, recalibrate_every=args.recalibrate_every,
            fast_accum=args.fast_accum,
            layer_filter=args.layer_filter, saved_activations=args.saved_activations, steps=args.steps,
            batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
            compile=args.compile, emulate=args.emulate, device=args.device, dtype=args.dtype,
            seed=args.seed, vocab_size=args.vocab_size, data_dir=args.data,
            eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
            stop_after=args.stop_after, resume=args.resume, progress=args.progress, fsdp=args.fsdp)
    except ValueError as exc:
        p.error(str(exc))
    return dataclasses.replace(cfg, out_dir=args.out or f"runs/{args.preset}-{cfg.name}")  # bf16, fp32, fp8-*


def main(argv=None) -> int:
    cfg = parse_args(argv)
    say = functools.partial(print, flush=True)
    try:
        summary = run(cfg, say=say)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        # bad input: the message says what to do; where it was raised helps if it is a bug
        where = traceback.extract_tb(err.__traceback__)[-1]
        print(f"error: {err}\n(raised at {where.filename}:{where.lineno})", file=sys.stderr)
        return 2
    return 0 if summary["final_loss"] == summary["final_loss"] else 1  # NaN -> 1


if __name__ == "__main__":
    sys.exit(main())
