"""Which layers convert and why not (`compile_fp8/layers.py`): one rule set for both modes."""

import pytest
import torch
from torch import nn

from compile_fp8 import Float8Config, compile_fp8, fp8_layers
from compile_fp8.layers import SkipKind, Skipped, layer_state


@pytest.mark.parametrize("mode", ["training", "inference"])
def test_float64_layers_are_skipped_with_their_reason_and_run(mode):
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).double()
    with pytest.warns(UserWarning, match=r"2 linear layer\(s\) stay in high precision: 0 \(weight dtype torch.float64"):
        compile_fp8(model, Float8Config(mode=mode), compile=False)
    report = fp8_layers(model)
    assert report["0"].startswith("skipped: weight dtype torch.float64"), report
    state = layer_state(model[0])
    assert isinstance(state, Skipped) and state.reason.kind is SkipKind.DTYPE, state
    out = model(torch.randn(4, 32, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_one_warning_lists_every_layer_skipped_for_a_reason_not_chosen():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.unaligned = nn.Linear(32, 50)
            self.filtered = nn.Linear(32, 32)
            self.head = nn.Linear(32, 64)
            self.head.weight = self.embed.weight  # tied to a non-Linear

    model = Model()
    with pytest.warns(UserWarning) as record:
        compile_fp8(model, module_filter_fn=lambda m, fqn: fqn != "filtered", compile=False)
    ours = [str(w.message) for w in record if "compile_fp8" in str(w.message)]
    assert len(ours) == 1, ours
    assert "unaligned (out_features=50 is not a multiple of 16)" in ours[0], ours[0]
    assert "head (weight is tied to embed.weight (not a Linear))" in ours[0], ours[0]
    assert "filtered" not in ours[0], ours[0]
    assert fp8_layers(model)["filtered"] == "skipped: module_filter_fn"
