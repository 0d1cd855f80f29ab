"""Float8 storage for the activations that compiled blocks keep for their backward.

Between a training step's forward and its backward, autograd keeps what the backward formulas
read: in a transformer block the SwiGLU's gate and up outputs, attention's q, k, v (here the
fused qkv output) and output, the residual stream for the norms. Under torch.compile,
AOTAutograd's partitioner chooses that set (it re-computes what is cheap instead, e.g. our
float8 casts of a linear's input), and these tensors make most of a step's peak memory: 0.85
GiB a layer in bf16 at the 375M LM, batch 16 x 2048 (`scripts/profile_memory.py` on an H100).

`Float8Config(saved_activations="fp8")` stores them in float8. compile_fp8 turns on inductor's
activation-quantization pass (`torch._functorch.partitioners`) for the repeated blocks it
compiles: each saved activation of at least `MIN_MIB` MiB in bf16 or fp16 (not the parameters,
not the block's own input) is stored as float8 e4m3 with one scale of its own (448 / its amax:
one more reduction over it in the forward) and cast back to its dtype in the backward, inside the
kernels that read it::

    forward:   h = silu(gate) * up   ...   saved: gate_fp8 = e4m3(gate * s), s   (1 byte a value)
    backward:  gate = gate_fp8 / s   ->   dgate = dh * up * silu'(gate)

Float32 tensors stay as they are. In a bf16 block those are statistics, not activations:
attention's log-sum-exp ([batch, heads, tokens], 1 MiB at batch 8 x 16 heads x 2048 tokens) and
a norm's reciprocal RMS. The attention backward re-forms its probabilities as exp(score -
log-sum-exp), so a log-sum-exp rounded by d scales a row of them by exp(-d) (e5m2 rounds a value
near 8 by up to 1; scaled e4m3, with an amax near 10, by up to about 0.4): on a 2-layer LM at
2048 tokens (CPU, emulated FP8) the qkv weights' gradients lost 10 dB of SQNR with it rounded to
e5m2 and 4 dB with it in scaled e4m3; 1.3 and 0 dB with it left in float32.

`saved_activations="e5m2"` stores the same tensors as float8 e5m2 without a scale: a plain cast
in the kernel that produces them, no amax pass. e5m2's normal range (6.1e-5 to 57344) holds a
block's activations as they are; the price is one mantissa bit fewer than e4m3.

`attention_kept_in_high_precision()` is a measurement aid, not a `Float8Config` choice: while it
lasts, attention's q, k, v and output stay out of the pass. Inductor casts most saved tensors
back inside the generated kernel that reads them; SDPA's backward (cuDNN, flash) is a library
kernel that reads bf16 from memory, so a float8 q, k, v or output is cast back by a kernel of its
own first. The context measures what those casts cost against the memory they save.

Numerics: the backward reads activations rounded to e4m3 (3 mantissa bits) or e5m2 (2); the
forward is unchanged. On a small LM (`tests/test_saved_activations.py`) the weight gradients'
SQNR against float32 drops by under 1 dB (e4m3) or 2 dB (e5m2) from FP8 tensorwise's own (which
its e5m2 gradients set). Only the repeated blocks get it, hence regional compile only
(`compile=True`): a whole-model graph would also round what the loss keeps (the logits behind
the softmax's gradient).
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from unittest import mock

import torch
from torch import fx, nn

MIN_MIB = 1.0  # smaller saved tensors stay as they are: their amax pass would cost more than they hold
PASS = "activation_quantization_aten_pass"
# Float8Config.saved_activations -> (the saved copies' dtype, a scale of each tensor's own)
STORAGE = {
    "fp8": ("torch.float8_e4m3fn", True),  # 448 / its amax: one amax pass each
    "e5m2": ("torch.float8_e5m2", False),  # a plain cast: no amax pass
}


def inductor_options(saved: str) -> dict:
    """The `torch.compile(options=...)` that turns the pass on for `saved` ("fp8" / "e5m2")."""
    quant_type, use_scaling = STORAGE[saved]
    settings = {
        "quant_type": quant_type,
        "use_scaling": use_scaling,
        "size_in_mb": MIN_MIB,
        "exclude_primals": True,  # parameters and the block's input: graph inputs, kept anyway
        "allowed_dtypes": "torch.bfloat16;torch.float16",  # float32: statistics (see above)
    }
    return {"post_grad_fusion_options": {PASS: settings}}


def block_compile_kwargs(kwargs: dict, saved: str) -> dict:
    """`kwargs` of the blocks' compile calls with the pass for `saved` added to the user's `options`."""
    if kwargs.get("mode") not in (None, "default"):
        raise ValueError(
            f"Float8Config(saved_activations={saved!r}) passes torch.compile `options`, and torch.compile "
            f"takes `mode` or `options`, not both (got mode={kwargs['mode']!r}); leave mode out"
        )
    kwargs = {k: v for k, v in kwargs.items() if k != "mode"}
    options = dict(kwargs.get("options") or {})
    fusion = dict(options.get("post_grad_fusion_options") or {})
    fusion.update(inductor_options(saved)["post_grad_fusion_options"])
    options["post_grad_fusion_options"] = fusion
    return {**kwargs, "options": options}


def pass_available() -> bool:
    """Whether this torch's partitioner has the pass (inductor may ignore an option key it does not know)."""
    from torch._functorch import partitioners

    return hasattr(partitioners, "perform_fp8_activation_quantization")


