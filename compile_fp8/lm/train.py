"""The training loop: a `TransformerLM` on token files, a bf16 (or float32) baseline or FP8
(`compile_fp8`), compiled.

One run, start to end (`run(TrainConfig(...))`; `scripts/train.py` is its command line):

1. report the FP8 support found (device, torch, a `torch._scaled_mm` probe) and the path taken:
   FP8 hardware, CPU real kernel or emulation (`hardware.py`);
2. open and check the token files (`data.py`), check the model fits the device;
3. build the model with parameters in `dtype` (seeded; "auto": bf16 on CUDA, float32 on CPU),
   load the checkpoint when resuming, then
   `compile_fp8(model, Float8Config(recipe=...), module_filter_fn=lambda m, fqn: fqn != "head")`
   (the LM head stays in the parameter dtype) or plain `torch.compile` for the baseline;
4. AdamW (fused on CUDA; weight decay on matrices only), linear warm-up then cosine decay to
   `min_lr_ratio * lr`, gradient clipping;
5. each step: loss, tokens/s and MFU to the progress bar and `metrics.jsonl`; the val loss every
   `eval_every` steps and at the end; an atomic checkpoint every `save_every` steps and at the end.

With `fsdp=True` (`--fsdp`, under torchrun) the same loop runs in every process on an FSDP2-sharded
model; `distributed.py` says what changes.

The loss is computed inside the model's forward, so torch.compile fuses the float32 upcast of
the logits into the cross entropy instead of materialising [tokens, vocab] float32 logits twice.
Validation runs the uncompiled module under `no_grad` (the same weights and FP8 casts; compiling
an inference graph too would cost a second compilation for a few batches).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compile_fp8 import Float8Config, calibrate, compile_fp8, fp8_layers, refresh_weight_scales
from compile_fp8 import precompute_float8_dynamic_scale_for_fsdp

from . import distributed, hardware
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .data import BatchSampler, eval_batches, open_corpus
from .metrics import METRICS_NAME, MetricsLog
from .model import ModelConfig, TransformerLM, flops_per_token, num_params
from .progress import Progress
from .run_config import DEFAULT_LR, DTYPES, TrainConfig, bytes_per_param

def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of (1-based) `step`: linear warm-up, then cosine from lr to min_ratio*lr."""
    if step <= warmup:
        return lr * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_fits(model_cfg: ModelConfig, preset: str, device: torch.device, dtype: str) -> None:
    """ValueError when weights, grads and AdamW states alone exceed the device's memory."""
    per_param = bytes_per_param(dtype)
    need = num_params(model_cfg) * per_param
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    else:
        import os

        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.9 * have:
        raise ValueError(f"preset {preset!r} needs at least {need / 2**30:.1f} GiB on {device} "
                         f"for weights, gradients and AdamW states ({per_param} bytes per "
                         f"{dtype} parameter, before activations); {have / 2**30:.1f} GiB is "
                         "there: pick a smaller --preset")


def build_model(cfg: TrainConfig, model_cfg: ModelConfig, support, device, state=None):
    """(model to train, plain module for eval): weights in `cfg.param_dtype`, checkpoint loaded,
    FP8, FSDP2 (`cfg.fsdp`), compile."""
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = TransformerLM(model_cfg).to(DTYPES[cfg.param_dtype])
    if state is not None:
        model.load_state_dict(state["model"])  # plain keys and tensors, also from an FP8 run
    if cfg.fp8 != "none":
        config = Float8Config(recipe=cfg.fp8, emulate=support.emulate, layer_filter=cfg.layer_filter,
                              scaling=cfg.scaling, static_grads=cfg.scaling == "static",
                              fast_accum=cfg.fast_accum, saved_activations=cfg.saved_activations)  # fmt: skip
        # float8 saved activations apply to the blocks compile_fp8 compiles itself (compile=True)
        regional = cfg.saved_activations != "hp"
        compile_fp8(model, config, module_filter_fn=lambda mod, fqn: fqn != "head", compile=regional)
        if regional:
            return model.compile_loss(), model
    if cfg.fsdp:
        distributed.shard(model)  # after compile_fp8, before torch.compile
    return (torch.compile(model) if cfg.compile else model), model


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device) -> torch.optim.AdamW:
    """AdamW; decay on matrices (linears, embedding), none on RMSNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def train_step(model, optimizer, inputs, targets, lr: float, grad_clip: float, after_step=None):
    """One optimizer step; returns (loss, grad norm) as 0-dim tensors (no sync here)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model(inputs, targets)  # [B, T], [B, T] -> mean next-token cross entropy
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if after_step is not None:
        after_step()
    return loss.detach(), grad_norm


