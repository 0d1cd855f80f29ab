"""Triton kernels: the cast kernels of training (`cast.py`), the small-M GEMM of inference
(`small_m_gemm.py`, kernel bodies in `small_m_kernels.py`), and what they share
(`triton_support.py`). Each entry point falls back to plain torch code, with the same results,
where the kernels cannot run."""
