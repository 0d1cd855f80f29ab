"""Where FP8 GEMMs run: `_scaled_mm` on FP8 GPUs, emulation elsewhere by default (`gemm.py`)."""

import warnings

import pytest
import torch
from torch import nn

from compile_fp8 import Float8Config, compile_fp8, fp8_layers
from compile_fp8.gemm import choose_emulate


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512))


def test_cpu_defaults_to_emulation():
    assert choose_emulate(torch.device("cpu"), None) is True
    model = compile_fp8(_mlp(), compile=False)
    assert set(fp8_layers(model).values()) == {"fp8 tensorwise dynamic (emulated)"}, fp8_layers(model)


def test_forcing_the_cpu_reference_kernel_warns():
    with pytest.warns(UserWarning, match=r"emulate=False\) on CPU runs torch's CPU _scaled_mm, a slow reference kernel"):
        compile_fp8(_mlp(), Float8Config(emulate=False), compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_fp8(_mlp(), Float8Config(emulate=True), compile=False)
        compile_fp8(_mlp(), compile=False)