@torch.no_grad()
def evaluate(model, tokens, cfg: TrainConfig, seq_len: int, device) -> float:
    """Mean loss over the first `eval_batches` batches of the val tokens (a fixed set)."""
    losses = [model(x.to(device), y.to(device)).item()
              for x, y in eval_batches(tokens, cfg.batch_size, seq_len, cfg.eval_batches)]
    return statistics.fmean(losses)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _oom_hint(cfg: TrainConfig, seq_len: int) -> str:
    return (f"out of GPU memory: preset {cfg.preset!r} with batch {cfg.batch_size} x {seq_len} "
            "does not fit; lower --batch-size or --seq-len, or pick a smaller --preset")


@dataclass
class Run:
    """What the loop needs, built once by `setup`."""

    cfg: TrainConfig
    device: torch.device
    seq_len: int
    model: torch.nn.Module
    eval_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    val_tokens: object
    log: MetricsLog
    start_step: int
    flops_per_token: float
    peak_flops: float | None
    ranks: distributed.Ranks | None = None
    """Set under `--fsdp`."""
    calibration: BatchSampler | None = None
    """Static and delayed scaling: the batches calibration reads (a sampler of its own, so the
    training batches stay those of every other run with this seed)."""


def setup(cfg: TrainConfig, say=print, ranks: distributed.Ranks | None = None) -> Run:
    """Probe, check the data and the output folder, build model/optimizer, load a checkpoint.

    `ranks`: this process's place under `--fsdp` (`distributed.init_from_torchrun`)."""
    device = ranks.device if ranks else cfg.default_device()
    model_cfg = cfg.model_config()
    seq_len = cfg.seq_len or model_cfg.seq_len
    support = hardware.probe(device, cfg.emulate)
    say(support.describe() + (f" (unused: this is the {cfg.name} run)" if cfg.fp8 == "none"
                              else ""))
    train_tokens, val_tokens, _ = open_corpus(cfg.data_dir, vocab_size=model_cfg.vocab_size,
                                              seq_len=seq_len)
    check_fits(model_cfg, cfg.preset, device, cfg.param_dtype)
    out = Path(cfg.out_dir)
    ckpt = checkpoint_path(out)
    if ckpt.exists() and not cfg.resume:
        raise FileExistsError(f"{out} already holds a checkpoint ({ckpt}); pass --resume to "
                              "continue that run, or choose another --out (nothing was changed)")
    state = load_checkpoint(ckpt, preset=cfg.preset, model_config=model_cfg) if cfg.resume else None
    _check_world_size(state, ranks, ckpt)
    if ranks is not None:
        distributed.barrier()  # every rank checked the folder before rank 0 writes to it
    out.mkdir(parents=True, exist_ok=True)
    model, eval_model = build_model(cfg, model_cfg, support, device, state)
    optimizer = build_optimizer(cfg, model, device)
    sampler = BatchSampler(train_tokens, cfg.batch_size, seq_len, seed=cfg.seed)
    if ranks is not None:
        sampler = distributed.RankBatches(sampler, ranks)
    start_step = 0
    if state is not None:
        if ranks is not None:
            distributed.load_optimizer(eval_model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["data"])
        start_step = state["step"]
        fp8_note = "" if state["fp8"] == cfg.fp8 else f" (it trained with --fp8 {state['fp8']})"
        say(f"resumed {ckpt} at step {start_step}{fp8_note}")
    calibration = None
    if cfg.fp8 != "none" and cfg.scaling != "dynamic":
        calibration = BatchSampler(train_tokens, cfg.batch_size, seq_len, seed=cfg.seed + 1)
        _calibrate(cfg, eval_model, calibration, device, say, first=True)
    _describe_model(cfg, model_cfg, eval_model, seq_len, say, ranks)
    log = (MetricsLog(out / METRICS_NAME, resume_step=start_step if state else None)
           if ranks is None or ranks.is_main else _NoLog())
    run = Run(cfg, device, seq_len, model, eval_model, optimizer, sampler, val_tokens, log,
              start_step, flops_per_token(model_cfg, seq_len), _peak_flops(cfg, device), ranks,
              calibration)
    log.write(event="start", **_start_record(cfg, model_cfg, support, seq_len, start_step))
    return run


