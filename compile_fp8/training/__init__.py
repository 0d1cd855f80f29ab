"""FP8 training: master weights stay in high precision, the three GEMMs of every converted
linear run in FP8.

    linear_fn.py        the FP8 linear as one autograd function (three GEMMs, their casts)
    fsdp.py             FSDP2's FP8 all-gather (the math, the gathered weight)
    weight.py           Float8TrainingWeight: the master weight whose F.linear runs FP8
    distributed.py      precompute_float8_dynamic_scale_for_fsdp, FSDP's gather dtypes
    state.py            TrainingState: a converted layer's FP8 state and buffer names
    stateful_scaling.py static and delayed scaling: the forward that reads stored scales
    conv1d.py           transformers' Conv1D (GPT-2) through the same function
    layer_choice.py     Float8Config(layer_filter="auto"): which shapes pay on an H200
    convert.py          the conversion, and the checkpoint hooks
"""
