"""FP8 inference: weights quantized to float8 once, activations cast per call.

    scales.py          the inference scales ([Note] Inference scales) and weight quantization
    state.py           InferenceState: a converted layer's FP8 state and its buffers
    linear.py          the forward: `_scaled_mm` for large M, the small-M kernel for decode
    convert.py         the conversion, and the checkpoint hooks (serving layout)
    passes.py          the decode graph passes: group_linears.py, cast_in_kernel.py
"""
