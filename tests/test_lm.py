"""compile_fp8.lm: presets, token files and sampler, training (baseline / FP8), resume, comparison.

All on CPU and small: the training runs use the `tiny` preset with a 512-token vocab on a
synthetic, learnable token file (no network, no prepared corpus), eagerly.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from compile_fp8 import fp8_layers
from compile_fp8.lm import PRESETS, ModelConfig, TransformerLM, flops_per_token, num_params
from compile_fp8.lm import compare, corpus, hardware
from compile_fp8.lm.data import BatchSampler, eval_batches, open_corpus, open_tokens
from compile_fp8.lm.model import apply_rope, rope_tables
from compile_fp8.lm.train import TrainConfig, bytes_per_param, lr_at, run, setup

VOCAB = 512

# ---- model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_count_matches_the_module(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = TransformerLM(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == num_params(cfg), f"{name}: module {counted} vs formula {num_params(cfg)}"
    dims = [cfg.d_model, cfg.d_ff, cfg.head_dim] + [d for p in model.parameters() for d in p.shape]
    assert all(d % 16 == 0 for d in dims), f"{name}: a dim is not a multiple of 16: {dims}"
    assert cfg.vocab_size % 64 == 0, cfg.vocab_size
    assert flops_per_token(cfg, cfg.seq_len) > 6 * num_params(cfg, embedding=False)


@pytest.mark.parametrize("name, millions", [("tiny", 13.7), ("small", 162.2), ("wide", 411.6), ("anchor", 956.3)])
def test_preset_sizes(name, millions):
    got = num_params(PRESETS[name]) / 1e6
    assert abs(got - millions) < 0.1, f"{name}: {got:.2f}M params"


def test_forward_shapes_and_initial_loss():
    cfg = PRESETS["tiny"].replace(vocab_size=VOCAB)
    model = TransformerLM(cfg)
    tokens = torch.randint(VOCAB, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, VOCAB), logits.shape
    loss = model(tokens, tokens).item()
    assert abs(loss - math.log(VOCAB)) < 0.5, f"initial loss {loss} vs ln(vocab) {math.log(VOCAB)}"


def test_rope_tables_are_built_where_the_weights_are():
    """`with torch.device(d): TransformerLM(cfg)` (train.py on the GPU) must not leave the RoPE
    tables on the CPU: seen on the H200 as a cuda/cpu device mismatch inside the compiled step."""
    with torch.device("meta"):
        model = TransformerLM(PRESETS["tiny"]).to(torch.bfloat16)
    assert model.rope_cos.device.type == "meta" and model.rope_sin.device.type == "meta"
    assert model.rope_cos.dtype == torch.float32
    model.to_empty(device="cpu")
    assert torch.equal(model.rope_cos, rope_tables(PRESETS["tiny"].seq_len, PRESETS["tiny"].head_dim,
                                                   PRESETS["tiny"].rope_base, "cpu")[0])


def test_rope_scores_depend_on_relative_position_only():
    cos, sin = rope_tables(8, 16, 10000.0, "cpu")
    q, k = torch.randn(16), torch.randn(16)
    rot_q = apply_rope(q.expand(1, 1, 8, 16), cos, sin)[0, 0]  # q at every position: [8, 16]
    rot_k = apply_rope(k.expand(1, 1, 8, 16), cos, sin)[0, 0]
    score_a, score_b = rot_q[5] @ rot_k[3], rot_q[4] @ rot_k[2]  # both 2 apart
    assert torch.allclose(score_a, score_b, atol=1e-5), (score_a, score_b)


def test_attention_splits_qkv_so_its_backward_is_one_cat():
    """q, k, v come from `split` of the qkv output (the first d_model outputs are q): the traced
    backward concatenates dq, dk, dv instead of summing select_backwards (which inductor loaded
    three times over), and q, k, v are the same rows of the qkv weight as a [3, H, Dh] view's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from compile_fp8.lm.model import CausalSelfAttention

    cfg = PRESETS["tiny"].replace(n_layers=1, seq_len=8)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg)
    x = torch.randn(2, 8, cfg.d_model, requires_grad=True)
    cos, sin = rope_tables(8, cfg.head_dim, cfg.rope_base, "cpu")
    backward_ops = []

    def record_backward(gm, _):
        backward_ops.extend(str(node.target) for node in gm.graph.nodes)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=record_backward)
    torch.compile(attn, backend=backend, fullgraph=True)(x, cos, sin).sum().backward()
    assert any("cat" in op for op in backward_ops), backward_ops
    assert not any("select_backward" in op for op in backward_ops), backward_ops
    b, t, d = x.shape
    qkv = attn.qkv(x).view(b, t, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
    q_rows = attn.qkv(x).split(d, dim=-1)[0].view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    assert torch.equal(q_rows, qkv[0])


def test_model_config_errors():
    with pytest.raises(ValueError, match="d_ff=100 must be a multiple of 16"):
        ModelConfig(d_ff=100)
    with pytest.raises(ValueError, match="vocab_size=50257 must be a multiple of 64"):
        ModelConfig(vocab_size=50257)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ModelConfig(d_model=768, n_heads=10)


# ---- token files and sampler ------------------------------------------------------------------


def write_corpus(folder, n_train=20_000, n_val=2_000, meta=True):
    """A learnable corpus: a fixed cycle through 64 token ids, as uint16 files + meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    cycle = np.random.default_rng(0).permutation(VOCAB)[:64].astype(np.uint16)
    for name, n in (("train", n_train), ("val", n_val)):
        np.resize(cycle, n).tofile(folder / f"{name}.bin")
    if meta:
        (folder / "meta.json").write_text(json.dumps(
            {"vocab_size": VOCAB, "tokens": {"train": n_train, "val": n_val}}))
    return folder


def test_missing_folder_and_file_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `python scripts/prepare_data.py`"):
        open_corpus(tmp_path / "nowhere", vocab_size=VOCAB, seq_len=8)
    with pytest.raises(FileNotFoundError, match="train.bin does not exist.*prepare_data.py"):
        open_corpus(tmp_path, vocab_size=VOCAB, seq_len=8)


def test_corpus_of_a_larger_vocab_is_refused_before_reading(tmp_path):
    write_corpus(tmp_path)
    with pytest.raises(ValueError, match="tokenized for vocab_size 512 .* --vocab-size >= 512"):
        open_corpus(tmp_path, vocab_size=256, seq_len=8)


@pytest.mark.parametrize("content, expected, message", [
    (b"", None, "is empty"),
    (b"\x01\x00\x02", None, "not a whole number of uint16 tokens"),
    (np.arange(10, dtype=np.int32).tobytes(), 10, "has 20 uint16 tokens but meta.json says 10"),
    (np.array([1] * 20 + [600], dtype=np.uint16).tobytes(), None, "id 600 >= .* vocab_size 512"),
    (np.array([1, 2], dtype=np.uint16).tobytes(), None, "fewer than the 9 one batch row needs"),
])
def test_bad_token_files_are_refused(tmp_path, content, expected, message):
    path = tmp_path / "train.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        open_tokens(path, vocab_size=VOCAB, expected_tokens=expected, min_tokens=9)


def test_sampler_is_deterministic_and_covers_each_window_once_per_epoch():
    tokens = np.arange(1001, dtype=np.uint16)  # 1000 // 10 = 100 windows of 10 (+1) tokens
    a, b = BatchSampler(tokens, 8, 10, seed=3), BatchSampler(tokens, 8, 10, seed=3)
    first = [a.next_batch() for _ in range(25)]  # 200 samples: two epochs
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, (b.next_batch() for _ in first)))
    inputs, targets = first[0]
    assert inputs.shape == (8, 10) and torch.equal(inputs[:, 1:], targets[:, :-1])
    starts = [int(x[0]) for inputs, _ in first[:13] for x in inputs][:100]
    assert sorted(starts) == list(range(0, 1000, 10)), "epoch 1 is not a permutation of windows"
    other = BatchSampler(tokens, 8, 10, seed=4).next_batch()[0]
    assert not torch.equal(other, inputs), "another seed gave the same first batch"


def test_sampler_resumes_exactly_and_refuses_another_shape():
    tokens = np.arange(5001, dtype=np.uint16)
    uninterrupted = BatchSampler(tokens, 4, 16, seed=1)
    expected = [uninterrupted.next_batch()[0] for _ in range(30)]
    first = BatchSampler(tokens, 4, 16, seed=1)
    for _ in range(17):
        first.next_batch()
    resumed = BatchSampler(tokens, 4, 16, seed=0)
    resumed.load_state_dict(first.state_dict())
    rest = [resumed.next_batch()[0] for _ in range(13)]
    assert all(torch.equal(x, y) for x, y in zip(rest, expected[17:])), "resumed order differs"
    with pytest.raises(ValueError, match="resume with --batch-size 4"):
        BatchSampler(tokens, 8, 16).load_state_dict(first.state_dict())


def test_eval_batches_are_fixed_and_bounded():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(eval_batches(tokens, 8, 10, max_batches=3))
    assert len(batches) == 3 and batches[0][0][0, 0] == 0, [b[0][:, 0] for b in batches]


def test_corpus_split_sends_every_100th_chunk_to_val():
    docs = [list(range(5000))] * 50  # 50 docs of 5001 tokens (with EOT) -> 3 chunks each
    train, val = corpus.split_tokens(docs)
    # val = chunks 37 (doc 12, 2nd chunk: 2048 tokens) and 137 (doc 45, 3rd chunk: 905 tokens)
    assert len(train) + len(val) == 50 * 5001 and len(val) == 2048 + 905, len(val)
    assert train.dtype == np.uint16


# ---- training ---------------------------------------------------------------------------------


def small_run(tmp_path, out="run", **changes) -> TrainConfig:
    base = dict(preset="tiny", vocab_size=VOCAB, steps=12, batch_size=4, seq_len=32, lr=3e-3,
                compile=False, device="cpu", emulate="on", data_dir=str(tmp_path / "data"),
                out_dir=str(tmp_path / out), eval_every=0, eval_batches=2, progress="print")
    base.update(changes)
    return TrainConfig(**base)


def train_losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("fp8", ["none", "tensorwise"])
def test_a_few_steps_of_tiny_lower_the_loss(tmp_path, fp8):
    """On CPU the default dtype is float32: FP8 (emulated) trains float32 master weights."""
    write_corpus(tmp_path / "data")
    summary = run(small_run(tmp_path, fp8=fp8), say=lambda *a: None)
    losses = train_losses(tmp_path / "run")
    assert losses[12] < losses[1] - 1.0, f"{fp8}: loss {losses[1]:.3f} -> {losses[12]:.3f}"
    assert math.isfinite(summary["val_loss"]), summary
    start = compare.load_run(tmp_path / "run").start
    assert start["dtype"] == "float32", start


def test_a_run_with_float8_saved_activations_trains(tmp_path, monkeypatch):
    """--saved-activations fp8: the blocks compiled by compile_fp8 with the pass on (the tiny
    model's activations are below its size floor, lowered here), the loss falls as fp8's does."""
    from torch._dynamo.utils import counters

    from compile_fp8 import saved_activations

    monkeypatch.setattr(saved_activations, "MIN_MIB", 0.0)
    write_corpus(tmp_path / "data")
    counters.clear()
    with pytest.raises(ValueError, match="this run is float32"):
        small_run(tmp_path, fp8="tensorwise", compile=True, saved_activations="fp8")
    cfg = small_run(tmp_path, fp8="tensorwise", compile=True, saved_activations="fp8", dtype="bfloat16")
    assert cfg.name == "fp8-tensorwise-fp8saved"
    with torch._inductor.config.patch(force_disable_caches=True):  # a cache hit skips the pass
        summary = run(cfg, say=lambda *a: None)
    losses = train_losses(tmp_path / "run")
    assert losses[12] < losses[1] - 1.0, f"loss {losses[1]:.3f} -> {losses[12]:.3f}"
    assert math.isfinite(summary["val_loss"]), summary
    assert counters["inductor"]["activation_quantization_fwd_aten_pass"] >= 1
    for bad in (dict(fp8="none"), dict(compile=False), dict(fsdp=True)):
        with pytest.raises(ValueError, match="saved_activations='fp8' needs"):
            dataclasses.replace(cfg, **bad)
        with pytest.raises(ValueError, match="saved_activations='e5m2' needs"):
            dataclasses.replace(cfg, saved_activations="e5m2", **bad)
    assert dataclasses.replace(cfg, saved_activations="e5m2").name == "fp8-tensorwise-e5m2saved"


@pytest.mark.parametrize("scaling", ["static", "delayed"])
def test_static_and_delayed_runs_calibrate_on_one_batch_and_train(tmp_path, scaling):
    write_corpus(tmp_path / "data")
    said = []
    cfg = small_run(tmp_path, fp8="tensorwise", scaling=scaling, steps=6)
    assert cfg.name == f"fp8-tensorwise-{scaling}"
    summary = run(cfg, say=said.append)
    losses = train_losses(tmp_path / "run")
    assert losses[6] < losses[1], losses
    assert math.isfinite(summary["val_loss"]), summary
    assert any(f"calibrated {scaling} scaling on one batch" in line for line in said), said
    layers = [line for line in said if line.startswith("fp8 layers:")]
    assert layers and scaling in layers[0], layers


@pytest.mark.parametrize("scaling", ["static", "delayed"])
def test_calibrating_in_chunks_records_the_whole_batchs_amaxes(scaling):
    """The run calibrates a batch in whole-sequence chunks (a quarter of the eager pass's
    memory), each chunk's loss weighted by its share: every amax, the gradients' too, is the
    one calibrating the whole batch at once records."""
    from compile_fp8 import Float8Config, calibrate, compile_fp8
    from compile_fp8.lm.train import CALIBRATION_CHUNKS, _calibrate

    cfg = PRESETS["tiny"].replace(vocab_size=VOCAB, n_layers=2)
    config = Float8Config(scaling=scaling, static_grads=scaling == "static", emulate=True)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(compile_fp8(TransformerLM(cfg), config, module_filter_fn=lambda m, fqn: fqn != "head",
                                  compile=False))
    batch = (torch.randint(VOCAB, (8, 32)), torch.randint(VOCAB, (8, 32)))
    calibrate(models[0], [batch], loss_fn=lambda loss, _: loss)
    seen = []

    class Sampler:
        def next_batch(self):
            return batch

    real_forward = models[1].forward
    models[1].forward = lambda tokens, targets: seen.append(tokens.shape[0]) or real_forward(tokens, targets)
    _calibrate(TrainConfig(scaling=scaling, fp8="tensorwise"), models[1], Sampler(), "cpu", print, first=True)
    assert seen == [8 // CALIBRATION_CHUNKS] * CALIBRATION_CHUNKS, seen
    whole, chunked = (
        {k: v for k, v in m.state_dict().items() if "fp8_amax" in k} for m in models
    )
    assert whole and whole.keys() == chunked.keys()
    assert any("grad_output" in k for k in whole)
    for key in whole:
        assert (whole[key] > 0).any(), key
        assert torch.allclose(chunked[key], whole[key], rtol=1e-5, atol=0), (key, chunked[key], whole[key])


def test_a_static_run_recalibrates_every_n_steps_on_fresh_batches(tmp_path):
    """--recalibrate-every 2 over 6 steps: calibrated before step 1 and after steps 2 and 4 (not
    after the last), each time on the next calibration batch, so the stored scales move; the
    compiled model reads the new buffers without compiling again."""
    from torch._dynamo.utils import counters

    from compile_fp8.lm import train as train_module

    write_corpus(tmp_path / "data")
    said, stored = [], []
    real = train_module.calibrate

    def recording(model, batches, **kwargs):
        real(model, batches, **kwargs)
        stored.append(model.blocks[0].attn.qkv.fp8_amax_input.item())

    cfg = small_run(tmp_path, fp8="tensorwise", scaling="static", steps=6, recalibrate_every=2, compile=True)
    assert cfg.name == "fp8-tensorwise-static-recal2"
    torch._dynamo.reset()
    counters.clear()
    with pytest.MonkeyPatch.context() as mp:  # our module's name for calibrate, not torch's config
        mp.setattr(train_module, "calibrate", recording)
        summary = run(cfg, say=said.append)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert sum("calibrated static scaling" in line for line in said) == 3, said
    assert len(stored) == 3 and len(set(stored)) == 3, stored  # three different batches
    assert math.isfinite(summary["val_loss"]), summary
    for bad in (dict(recalibrate_every=-1), dict(scaling="dynamic"), dict(scaling="delayed")):
        with pytest.raises(ValueError, match="recalibrate_every=.* only with scaling='static'"):
            dataclasses.replace(cfg, **bad)


@pytest.mark.parametrize("fp8", ["none", "tensorwise"])
@pytest.mark.parametrize("dtype, expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("float32", torch.float32)])
def test_parameter_dtype_is_float32_on_cpu_by_default_and_an_explicit_one_is_honoured(
        tmp_path, fp8, dtype, expected):
    """`auto` = float32 on CPU (bf16 matmuls there are ~10x slower without native bf16);
    `--dtype bfloat16` still builds bf16 weights. The head (kept out of FP8) and the
    converted layers' master weights are in that dtype, and the run is named by it."""
    write_corpus(tmp_path / "data")
    cfg = small_run(tmp_path, fp8=fp8, dtype=dtype, steps=2)
    short = "fp32" if expected == torch.float32 else "bf16"
    assert cfg.param_dtype == str(expected).removeprefix("torch.")
    assert cfg.name == (short if fp8 == "none" else "fp8-tensorwise")
    said = []
    run_ = setup(cfg, say=said.append)
    run_.log.close()
    assert {p.dtype for p in run_.eval_model.parameters()} == {expected}
    assert run_.eval_model.head.weight.dtype == expected
    assert f"{cfg.param_dtype} parameters" in "\n".join(said), said
    if fp8 != "none":
        converted = [how for how in fp8_layers(run_.eval_model).values() if how.startswith("fp8")]
        assert len(converted) == 20, fp8_layers(run_.eval_model)  # 4 blocks x 5 linears
    start = compare.load_run(tmp_path / "run").start
    assert (start["dtype"], start["name"]) == (cfg.param_dtype, cfg.name), start
    assert bytes_per_param(cfg.param_dtype) == 4 * expected.itemsize  # weight, grad, 2 moments


def test_resume_continues_exactly_and_checkpoint_loads_weights_only(tmp_path):
    write_corpus(tmp_path / "data")
    quiet = dict(say=lambda *a: None)
    run(small_run(tmp_path, out="whole", fp8="tensorwise", steps=6), **quiet)
    run(small_run(tmp_path, out="split", fp8="tensorwise", steps=6, stop_after=3), **quiet)
    run(small_run(tmp_path, out="split", fp8="tensorwise", steps=6, resume=True), **quiet)
    whole, split = train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")
    assert whole == split, f"uninterrupted {whole} vs resumed {split}"
    state = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    model = TransformerLM(PRESETS["tiny"].replace(vocab_size=VOCAB))
    model.load_state_dict(state["model"])  # the FP8 run's weights load into a plain model
    assert state["step"] == 6 and state["data"]["step"] == 6, (state["step"], state["data"])


def test_resume_refuses_another_preset_and_fresh_run_refuses_a_checkpoint(tmp_path):
    write_corpus(tmp_path / "data")
    run(small_run(tmp_path, steps=2), say=lambda *a: None)
    with pytest.raises(ValueError, match="written by preset 'tiny'.*--preset tiny"):
        run(small_run(tmp_path, preset="small", resume=True), say=lambda *a: None)
    with pytest.raises(FileExistsError, match="already holds a checkpoint.*--resume"):
        run(small_run(tmp_path, steps=2), say=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .* to resume"):
        run(small_run(tmp_path, out="other", resume=True), say=lambda *a: None)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(lr=1.0, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(5, **kw) == 0.5 and lr_at(10, **kw) == 1.0
    assert abs(lr_at(60, **kw) - 0.55) < 1e-9 and abs(lr_at(110, **kw) - 0.1) < 1e-9


def test_bad_train_config_values_name_the_choices():
    with pytest.raises(ValueError, match="fp8='int8' is not supported; allowed values"):
        TrainConfig(fp8="int8")
    with pytest.raises(ValueError, match="preset='huge' is not known"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="dtype='float16' is not supported; allowed values"):
        TrainConfig(dtype="float16")
    with pytest.raises(ValueError, match="scaling='sometimes' is not supported; allowed values"):
        TrainConfig(fp8="tensorwise", scaling="sometimes")
    with pytest.raises(ValueError, match="scaling='static' needs fp8='tensorwise' without fsdp"):
        TrainConfig(fp8="rowwise", scaling="static")
    with pytest.raises(ValueError, match="fast_accum='some' is not supported; allowed values"):
        TrainConfig(fp8="tensorwise", fast_accum="some")


def test_cpu_probe_defaults_to_emulation_and_says_why():
    auto = hardware.probe("cpu", "auto")
    assert auto.emulate and auto.path == "emulation" and "reference kernel" in auto.reason
    assert hardware.probe("cpu", "off").path == "CPU real kernel"
    assert "FP8 path: emulation" in auto.describe()
    assert hardware.peak_flops("cpu", fp8=True) is None


# ---- comparison -------------------------------------------------------------------------------


def write_metrics(folder, fp8, losses, tokens_per_s, val, device="cuda"):
    folder.mkdir(parents=True)
    name = "bf16" if fp8 == "none" else f"fp8-{fp8}"
    lines = [{"event": "start", "name": name, "fp8": fp8, "preset": "tiny", "device": device}]
    lines += [{"step": i + 1, "loss": loss, "lr": 1e-3, "tokens_per_s": tokens_per_s,
               "mfu": None, "step_ms": 1.0} for i, loss in enumerate(losses)]
    lines += [{"step": len(losses), "val_loss": val},
              {"event": "end", "peak_mem_gib": 2.0, "first_step_s": 9.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_compare_runs_writes_table_and_plot(tmp_path):
    """Runs recorded on a GPU: tokens/s and the speed-up over bf16."""
    fp8 = write_metrics(tmp_path / "b", "tensorwise", [5.0] * 20 + [4.04] * 10, 1500.0, 4.2, device="cuda:0")
    bf16 = write_metrics(tmp_path / "a", "none", [5.0] * 20 + [4.0] * 10, 1000.0, 4.0, device="cuda:0")
    markdown = compare.write_report([fp8, bf16], tmp_path / "out")
    rows = [line for line in markdown.splitlines() if line.startswith("| bf16") or
            line.startswith("| fp8")]
    assert rows[0].startswith("| bf16"), markdown  # the reference comes first
    assert "4.0400 | +1.00% | 4.2000 | +5.00% | 1,500 | 1.50x | 2.00 | 9.0 |" in rows[1], rows[1]
    assert "Not on a GPU" not in markdown, markdown
    assert (tmp_path / "out" / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "comparison.md").read_text() == markdown


def test_compare_runs_on_cpu_shows_no_speed_up(tmp_path, capsys):
    """CPU runs (emulated FP8 GEMMs): no tokens/s, no speed-up ratio, a note saying why; the
    losses are still compared. Through scripts/compare_runs.py, as a user runs it."""
    import importlib.util
    from pathlib import Path

    fp8 = write_metrics(tmp_path / "b", "tensorwise", [5.0] * 20 + [4.04] * 10, 1500.0, 4.2, device="cpu")
    bf16 = write_metrics(tmp_path / "a", "none", [5.0] * 20 + [4.0] * 10, 1000.0, 4.0, device="cpu")
    path = Path(__file__).resolve().parent.parent / "scripts" / "compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(bf16), str(fp8), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert "speed-up |" not in rows[0] and "tokens/s" not in rows[0], rows[0]
    assert "4.0400 | +1.00% | 4.2000 | +5.00% | 2.00 | 9.0 |" in rows[2], rows[2]
    assert not any(ratio in printed for ratio in ("1.50x", "1.00x", "1,500", "0.67x")), printed
    assert "tokens/s there are not meaningful for FP8" in printed, printed
    assert (tmp_path / "out" / "loss.png").stat().st_size > 10_000


def test_compare_runs_shows_the_speed_up_only_of_runs_made_on_a_gpu(tmp_path):
    bf16 = write_metrics(tmp_path / "a", "none", [4.0] * 10, 1000.0, 4.0, device="cuda")
    gpu = write_metrics(tmp_path / "b", "tensorwise", [4.0] * 10, 1250.0, 4.0, device="cuda")
    cpu = write_metrics(tmp_path / "c", "rowwise", [4.0] * 10, 50.0, 4.0, device="cpu")
    rows = compare.table(compare.load_runs([bf16, gpu, cpu])).splitlines()
    assert "| 1,250 | 1.25x |" in rows[3], rows[3]
    assert "| n/a | n/a |" in rows[4] and "x |" not in rows[4], rows[4]
    # a GPU run against a CPU reference: no ratio either
    cpu_ref = write_metrics(tmp_path / "d", "none", [4.0] * 10, 50.0, 4.0, device="cpu")
    table = compare.table(compare.load_runs([cpu_ref, gpu]))
    assert "speed-up" not in table and "x |" not in table, table


def test_compare_runs_rejects_a_folder_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        compare.load_run(tmp_path)


def test_import_compile_fp8_stays_light():
    import subprocess
    import sys

    # torch itself imports tqdm when it is installed: check what compile_fp8 adds to torch.
    # (numpy is not checked: where triton is installed, registering compile_fp8.kernels' triton
    # ops makes torch's own triton support import numpy.)
    code = ("import sys, torch; before = set(sys.modules); import compile_fp8; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
            "('tqdm', 'tiktoken', 'matplotlib') or m.startswith('compile_fp8.lm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_train_cli_flags(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "train.py"
    spec = importlib.util.spec_from_file_location("train_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg = cli.parse_args(["--use_fp8", "--no-compile", "--steps", "5"])
    assert (cfg.fp8, cfg.compile, cfg.steps, cfg.out_dir) == (
        "tensorwise", False, 5, "runs/tiny-fp8-tensorwise"), dataclasses.asdict(cfg)
    with pytest.raises(SystemExit):
        cli.parse_args(["--use_fp8", "--fp8", "rowwise"])
    assert cli.parse_args(["--fp8", "rowwise", "--layer-filter", "auto"]).layer_filter == "auto"
    assert cfg.layer_filter == "all"
    # the baseline's dtype: auto is float32 on CPU, an explicit --dtype wins; the default run
    # folder is named after it
    auto = cli.parse_args(["--device", "cpu"])
    assert (auto.dtype, auto.param_dtype, auto.out_dir) == ("auto", "float32", "runs/tiny-fp32")
    bf16 = cli.parse_args(["--device", "cpu", "--dtype", "bfloat16"])
    assert (bf16.param_dtype, bf16.out_dir) == ("bfloat16", "runs/tiny-bf16"), bf16
    assert cli.parse_args(["--device", "cpu", "--out", "runs/x"]).out_dir == "runs/x"
    with pytest.raises(SystemExit):
        cli.parse_args(["--dtype", "float16"])
    static = cli.parse_args(["--fp8", "tensorwise", "--scaling", "static"])
    assert (static.scaling, static.out_dir) == ("static", "runs/tiny-fp8-tensorwise-static")
    with pytest.raises(SystemExit):
        cli.parse_args(["--scaling", "delayed"])  # needs --fp8 tensorwise
    fast = cli.parse_args(["--fp8", "tensorwise", "--scaling", "static", "--fast-accum", "all"])
    assert (fast.fast_accum, fast.out_dir) == ("all", "runs/tiny-fp8-tensorwise-static-fastaccum")
    saved = cli.parse_args(["--fp8", "tensorwise", "--saved-activations", "fp8", "--dtype", "bfloat16"])
    assert (saved.saved_activations, saved.out_dir) == ("fp8", "runs/tiny-fp8-tensorwise-fp8saved")
    for bad in (["--saved-activations", "fp8"], ["--fp8", "tensorwise", "--saved-activations", "fp8", "--no-compile"],
                ["--fp8", "tensorwise", "--saved-activations", "e5m2", "--device", "cpu"]):  # float32: nothing to store
        with pytest.raises(SystemExit):
            cli.parse_args(bad)
    with pytest.raises(SystemExit):
        cli.parse_args(["--fast-accum", "all"])  # needs an --fp8 recipe
