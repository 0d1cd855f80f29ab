"""Shared fixtures and markers: `gpu` (CUDA sm89+ only), `slow`, `distributed`."""

import os
import tempfile

# A fresh inductor/AOT-autograd cache per test session: torch's on-disk AOT autograd cache was
# seen (torch 2.13, CPU) to hand back a joint graph from before an edit to our autograd
# Function's backward, so a cached run could test old code. Set before torch is imported.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="compile_fp8_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402


def fp8_gpu_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU with FP8 (sm89+); skipped elsewhere")
    config.addinivalue_line("markers", "slow: long-running")
    config.addinivalue_line("markers", "distributed: spawns several processes")


def pytest_collection_modifyitems(config, items):
    if fp8_gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with FP8 support (sm89+)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    """Each test module starts with empty dynamo caches. Compiled code objects (`nn.Module`'s
    `_call_impl`, `Sequential.forward`, ...) are shared by every test in the process, and their
    recompiles add up across modules until one hits dynamo's recompile limit (8): seen as
    test_compile failing after test_scaling_modes."""
    torch._dynamo.reset()
