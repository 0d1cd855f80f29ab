"""compile_fp8 returns the model it was given, compiled in place, regionally where it repeats
blocks (`compile_fp8/regions.py`)."""

import logging

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from compile_fp8 import Float8Config, compile_fp8, fp8_layers
from compile_fp8.regions import repeated_blocks
from compile_fp8.lm.model import TransformerLM, get_preset

BLOCKS = 10  # more than dynamo's default recompile limit (8): a per-block recompile would show


def _lm(n_layers=BLOCKS):
    torch.manual_seed(0)
    return TransformerLM(get_preset("tiny").replace(vocab_size=256, n_layers=n_layers, seq_len=32))


def _step(model, tokens):
    loss = model(tokens).float().pow(2).mean()
    loss.backward()
    return loss


def test_returns_the_same_object_with_the_same_keys_and_class():
    model = _lm(2)
    keys, cls = list(model.state_dict()), type(model)
    assert compile_fp8(model) is model
    assert type(model) is cls and list(model.state_dict()) == keys, list(model.state_dict())[:4]


def test_repeated_blocks_compile_once_each_in_place(caplog):
    model = _lm()
    counter = CompileCounterWithBackend("eager")
    with caplog.at_level(logging.INFO, logger="compile_fp8"):
        compile_fp8(model, backend=counter, fullgraph=True)
    blocks = [fqn for fqn, _ in repeated_blocks(model)]
    assert blocks == [f"blocks.{i}" for i in range(BLOCKS)], blocks
    assert all(model.get_submodule(b)._compiled_call_impl is not None for b in blocks)
    assert getattr(model, "_compiled_call_impl", None) is None, "the whole model was compiled too"
    assert any("repeated block" in r.message and "blocks.0" in r.message for r in caplog.records), caplog.text
    tokens = torch.randint(0, 256, (2, 32))
    for _ in range(2):
        _step(model, tokens)
    # one graph for the block class, reused by every block, forward and backward, two steps
    assert counter.frame_count == 1, f"{counter.frame_count} frames for {BLOCKS} identical blocks"


def test_regional_step_equals_the_eager_step():
    eager, regional = _lm(2), _lm(2)
    config = Float8Config(emulate=True)
    compile_fp8(eager, config, compile=False)
    compile_fp8(regional, config, backend="aot_eager")
    tokens = torch.randint(0, 256, (2, 32))
    _step(eager, tokens), _step(regional, tokens)
    for (name, a), b in zip(eager.named_parameters(), regional.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=f"{name}.grad")


def test_compile_model_and_false():
    whole = compile_fp8(_lm(2), compile="model", backend="eager")
    assert whole._compiled_call_impl is not None
    assert all(b._compiled_call_impl is None for b in whole.blocks)
    plain = compile_fp8(_lm(2), compile=False)
    assert plain._compiled_call_impl is None and all(b._compiled_call_impl is None for b in plain.blocks)


def test_a_model_without_repeated_blocks_compiles_whole():
    mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    assert repeated_blocks(compile_fp8(mlp, backend="eager")) == []
    assert mlp._compiled_call_impl is not None


def test_bad_compile_choice_and_compiled_model_are_errors():
    with pytest.raises(ValueError, match=r"compile='blocks' is not supported; allowed values: \[True, False, 'model'\]"):
        compile_fp8(_lm(2), compile="blocks")
    model = _lm(2)
    model.compile()
    with pytest.raises(ValueError, match="already compiled in place"):
        compile_fp8(model)


def test_fp8_layers_and_helpers_accept_the_returned_model():
    model = compile_fp8(_lm(2), backend="eager")
    report = fp8_layers(model)
    assert report["blocks.0.attn.qkv"].startswith("fp8 tensorwise dynamic"), report


def test_hf_llama_blocks_share_one_graph():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    counter = CompileCounterWithBackend("eager")
    assert compile_fp8(model, backend=counter) is model
    assert len(repeated_blocks(model)) == BLOCKS
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(2):
        model(ids, use_cache=False).logits.float().pow(2).mean().backward()
    assert counter.frame_count == 1, f"{counter.frame_count} frames for {BLOCKS} decoder layers"
    assert isinstance(model, transformers.LlamaForCausalLM) and hasattr(model, "save_pretrained")


def test_lm_compile_loss_runs_alone_and_inlines_into_a_whole_model_compile():
    """`TransformerLM.compile_loss`: the per-block compile's model gets its final norm, head and
    loss compiled as one region (the value of eager, the head's gradient too); a whole-model
    compile traces it inline (still one frame)."""
    from torch._dynamo.testing import CompileCounter

    cfg = get_preset("tiny").replace(n_layers=2, seq_len=16, vocab_size=64)
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    tokens = torch.randint(0, 64, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    eager_loss = model(x, y)
    eager_loss.backward()
    eager_head_grad = model.head.weight.grad
    model.zero_grad(set_to_none=True)
    loss_counter, model_counter = CompileCounter(), CompileCounter()
    traced = []

    def loss_backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return loss_counter(gm, example_inputs)

    model.compile_loss(backend=loss_backend)
    loss = model(x, y)
    loss.backward()
    assert loss_counter.frame_count == 1
    assert any("linear" in t for t in traced) and any("rms_norm" in t for t in traced), traced
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(model.head.weight.grad, eager_head_grad)
    model.compile(backend=model_counter)
    model(x, y).backward()
    assert model_counter.frame_count == 1 and loss_counter.frame_count == 1
