"""Demo: train a tiny language model in bf16 and in FP8 (compile_fp8) and compare them.

What it does
------------
Builds one tiny Transformer LM (token embedding; blocks of RMSNorm -> causal self-attention
with ``qkv``/``out`` ``nn.Linear`` projections -> RMSNorm -> SwiGLU MLP, with residuals; final
RMSNorm; LM ``head``), casts it to bf16 and deep-copies it once per variant, so every variant
starts from the same weights. Every variant trains on the same batches of a synthetic but
learnable task: sequences drawn from a fixed random Markov chain in which each token has a few
likely successors, so the loss falls from ln(vocab) towards the chain's entropy.

Variants (each ``torch.compile``'d, AdamW, same learning rate):

* ``bf16``: the plain model, the reference.
* ``fp8-<recipe>``: ``compile_fp8(model, Float8Config(recipe=...),
  module_filter_fn=lambda m, fqn: fqn != "head")``; the LM head stays in bf16, as is usual
  (its output feeds the softmax directly).

At the end it prints ``fp8_layers`` for the FP8 model and a markdown table: final loss (mean of
the last 10 steps), its relative difference to bf16, ms/step (median over steady-state steps,
i.e. after the first steps that compile), the first step's seconds (mostly compilation),
tokens/s and the speed-up over bf16.

It is also a smoke test: the exit status is 1 when an FP8 variant's final loss is not finite
or differs from bf16's by more than ``--max-rel-diff`` percent (default 5), else 0.

How to run
----------
From the repository root (CPU is fine; the default run takes a few minutes on 2 cores)::

    python scripts/demo.py
    python scripts/demo.py --recipes tensorwise rowwise rowwise_with_gw_hp --steps 200
    python scripts/demo.py --device cuda          # FP8 speed needs an H100/H200-class GPU

CPU timings say nothing about FP8's speed: there the FP8 GEMMs are emulated (the default on
CPU, ``--emulate on``: CPU ``torch._scaled_mm`` is a reference kernel, hundreds of times slower
than a bf16 matmul) and the extra casts only cost time.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compile_fp8 import Float8Config, compile_fp8, fp8_layers
from compile_fp8.config import RECIPES  # the CLI offers exactly the recipes the library takes

EMULATE = {"auto": None, "on": True, "off": False}  # --emulate -> Float8Config.emulate
LAST_STEPS = 10  # final loss = mean over this many last steps
COMPILE_STEPS = 3  # steps left out of the ms/step median (compilation, warm-up)


# ---- model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden: int = 352  # ~8/3 * dim (SwiGLU), rounded up to a multiple of 16 for _scaled_mm


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x):  # x: [B, T, D]
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads)  # [B, T, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, T, Dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, Dh]
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # embeddings and linear weights; RMSNorm weights stay 1
                nn.init.normal_(p, std=1.0 if name == "embed.weight" else 0.02)

    def forward(self, tokens):  # tokens: [B, T] -> logits [B, T, vocab]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---- data --------------------------------------------------------------------------------


def markov_batches(steps, batch, seq_len, vocab, successors, seed) -> torch.Tensor:
    """[steps, batch, seq_len + 1] tokens from a fixed random Markov chain (on CPU, seeded).

    Each token has `successors` possible next tokens with random probabilities, so the best
    achievable loss is the chain's entropy (< ln(successors)), far below ln(vocab).
    """
    gen = torch.Generator().manual_seed(seed)
    next_ids = torch.stack([torch.randperm(vocab, generator=gen)[:successors] for _ in range(vocab)])
    next_probs = torch.rand(vocab, successors, generator=gen) + 0.1  # [vocab, successors]
    n = steps * batch
    seqs = torch.empty(n, seq_len + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab, (n,), generator=gen)
    for t in range(seq_len):
        cur = seqs[:, t]
        pick = torch.multinomial(next_probs[cur], 1, generator=gen).squeeze(1)  # [n]
        seqs[:, t + 1] = next_ids[cur, pick]
    return seqs.view(steps, batch, seq_len + 1)


# ---- training ----------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    losses: list[float]
    step_s: list[float]
    tokens_per_step: int
    layers: dict[str, str] | None = None

    @property
    def final_loss(self) -> float:
        return statistics.fmean(self.losses[-LAST_STEPS:])

    @property
    def step_ms(self) -> float:
        steady = self.step_s[COMPILE_STEPS:] or self.step_s
        return 1e3 * statistics.median(steady)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / (self.step_ms / 1e3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(name, model, data, args, device) -> RunResult:
    """Plain training loop: next-token cross entropy, AdamW, one batch of `data` per step."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda"
    )
    losses, step_s = [], []
    log_every = max(1, args.steps // 5)
    for step, batch in enumerate(data):
        batch = batch.to(device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T] each
        _sync(device)
        start = time.perf_counter()
        logits = model(inputs)  # [B, T, vocab] bf16
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also waits for the step to finish
        _sync(device)
        step_s.append(time.perf_counter() - start)
        if step == 0 or (step + 1) % log_every == 0 or step + 1 == len(data):
            print(f"  [{name}] step {step + 1:4d}/{len(data)}  loss {losses[-1]:.4f}  "
                  f"{1e3 * step_s[-1]:8.1f} ms", flush=True)
    tokens = data.shape[1] * (data.shape[2] - 1)
    return RunResult(name, losses, step_s, tokens)


def run_variant(name, base, data, args, device, recipe=None) -> RunResult:
    torch._dynamo.reset()  # each variant compiles from scratch, so first-step times compare
    model = copy.deepcopy(base)  # identical initial weights for every variant
    compile_kwargs = {"compile": not args.no_compile}
    if recipe is None:
        model = model if args.no_compile else torch.compile(model)
    else:
        model = compile_fp8(
            model,
            Float8Config(recipe=recipe, emulate=EMULATE[args.emulate]),
            module_filter_fn=lambda mod, fqn: fqn != "head",  # keep the LM head in bf16
            **compile_kwargs,
        )
    result = train(name, model, data, args, device)
    result.layers = fp8_layers(model) if recipe is not None else None
    return result


# ---- report ------------------------------------------------------------------------------


def print_layers(result: RunResult) -> None:
    fp8 = {fqn: how for fqn, how in result.layers.items() if how.startswith("fp8")}
    skipped = {fqn: how for fqn, how in result.layers.items() if not how.startswith("fp8")}
    kinds = ", ".join(sorted(set(fp8.values())))
    print(f"fp8_layers({result.name}): {len(fp8)} fp8 ({kinds}), {len(skipped)} skipped")
    for fqn, how in skipped.items():
        print(f"  {fqn}: {how}")


def rel_diff_pct(result: RunResult, ref: RunResult) -> float:
    return 100.0 * (result.final_loss - ref.final_loss) / ref.final_loss


def print_table(results: list[RunResult]) -> None:
    ref = results[0]
    print(f"| variant | final loss (last {LAST_STEPS}) | vs bf16 | ms/step | "
          "first step (s) | tokens/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        diff = "-" if r is ref else f"{rel_diff_pct(r, ref):+.2f}%"
        print(f"| {r.name} | {r.final_loss:.4f} | {diff} | {r.step_ms:.1f} | "
              f"{r.step_s[0]:.1f} | {r.tokens_per_s:,.0f} | {ref.step_ms / r.step_ms:.2f}x |")


def check(results: list[RunResult], max_rel_diff: float) -> list[str]:
    ref, failures = results[0], []
    for r in results[1:]:
        if not math.isfinite(r.final_loss):
            failures.append(f"{r.name}: final loss {r.final_loss} is not finite")
        elif abs(rel_diff_pct(r, ref)) > max_rel_diff:
            failures.append(f"{r.name}: final loss {r.final_loss:.4f} differs from bf16's "
                            f"{ref.final_loss:.4f} by {rel_diff_pct(r, ref):+.2f}% "
                            f"(> {max_rel_diff}%)")
    return failures


# ---- CLI ---------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="training steps per variant")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=["tensorwise"],
                   help="FP8 recipes to compare with bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the data")
    p.add_argument("--no-compile", action="store_true", help="run eagerly (no torch.compile)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--emulate", choices=list(EMULATE), default=None,
                   help="Float8Config.emulate: auto (library picks), on, off; default: on for "
                        "CPU (its torch._scaled_mm is a slow reference kernel), auto elsewhere")
    p.add_argument("--max-rel-diff", type=float, default=5.0,
                   help="fail if an FP8 final loss differs from bf16's by more (in percent)")
    args = p.parse_args(argv)
    if args.steps <= COMPILE_STEPS + LAST_STEPS:
        p.error(f"--steps must be > {COMPILE_STEPS + LAST_STEPS}")
    if args.emulate is None:
        args.emulate = "on" if torch.device(args.device).type == "cpu" else "auto"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    logging.getLogger("compile_fp8").addHandler(logging.StreamHandler())  # the FP8 path line
    logging.getLogger("compile_fp8").setLevel(logging.INFO)
    cfg = ModelConfig()
    torch.manual_seed(args.seed)
    base = TinyLM(cfg).to(device=device, dtype=torch.bfloat16)
    data = markov_batches(args.steps, args.batch, args.seq_len, cfg.vocab, 4, args.seed)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"TinyLM {cfg} ({n_params / 1e6:.2f}M params, bf16) on {device}; "
          f"{args.steps} steps x {args.batch}x{args.seq_len} tokens; "
          f"compile={not args.no_compile}; torch {torch.__version__}", flush=True)
    if device.type == "cpu" and args.emulate == "on":
        print("FP8 on CPU is emulated (Float8Config(emulate=True); same numerics, bit for bit "
              "for tensorwise): CPU torch._scaled_mm runs at ~0.1 GFLOP/s. --emulate auto uses it.",
              flush=True)

    results = [run_variant("bf16", base, data, args, device)]
    for recipe in args.recipes:
        results.append(run_variant(f"fp8-{recipe}", base, data, args, device, recipe))

    print()
    for r in results[1:]:
        print_layers(r)
    print()
    print_table(results)
    print()
    print(f"loss: {results[0].losses[0]:.3f} at step 1 (ln(vocab) = {math.log(cfg.vocab):.3f}); "
          f"ms/step is the median after the first {COMPILE_STEPS} steps; first step = "
          "compilation + one step (shorter when inductor's on-disk cache is warm).")
    if device.type != "cuda":
        print("Note: CPU timings do not show FP8's speed (on CPU the FP8 GEMMs are emulated or run "
              "on a slow reference kernel, and the casts only add work); FP8 speed-ups need an "
              "H100/H200-class GPU (--device cuda).")
    failures = check(results, args.max_rel_diff)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
