"""A decoder-only Transformer language model (CS336 / Llama style), sized by presets.

One block, pre-norm with residuals (x: [B, T, D] throughout)::

    x = x + attn(rms_norm(x))      # causal self-attention, RoPE on q and k
    x = x + mlp(rms_norm(x))       # SwiGLU: down(silu(gate(x)) * up(x))

then a final RMSNorm and an untied LM head `head` (an nn.Linear, [D] -> [vocab]). Every matrix
multiply is an `nn.Linear` without bias, so `compile_fp8` converts all of them; the training
loop keeps `head` in the parameter dtype (its output feeds the softmax directly, where FP8's
3-bit mantissa costs the most). Attention itself (q @ k^T, p @ v) runs in high precision inside
`F.scaled_dot_product_attention`, as in torchao and Transformer Engine.

Dimensions are multiples of 16 (what `torch._scaled_mm` needs, so no layer is skipped) and the
vocab is padded to a multiple of 64 (GPT-2's 50,257 -> 50,304): the padded rows of the head are
never targets, so their logits only learn to stay low.

RoPE (rotary position embedding) rotates each pair (x[i], x[i + Dh/2]) of a query or key by the
angle `pos * base^(-2i/Dh)`, so q . k depends on the positions only through their difference.
The cos/sin tables are computed in float32 inside `forward` (cheap: [T, Dh/2]; torch.compile
folds them), which keeps them out of `state_dict()` and away from `model.to(torch.bfloat16)`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GPT2_VOCAB = 50304  # GPT-2 BPE's 50,257 tokens padded to a multiple of 64


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The shape of a `TransformerLM`. Frozen: a checkpoint stores it to refuse a mismatch."""

    vocab_size: int = GPT2_VOCAB
    """Rows of the embedding and the head; >= the tokenizer's vocab, a multiple of 64."""

    d_model: int = 768
    """Width of the residual stream."""

    n_layers: int = 12
    """Number of Transformer blocks."""

    n_heads: int = 12
    """Attention heads; head dim = d_model / n_heads (a multiple of 16)."""

    d_ff: int = 2048
    """SwiGLU hidden width (~8/3 d_model, rounded to a multiple of 16)."""

    seq_len: int = 1024
    """Default training context length (RoPE itself works at any length)."""

    rope_base: float = 10000.0
    """RoPE frequency base."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}")
        for name in ("d_model", "d_ff", "head_dim"):
            if getattr(self, name) % 16:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be a multiple "
                                 "of 16 (torch._scaled_mm needs it)")
        if self.vocab_size % 64:
            raise ValueError(f"ModelConfig.vocab_size={self.vocab_size} must be a multiple of 64")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # CPU-sized: ~0.8M parameters in the blocks, 13.7M with the GPT-2 embedding and head.
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=352, seq_len=128),
    # GPT-2 small's shape (untied head: 162M in all, 85M in the blocks).
    "small": ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=2048, seq_len=1024),
    # GPT-2 medium's shape; ANCHORS.md's 375M model with the GPT-2 vocab (411M in all).
    "medium": ModelConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=2816, seq_len=1024),
    # The anchor model's layer shapes (d_model 2048, SwiGLU 5632) in 4 layers: 309M parameters
    # without the embedding (412M in all). The GPU training demo's size: FP8 pays where the
    # GEMMs are large (docs/training.md: at d_model 1024 casts cost what FP8 GEMMs save).
    "wide": ModelConfig(d_model=2048, n_layers=4, n_heads=16, d_ff=5632, seq_len=2048),
    # The 956M benchmark model of ANCHORS.md (its vocab 32768 is smaller than GPT-2's: train it
    # on the GPT-2 corpus with --vocab-size 50304).
    "anchor": ModelConfig(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, d_ff=5632,
                          seq_len=2048),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; allowed values: {list(PRESETS)}")
    return PRESETS[name]


# ---- parameter and FLOP counts ----------------------------------------------------------------


def num_params(cfg: ModelConfig, *, embedding: bool = True) -> int:
    """Parameters of `TransformerLM(cfg)`, counted from the config (tests check the module).

    `embedding=False` leaves out the token embedding (a lookup, no FLOPs); the head stays in.
    """
    d, f = cfg.d_model, cfg.d_ff
    per_block = 4 * d * d + 3 * d * f + 2 * d  # qkv + out, gate + up + down, two RMSNorm weights
    total = cfg.n_layers * per_block + d + cfg.vocab_size * d  # + final norm + head
    return total + (cfg.vocab_size * d if embedding else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for MFU.

    6 N for the weight matmuls (N = parameters without the embedding; 2 FLOPs per multiply-add
    in the forward pass, 4 in the backward), plus attention's q @ k^T and p @ v:
    12 * n_layers * d_model * seq_len (PaLM's convention: the full T x T score matrix, although
    causal attention kernels skip about half of it).
    """
    return 6 * num_params(cfg, embedding=False) + 12 * cfg.n_layers * cfg.d_model * seq_len


