"""What the machine offers for FP8, which path a run takes, and the peak FLOP/s for MFU.

Three paths run the same FP8 numerics (the same float8 bits and scales; see docs/design.md):

* **FP8 hardware**: a CUDA GPU of compute capability 8.9+ (Ada, Hopper): `torch._scaled_mm`
  on FP8 tensor cores. The only path that is faster than bf16.
* **CPU real kernel**: torch's CPU `_scaled_mm` (torch >= 2.13). Bitwise equal to torchao, but a
  reference kernel, far slower than a float32 matmul on many CPUs: fine for tests, not for training.
* **emulation**: the float8 values times their inverse scales, then a float32 matmul. The
  default for training on CPU, and the only choice on GPUs below sm89.

`--emulate auto` picks FP8 hardware where `_scaled_mm` runs on a GPU, else emulation (always on
CPU, with the reason printed); `on` and `off` force a path (`off` where `_scaled_mm` cannot run is
an error, before any step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compile_fp8.gemm import scaled_mm_supported

EMULATE_CHOICES = ("auto", "on", "off")
# Dense (no sparsity) peak FLOP/s of H100/H200 SXM (the same tensor cores; datasheet figures).
PEAK_FLOPS = {"bf16": 989e12, "fp8": 1979e12}


@dataclass(frozen=True)
class Fp8Support:
    """What `probe` found, and the path chosen. `emulate` is what Float8Config receives."""

    device: str
    device_name: str
    torch_version: str
    fp8_dtypes: bool
    scaled_mm_runs: bool
    emulate: bool
    path: str
    reason: str

    def describe(self) -> str:
        """The plain-words report printed at the start of a run."""
        runs = "runs" if self.scaled_mm_runs else "does not run"
        dtypes = "float8_e4m3fn and float8_e5m2 present" if self.fp8_dtypes else "no float8 dtypes"
        return (f"device: {self.device} ({self.device_name}); torch {self.torch_version}; "
                f"{dtypes}; torch._scaled_mm {runs} here\n"
                f"FP8 path: {self.path} - {self.reason}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)}, sm{major}{minor}"
    return device.type.upper()


def probe(device: torch.device | str, emulate: str = "auto") -> Fp8Support:
    """Probe `_scaled_mm` on `device` and resolve `--emulate {auto,on,off}` to a path."""
    if emulate not in EMULATE_CHOICES:
        raise ValueError(f"emulate={emulate!r} is not supported; allowed values: "
                         f"{list(EMULATE_CHOICES)}")
    device = torch.device(device)
    runs = scaled_mm_supported(device)
    use_emulation, reason = _choose(device, runs, emulate)
    if use_emulation:
        path = "emulation"
    else:
        path = "FP8 hardware" if device.type == "cuda" else "CPU real kernel"
    return Fp8Support(
        device=str(device), device_name=device_name(device), torch_version=torch.__version__,
        fp8_dtypes=hasattr(torch, "float8_e4m3fn") and hasattr(torch, "float8_e5m2"),
        scaled_mm_runs=runs, emulate=use_emulation, path=path, reason=reason)


def _choose(device: torch.device, runs: bool, emulate: str) -> tuple[bool, str]:
    if emulate == "on":
        return True, "requested with --emulate on (same casts and scales, float32 matmuls)"
    if emulate == "off":
        if not runs:
            raise ValueError(f"--emulate off needs torch._scaled_mm, which does not run on "
                             f"{device} (FP8 needs a CUDA GPU of compute capability 8.9+, or a CPU "
                             "build of torch >= 2.13); use --emulate auto")
        if device.type == "cpu":
            return False, ("requested with --emulate off: torch's CPU _scaled_mm, a slow "
                           "reference kernel (bitwise equal to torchao)")
        return False, "requested with --emulate off"
    if device.type == "cpu":
        return True, ("CPU default: torch's CPU _scaled_mm is a reference kernel, slow on many "
                      "CPUs; emulation gives the same float8 casts and scales "
                      "(--emulate off to use the kernel anyway)")
    if runs:
        return False, "torch._scaled_mm runs on FP8 tensor cores"
    return True, ("this GPU has no FP8 tensor cores (needs compute capability 8.9+): FP8 numerics "
                  "are emulated, correct but slower than bf16")


def peak_flops(device: torch.device | str, fp8: bool) -> float | None:
    """Dense peak FLOP/s for MFU: H100/H200 only (bf16, or fp8 for FP8 runs); else None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        return PEAK_FLOPS["fp8" if fp8 else "bf16"]
    return None


def peak_memory_gib(device: torch.device | str) -> tuple[float, str]:
    """(peak memory in GiB, what it measures): CUDA's max allocated, or the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    import resource  # Unix only; ru_maxrss is in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"
