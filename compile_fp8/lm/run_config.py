"""What a training run depends on: `TrainConfig` (frozen; `scripts/train.py` fills it from its
flags), the parameter dtypes and their bytes, the default learning rates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compile_fp8.config import FAST_ACCUMS, RECIPES, SAVED_ACTIVATIONS, SCALINGS

from .model import ModelConfig, get_preset

FP8_CHOICES = ("none", *RECIPES)  # what Float8Config takes, plus "none": the baseline
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32"}  # the baseline run's name
DEFAULT_LR = {"tiny": 3e-3, "small": 6e-4, "medium": 3e-4, "wide": 3e-4, "anchor": 3e-4}


def bytes_per_param(dtype: str) -> int:
    """Weight, grad and two AdamW moments, all in the parameter dtype (an FP8 run's master
    weights too), before activations: 8 for bfloat16, 16 for float32."""
    return 4 * DTYPES[dtype].itemsize


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a run depends on. Frozen; `scripts/train.py` fills it from its flags."""

    preset: str = "tiny"
    """Model shape: a key of `model.PRESETS`."""
    fp8: str = "none"
    """"none" (the bf16 baseline) or a `Float8Config` recipe."""
    scaling: str = "dynamic"
    """`Float8Config.scaling` of an FP8 run (tensorwise only). "static": calibrated on one
    training batch before the first step, gradient scales included (`static_grads=True`), weight
    scales refreshed after every optimizer step. "delayed": its histories seeded on that batch."""
    recalibrate_every: int = 0
    """scaling="static": calibrate again after every this many steps, each time on the next batch
    of a calibration sampler of its own (0: once, before the first step). A static scale stays
    what calibration measured while the activations it casts grow as the model trains (the
    SwiGLU output of the `tiny` preset grew 300-1300x in 300 steps), and values past it
    saturate. Each calibration runs eagerly, in chunks of the batch (`train._calibrate`), and
    the run's peak memory counts it."""
    fast_accum: str = "forward"
    """`Float8Config.fast_accum` of an FP8 run: "forward" (torchao's recipes) or "all" (fast
    accumulation in the gradient GEMMs too)."""
    layer_filter: str = "all"
    """`Float8Config.layer_filter`: "all" eligible layers in FP8, or "auto" (only the shapes
    measured faster than bf16 on an H200)."""
    saved_activations: str = "hp"
    """`Float8Config.saved_activations` of an FP8 run: "hp", or "fp8" / "e5m2" (the blocks keep
    float8 activations for backward: scaled e4m3 / unscaled e5m2; the blocks are then compiled
    one by one, the loss region on its own, instead of one whole-model compile)."""
    steps: int = 200
    """Optimizer steps of the whole run (the LR schedule spans them)."""
    batch_size: int = 16
    seq_len: int | None = None
    """Tokens per row; None: the preset's."""
    lr: float | None = None
    """Peak learning rate; None: `DEFAULT_LR[preset]`."""
    warmup_steps: int | None = None
    """Linear warm-up; None: 10% of `steps`, at most 200."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    compile: bool = True
    emulate: str = "auto"
    """FP8 path: "auto" (hardware where `_scaled_mm` runs on a GPU, else emulation), "on", "off"."""
    device: str | None = None
    """None: "cuda" when available, else "cpu"."""
    dtype: str = "auto"
    """Parameter dtype: the baseline's weights, an FP8 run's master weights, the LM head and any
    layer left unconverted; grads and AdamW states follow it. "auto": bfloat16 on CUDA, float32
    on CPU, where CPUs without native bf16 arithmetic (e.g. AVX2 only) run bf16 matmuls an order
    of magnitude slower than float32 ones, and FP8 is emulated with float32 GEMMs anyway."""
    seed: int = 0
    """Seeds the weights and the data order (same seed, same batches for every --fp8)."""
    vocab_size: int | None = None
    """Override the preset's vocab (e.g. the 32k `anchor` on the 50,304-token GPT-2 corpus)."""
    data_dir: str = "data/corpus"
    out_dir: str = "runs/default"
    eval_every: int = 100
    """Val loss every this many steps (0: only at the end)."""
    eval_batches: int = 20
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    stop_after: int | None = None
    """End this invocation after this step, checkpointed (a job split over time-limited calls)."""
    resume: bool = False
    progress: str = "auto"
    """"auto" (a tqdm bar on a terminal, else printed lines), "bar", "print"."""
    fsdp: bool = False
    """Shard the model with FSDP2 over the processes torchrun started (`distributed.py`);
    `batch_size` is then per process."""

    def __post_init__(self):
        get_preset(self.preset)  # ValueError naming the allowed presets
        if self.fp8 not in FP8_CHOICES:
            raise ValueError(f"fp8={self.fp8!r} is not supported; allowed values: "
                             f"{list(FP8_CHOICES)}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; allowed values: "
                             f"{list(DTYPE_CHOICES)}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling={self.scaling!r} is not supported; allowed values: "
                             f"{list(SCALINGS)}")
        if self.fast_accum not in FAST_ACCUMS:
            raise ValueError(f"fast_accum={self.fast_accum!r} is not supported; allowed values: "
                             f"{list(FAST_ACCUMS)}")
        if self.scaling != "dynamic" and (self.fp8 != "tensorwise" or self.fsdp):
            raise ValueError(f"scaling={self.scaling!r} needs fp8='tensorwise' without fsdp "
                             f"(got fp8={self.fp8!r}, fsdp={self.fsdp})")
        if self.recalibrate_every < 0 or (self.recalibrate_every and self.scaling != "static"):
            raise ValueError(f"recalibrate_every={self.recalibrate_every} must be >= 0, and > 0 "
                             f"only with scaling='static' (got scaling={self.scaling!r})")
        if self.saved_activations not in SAVED_ACTIVATIONS:
            raise ValueError(f"saved_activations={self.saved_activations!r} is not supported; "
                             f"allowed values: {list(SAVED_ACTIVATIONS)}")
        if self.saved_activations != "hp" and (self.fp8 == "none" or self.fsdp or not self.compile):
            raise ValueError(f"saved_activations={self.saved_activations!r} needs an FP8 run (--fp8), "
                             f"compiled, without fsdp (got fp8={self.fp8!r}, compile={self.compile}, fsdp={self.fsdp})")
        if self.saved_activations != "hp" and self.param_dtype == "float32":
            raise ValueError(f"saved_activations={self.saved_activations!r} stores bf16 activations in "
                             "float8; this run is float32 (use --dtype bfloat16)")
        for name in ("steps", "batch_size", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    def default_device(self) -> torch.device:
        """`device`, or "cuda" when available, else "cpu" (one process; `--fsdp` picks the
        local rank's device of the same type)."""
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def param_dtype(self) -> str:
        """`dtype` resolved: "bfloat16" or "float32"."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.default_device().type == "cuda" else "float32"

    @property
    def name(self) -> str:
        """The run's label: "bf16" or "fp32" (the baseline, by its dtype), or "fp8-<recipe>"
        (with "-static" / "-delayed" for those scalings, "-recalN" for recalibrate_every=N,
        "-fastaccum" for fast_accum="all",
        "-fp8saved" / "-e5m2saved" for saved_activations="fp8" / "e5m2")."""
        if self.fp8 == "none":
            return SHORT_DTYPE[self.param_dtype]
        scaling = "" if self.scaling == "dynamic" else f"-{self.scaling}"
        if self.recalibrate_every:
            scaling += f"-recal{self.recalibrate_every}"
        return (f"fp8-{self.fp8}{scaling}" + ("-fastaccum" if self.fast_accum == "all" else "")
                + ("" if self.saved_activations == "hp" else f"-{self.saved_activations}saved"))

    def model_config(self) -> ModelConfig:
        cfg = get_preset(self.preset)
        return cfg if self.vocab_size is None else cfg.replace(vocab_size=self.vocab_size)