# ---- modules ----------------------------------------------------------------------------------


def rope_tables(seq_len: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, ...]:
    """cos, sin of `pos * base^(-2i/Dh)`, each [T, Dh/2], float32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                        / head_dim)  # [Dh/2]
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + Dh/2]) of x [B, H, T, Dh] by the angles of [T, Dh/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)  # each [B, H, T, Dh/2], float32 for the rotation
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        # split, not a [B, T, 3, H, Dh] view unpacked with select: split's backward is one cat of
        # dq, dk, dv. Three select_backwards summed instead gave (H100, torch 2.11) one kernel
        # that loads every source unmasked for every third of d(qkv): three reads of each.
        q, k, v = (part.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # each [B, H, T, Dh]
                   for part in self.qkv(x).split(d, dim=-1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, Dh]
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # [B, T, D] @ [D, D] -> [B, T, D]


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):  # [B, T, D] -> [B, T, F] -> [B, T, D]
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against targets [B, T], in float32: bf16 logits
    lose the small differences between likely tokens."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def output_loss(norm: nn.Module, head: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The last blocks' output [B, T, D] -> final norm -> head -> `next_token_loss`: the part of
    the model after the blocks, as one function of its modules so that `compile_loss` can
    compile it as one region (a free function: a copy of the model passes its own modules)."""
    return next_token_loss(head(norm(x)), targets)


class TransformerLM(nn.Module):
    """tokens [B, T] -> logits [B, T, vocab], or the mean next-token loss given targets."""

    loss_fn = staticmethod(output_loss)  # `compile_loss` replaces it on the instance

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # RoPE's cos/sin for positions < seq_len, computed once. Built inside forward instead,
        # inductor recomputes pow/cos/sin in every kernel that reads them: measured on the H200
        # (scripts/profile_train_step.py) at ~1.9 ms of each layer's 8 x 2048-token step.
        # Non-persistent buffers (not in state_dict); `_apply` keeps them float32.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._build_rope(self.head.weight.device)  # where `with torch.device(...)` put the weights
        self.reset_parameters()

    def _build_rope(self, device) -> None:
        self.rope_cos, self.rope_sin = rope_tables(
            self.cfg.seq_len, self.cfg.head_dim, self.cfg.rope_base, device
        )

    def _apply(self, fn, recurse=True):
        """`.to(device, bfloat16)`, `.to_empty(...)`: rebuild the RoPE tables in float32 where
        they now live (a bf16 cast would round the angles; to_empty would leave garbage)."""
        super()._apply(fn, recurse)
        self._build_rope(self.rope_cos.device)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02) matrices, residual projections scaled by 1/sqrt(2 layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                nn.init.ones_(param)  # RMSNorm gains
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.trunc_normal_(param, std=residual_std, a=-3 * residual_std,
                                      b=3 * residual_std)
            else:
                nn.init.trunc_normal_(param, std=0.02, a=-0.06, b=0.06)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        t = tokens.shape[1]
        if t <= self.rope_cos.shape[0]:
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        else:  # longer than the preset's seq_len: computed here (slower, same values)
            cos, sin = rope_tables(t, self.cfg.head_dim, self.cfg.rope_base, tokens.device)
        x = self.embed(tokens)  # [B, T] -> [B, T, D]
        for block in self.blocks:
            x = block(x, cos, sin)
        if targets is None:
            return self.head(self.norm(x))  # [B, T, D] @ [D, V] -> [B, T, V]
        return self.loss_fn(self.norm, self.head, x, targets)

    def compile_loss(self, **compile_kwargs) -> "TransformerLM":
        """Compile what follows the blocks - final norm, head and loss - as one region (in place;
        returns self), for a model whose blocks are compiled one by one (`compile_fp8`'s default).
        Eager, the norm, the float32 copy of the [B*T, vocab] logits, the log-softmax and their
        backwards are separate kernels. Compiling the loss alone is not enough: logits made
        outside it are an input of its graph, which autograd keeps alive beside the loss's own
        buffers (3 GiB more peak memory than one whole-model compile at 375M, batch 16 x 2048;
        `scripts/profile_memory.py`). Inside a whole-model compile the region is traced inline."""
        self.loss_fn = torch.compile(output_loss, **compile_kwargs)
        return self