def _peak_flops(cfg: TrainConfig, device) -> float | None:
    """The MFU denominator: the FP8 or bf16 tensor-core peak; None for a float32 baseline (no
    such peak is known here, so no MFU is reported)."""
    if cfg.fp8 == "none" and cfg.param_dtype != "bfloat16":
        return None
    return hardware.peak_flops(device, fp8=cfg.fp8 != "none")


class _NoLog:
    """The metrics log of a process other than rank 0."""

    def write(self, **record) -> None:
        pass

    def close(self) -> None:
        pass


def _check_world_size(state, ranks, ckpt) -> None:
    """An FSDP checkpoint's optimizer state resumes with the same number of processes only."""
    theirs = None if state is None else state.get("fsdp_world_size")
    ours = None if ranks is None else ranks.world_size
    if state is not None and theirs != ours:
        how = (f"under torchrun with --nproc_per_node {theirs} --fsdp" if theirs
               else "without --fsdp, in one process")
        raise ValueError(f"{ckpt} was written by a run {'with' if theirs else 'without'} --fsdp; "
                         f"resume it {how} (its weights load anywhere: state['model'])")


def _describe_model(cfg, model_cfg, eval_model, seq_len, say, ranks) -> None:
    say(f"model: preset {cfg.preset!r} {model_cfg}, {num_params(model_cfg) / 1e6:.1f}M params "
        f"({num_params(model_cfg, embedding=False) / 1e6:.1f}M without the embedding), "
        f"{cfg.param_dtype} parameters")
    per = f" per process, FSDP2 over {ranks.world_size} processes" if ranks else ""
    say(f"run: {cfg.name}, {cfg.steps} steps x {cfg.batch_size} x {seq_len} tokens{per}, "
        f"compile={cfg.compile}, seed {cfg.seed}")
    if cfg.fp8 != "none":
        layers = fp8_layers(eval_model)
        fp8 = [how for how in layers.values() if how.startswith("fp8")]
        kept = [f"{fqn} ({how})" for fqn, how in layers.items() if not how.startswith("fp8")]
        kinds = ", ".join(sorted(set(fp8)))
        say(f"fp8 layers: {len(fp8)} converted ({kinds}); kept in {cfg.param_dtype}: "
            f"{', '.join(kept)}")


def _start_record(cfg, model_cfg, support, seq_len, start_step) -> dict:
    return {"name": cfg.name, "preset": cfg.preset, "fp8": cfg.fp8, "fast_accum": cfg.fast_accum,
            "dtype": cfg.param_dtype,
            "device": support.device, "device_name": support.device_name,
            "fp8_path": f"none ({cfg.name})" if cfg.fp8 == "none" else support.path,
            "torch": support.torch_version, "num_params": num_params(model_cfg),
            "flops_per_token": flops_per_token(model_cfg, seq_len),
            "batch_size": cfg.batch_size, "seq_len": seq_len, "steps": cfg.steps,
            "lr": cfg.lr or DEFAULT_LR[cfg.preset], "compile": cfg.compile, "seed": cfg.seed,
            "resumed_from": start_step or None, "model_config": dataclasses.asdict(model_cfg)}