def check_compile_choice(how, has_blocks: bool, model: nn.Module, saved: str) -> None:
    """Float8 saved activations (`saved`: "fp8" / "e5m2") need the pass in torch, and
    compile_fp8's regional compile of repeated blocks."""
    if not pass_available():
        raise RuntimeError(
            f"Float8Config(saved_activations={saved!r}) uses inductor's activation-quantization pass, "
            f"which torch {torch.__version__} does not have; use saved_activations='hp'"
        )
    if how is not True:
        raise ValueError(
            f"Float8Config(saved_activations={saved!r}) applies to the repeated blocks compile_fp8 "
            f"compiles regionally; it needs compile=True (got compile={how!r})"
        )
    if not has_blocks:
        raise ValueError(
            f"Float8Config(saved_activations={saved!r}) applies to repeated blocks (children of an "
            f"nn.ModuleList / nn.Sequential of one class that hold linear layers); "
            f"{type(model).__name__} has none, and a whole-model graph would round what its loss "
            "keeps too"
        )


def warn_if_float32(blocks: list[nn.Module], saved: str) -> None:
    """A UserWarning where the repeated blocks hold float32 parameters only: their activations
    are float32 unless autocast runs them in bf16/fp16, and float32 tensors are left as they are
    (see the module docstring), so nothing would be stored in float8."""
    dtypes = {p.dtype for block in blocks for p in block.parameters() if p.is_floating_point()}
    if dtypes == {torch.float32}:
        warnings.warn(
            f"Float8Config(saved_activations={saved!r}) stores bf16/fp16 activations in float8; this "
            "model's blocks are float32, so unless autocast runs them in bf16/fp16 their activations "
            "stay float32 (float32 tensors are left as they are: in a bf16 block they are statistics "
            "such as attention's log-sum-exp)",
            UserWarning,
            stacklevel=3,
        )


# ops that only re-describe their input's memory: a tensor reaches attention through them
_VIEW_OPS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "expand", "alias", "unsqueeze",
             "squeeze"}  # fmt: skip


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "_opname", "") if node.op == "call_function" else ""


def _is_attention(node: fx.Node) -> bool:
    """An SDPA forward kernel (flash, efficient, cuDNN, CPU; not their backward)."""
    name = _op_name(node)
    return name.startswith("_scaled_dot_product") and "attention" in name and not name.endswith("backward")


def _feeds_attention(node: fx.Node) -> bool:
    return any(_is_attention(user) or (_op_name(user) in _VIEW_OPS and _feeds_attention(user))
               for user in node.users)  # fmt: skip


def is_attention_tensor(node: fx.Node) -> bool:
    """Whether a forward graph's node is attention's q, k or v (it reaches an SDPA kernel, through
    views at most) or one of the kernel's outputs."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and _is_attention(node.args[0]):
        return True
    return _feeds_attention(node)


@contextlib.contextmanager
def attention_kept_in_high_precision():
    """While it lasts, graphs partitioned with the pass on leave attention's tensors out of it
    (see the module docstring). The pass decides per tensor in `partitioners.should_quantize`,
    when AOTAutograd partitions a graph: compile and run the first step inside the context,
    with compile caches off, or a cached graph of the other choice may serve it."""
    from torch._functorch import partitioners

    if not hasattr(partitioners, "should_quantize"):
        raise RuntimeError(
            f"torch {torch.__version__}'s partitioner has no should_quantize to filter the "
            "activation-quantization pass with"
        )
    decide = partitioners.should_quantize

    def unless_attention(node: fx.Node) -> bool:
        return decide(node) and not is_attention_tensor(node)

    with mock.patch.object(partitioners, "should_quantize", unless_attention):
        yield
