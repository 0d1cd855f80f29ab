"""Small helpers shared by the tests."""

import torch


def sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref, actual = ref.double(), actual.double()
    noise = (ref - actual).norm()
    if noise == 0:
        return float("inf")
    return (20 * torch.log10(ref.norm() / noise)).item()


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs with the same bits count as equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(int_dtype), b.contiguous().view(int_dtype))