def _save(run: Run, step: int) -> None:
    if run.ranks is None:
        model_state, optimizer_state = run.eval_model.state_dict(), run.optimizer.state_dict()
    else:  # gathered on every rank (a collective), written by rank 0
        model_state, optimizer_state = distributed.full_state(run.eval_model, run.optimizer)
    if run.ranks is None or run.ranks.is_main:
        save_checkpoint(checkpoint_path(run.cfg.out_dir), step=step, preset=run.cfg.preset,
                        model_config=run.cfg.model_config(), fp8=run.cfg.fp8,
                        model_state=model_state, optimizer_state=optimizer_state,
                        data_state=run.sampler.state_dict(),
                        fsdp_world_size=run.ranks and run.ranks.world_size)
    if run.ranks is not None:
        distributed.barrier()  # when _save returns, every rank can read the checkpoint


def _one_step(run: Run, step: int, lr: float) -> dict:
    """Train step `step` (1-based) and measure it; the `.item()` calls wait for the GPU."""
    cfg, device = run.cfg, run.device
    start = time.perf_counter()
    inputs, targets = run.sampler.next_batch()
    inputs = inputs.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    try:
        loss, grad_norm = train_step(run.model, run.optimizer, inputs, targets, lr, cfg.grad_clip,
                                     _after_step(run))
        if run.ranks is not None:  # the global batch's loss; the norm of the sharded grads
            loss, grad_norm = distributed.mean_over_ranks(loss), distributed.full_tensor(grad_norm)
        loss, grad_norm = loss.item(), grad_norm.item()
    except torch.cuda.OutOfMemoryError as err:
        raise RuntimeError(_oom_hint(cfg, run.seq_len)) from err
    _sync(device)
    seconds = time.perf_counter() - start
    processes = 1 if run.ranks is None else run.ranks.world_size
    tokens_per_s = processes * cfg.batch_size * run.seq_len / seconds
    mfu = None if run.peak_flops is None else run.flops_per_token * tokens_per_s / run.peak_flops
    return {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu,
            "step_ms": 1e3 * seconds, "grad_norm": grad_norm}


CALIBRATION_CHUNKS = 4  # calibration's eager pass runs on a quarter of a batch at a time


def _calibrate(cfg: TrainConfig, model, sampler: BatchSampler, device, say, first: bool) -> None:
    """Static scales (or delayed histories' seeds) from the next batch of `sampler`, the run's
    calibration sampler (on resume it starts again: the checkpoint holds the plain weights only).

    `calibrate` runs eagerly in high precision, which keeps far more activations than the
    compiled step; one whole batch at once would set the run's peak memory
    (docs/benchmarks.md). So the batch goes in whole-sequence chunks
    (`calibration_chunks`), each chunk's mean loss weighted by its share of the batch: every
    token's gradient is then the one the whole batch's mean loss gives it (sequences do not
    mix), and the amaxes, a max over the chunks, are the whole batch's.
    """
    inputs, targets = sampler.next_batch()
    chunks = calibration_chunks(inputs.to(device), targets.to(device))
    rows = inputs.shape[0]
    calibrate(model, chunks, loss_fn=lambda loss, chunk: loss * (chunk[0].shape[0] / rows))
    note = ""
    if torch.device(device).type == "cuda":
        note = f" (peak so far {hardware.peak_memory_gib(device)[0]:.2f} GiB)"
    when = "" if first else " again"
    say(f"calibrated {cfg.scaling} scaling{when} on one batch of {rows} x {inputs.shape[1]} tokens, "
        f"in {len(chunks)} chunks{note}")


def calibration_chunks(inputs: torch.Tensor, targets: torch.Tensor) -> list:
    """(inputs, targets) split along the batch into up to `CALIBRATION_CHUNKS` whole-sequence chunks."""
    pieces = min(CALIBRATION_CHUNKS, inputs.shape[0])
    return list(zip(inputs.tensor_split(pieces), targets.tensor_split(pieces)))


def _after_step(run: Run):
    """Under FSDP2 with FP8: every weight's amax for the next all-gather in one all-reduce.
    Static scaling: the weights' scales re-measured (they changed in the optimizer step)."""
    if run.cfg.fp8 != "none" and run.cfg.scaling == "static":
        return lambda: refresh_weight_scales(run.eval_model)
    if run.ranks is None or run.cfg.fp8 == "none":
        return None
    return lambda: precompute_float8_dynamic_scale_for_fsdp(run.eval_model)


def run(cfg: TrainConfig, say=print) -> dict:
    """Train as `cfg` says; returns the summary record (also the last line of metrics.jsonl).

    Under `cfg.fsdp` every process calls it; rank 0 alone says and logs anything."""
    if not cfg.fsdp:
        return _run(cfg, say, None)
    ranks = distributed.init_from_torchrun(cfg.device)
    try:
        quiet = lambda *args, **kwargs: None  # noqa: E731
        return _run(cfg, say if ranks.is_main else quiet, ranks)
    finally:
        distributed.close(ranks)


def _run(cfg: TrainConfig, say, ranks) -> dict:
    wall = time.perf_counter()
    run_ = setup(cfg, say, ranks)
    lr_kw = dict(lr=cfg.lr or DEFAULT_LR[cfg.preset], total=cfg.steps,
                 warmup=cfg.warmup_steps if cfg.warmup_steps is not None
                 else min(200, cfg.steps // 10), min_ratio=cfg.min_lr_ratio)
    last = min(cfg.steps, cfg.stop_after or cfg.steps)
    mode = cfg.progress if run_.ranks is None or run_.ranks.is_main else "print"  # quiet `say`
    progress = Progress(mode, total=cfg.steps, initial=run_.start_step, desc=cfg.name, say=say)
    val_loss, records = None, []
    for step in range(run_.start_step + 1, last + 1):
        record = _one_step(run_, step, lr_at(step, **lr_kw))
        records.append(record)
        run_.log.write(**record)
        progress.update(record)
        if not math.isfinite(record["loss"]):
            progress.write(f"step {step}: loss is {record['loss']}; stopping")
            break
        if cfg.recalibrate_every and step % cfg.recalibrate_every == 0 and step < last:
            _calibrate(cfg, run_.eval_model, run_.calibration, run_.device, progress.write, first=False)
        if step == last or (cfg.eval_every and step % cfg.eval_every == 0):
            val_loss = evaluate(run_.eval_model, run_.val_tokens, cfg, run_.seq_len, run_.device)
            run_.log.write(step=step, val_loss=val_loss)
            progress.write(f"step {step}: val loss {val_loss:.4f}")
        if step == last or (cfg.save_every and step % cfg.save_every == 0):
            _save(run_, step)
    progress.close()
    return _finish(run_, records, val_loss, time.perf_counter() - wall, say)


def _finish(run_: Run, records: list[dict], val_loss, wall_s: float, say) -> dict:
    peak, kind = hardware.peak_memory_gib(run_.device)
    steady = [r["tokens_per_s"] for r in records[max(1, len(records) // 10):]] or [math.nan]
    summary = {"event": "end", "step": records[-1]["step"] if records else run_.start_step,
               "final_loss": statistics.fmean(r["loss"] for r in records[-10:]) if records
               else math.nan, "val_loss": val_loss,
               "tokens_per_s": statistics.median(steady), "peak_mem_gib": peak,
               "peak_mem_kind": kind, "wall_s": wall_s,
               "first_step_s": records[0]["step_ms"] / 1e3 if records else None}
    run_.log.write(**summary)
    run_.log.close()
    val = "n/a" if val_loss is None else f"{val_loss:.4f}"
    say(f"done: {run_.cfg.name} step {summary['step']}, train loss (last 10) "
        f"{summary['final_loss']:.4f}, val loss {val}, {summary['tokens_per_s']:,.0f} tokens/s "
        f"(median), peak memory {peak:.2f} GiB ({kind}), {wall_s:.0f} s")
    return summary
