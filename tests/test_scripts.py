"""The benchmark CLIs run on CPU in their --small mode (their speed is measured on the GPU only);
scripts/gpu_check.sh runs its stages with a stand-in interpreter; the small-M kernel's SASS."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import sass_tools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(script):
    spec = importlib.util.spec_from_file_location(script, ROOT / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_linear_small(tmp_path, capsys):
    bench = _load("bench_linear")
    variants = "bf16,ours-tensorwise,ours-static,ours-triton,torchao-tensorwise"
    rc = bench.main(["--small", "--variants", variants, "--shapes", "32x48", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| 32 | 48 |" in out and "err" not in out, out
    assert (tmp_path / "bench_linear.json").exists() and (tmp_path / "bench_linear.md").exists()


def test_bench_linear_layer_grid_is_a_shape_set():
    """`--shapes layers`: every K, N of 512 .. 8192 and the 956M model's shapes, smallest first."""
    bench = _load("bench_linear")
    shapes = bench.parse_shapes("layers")
    assert len(shapes) == 25 + 3 and shapes[0] == (512, 512) and shapes[-1] == (8192, 8192), shapes
    assert {(2048, 6144), (2048, 5632), (5632, 2048)} <= set(shapes)
    assert [k * n for k, n in shapes] == sorted(k * n for k, n in shapes)
    assert bench.parse_shapes("default") == list(bench.DEFAULT_SHAPES)
    assert bench.parse_shapes("32x48,64x32") == [(32, 48), (64, 32)]


def test_bench_train_step_small(tmp_path, capsys):
    bench = _load("bench_train_step")
    rc = bench.main(["--small", "--variants", "bf16,ours-tensorwise", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| bf16 |" in out and "| ours-tensorwise |" in out and "failed" not in out, out
    rows = json.loads((tmp_path / "bench_train_step.json").read_text())["rows"]
    assert all(r["back_to_back_ms"] > 0 for r in rows), rows  # the unsynchronized steps ran and were timed


def test_profile_train_step_small_profiles_the_refresh_and_no_eager_head(tmp_path):
    """The profiled steps are bench_train_step's: a static variant's include its
    `refresh_weight_scales` (one `_foreach_norm`), and per-block compile leaves no eager final
    norm or head (`TransformerLM.compile_loss` compiles them with the loss)."""
    profile = _load("profile_train_step")
    variant = "ours-staticgrads-fastaccum"
    rc = profile.main(["--small", "--layers", "2", "--variants", variant, "--top", "100", "--out", str(tmp_path)])
    assert rc == 0
    ops = {name for name, _ in json.loads((tmp_path / "profile_train_step.json").read_text())["top_kernels_ms"][variant]}
    assert "aten::_foreach_norm" in ops, ops
    assert not {"aten::linear", "aten::rms_norm"} & ops, ops


def test_profile_train_step_idle_gaps_names_the_kernels_around_each_gap():
    """Idle time is the span less the union of kernel intervals (overlaps count once), per step,
    and each gap is charged to the pair of kernels around it."""
    from types import SimpleNamespace as NS

    profile = _load("profile_train_step")

    def kernel(name, start, end):
        return NS(name=name, device_type="DeviceType.CUDA", time_range=NS(start=start, end=end))

    events = [kernel("a", 0, 100), kernel("b", 50, 120), kernel("c", 1120, 1200),  # b overlaps a
              kernel("a", 1200, 1300), kernel("c", 3300, 3400), NS(name="cpu op", device_type="CPU",
                                                                     time_range=NS(start=0, end=9000))]
    idle = profile.idle_gaps(NS(events=lambda: events), steps=2)
    assert idle["span_ms"] == 1.7 and idle["idle_ms"] == 1.5, idle  # 3400 us over 2 steps; 1000 + 2000 us idle
    assert [(ms, a, b) for ms, _, a, b in idle["gaps"]] == [(1.0, "a", "c"), (0.5, "b", "c")], idle


def test_bench_train_step_auto_variant_filters_layers():
    """ours-<recipe>-auto converts with layer_filter="auto": the toy model's 64-wide layers stay bf16."""
    from compile_fp8 import fp8_layers

    bench = _load("bench_train_step")
    args = bench.parse_args(["--small", "--variants", "ours-tensorwise-auto"])
    model, _ = bench.build_model(args, torch.device("cpu"))
    compiled = bench.convert("ours-tensorwise-auto", model, None, emulate=True)
    report = fp8_layers(compiled)
    body = {fqn: how for fqn, how in report.items() if fqn != "head"}
    assert body and all(how.startswith("skipped: layer_filter='auto'") for how in body.values()), report


def test_bench_train_step_fastaccum_variant_sets_the_recipe():
    from compile_fp8 import Float8TrainingWeight

    bench = _load("bench_train_step")
    args = bench.parse_args(["--small", "--variants", "ours-tensorwise-fastaccum"])
    model, _ = bench.build_model(args, torch.device("cpu"))
    compiled = bench.convert("ours-tensorwise-fastaccum", model, None, emulate=True)
    recipes = {p._recipe for p in compiled.parameters() if isinstance(p, Float8TrainingWeight)}
    assert recipes and all(r.grad_input.use_fast_accum and r.grad_weight.use_fast_accum for r in recipes)


@pytest.mark.parametrize("saved", ["fp8", "e5m2"])
def test_bench_train_step_saved_variants_set_the_config(saved):
    from compile_fp8.layers import ConvertedLayer, layer_state

    bench = _load("bench_train_step")
    args = bench.parse_args(["--small", "--variants", f"ours-staticgrads-fastaccum-{saved}saved"])
    device = torch.device("cpu")
    base, cfg = bench.build_model(args, device, n_layers=2)  # repeated blocks: regional compile
    batch = bench.random_batch(cfg.vocab_size, args.batch, args.seq, device)
    model = bench.convert(args.variants[0], base, batch, emulate=True)
    configs = {layer_state(m).config for m in model.modules() if isinstance(layer_state(m), ConvertedLayer)}
    assert {(c.saved_activations, c.static_grads, c.fast_accum) for c in configs} == {(saved, True, "all")}


def test_bench_kernels_accum_small(tmp_path, capsys):
    bench = _load("bench_kernels")
    rc = bench.main(["--small", "--accum", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| 32 x 48 | grad_weight |" in out, out


def test_bench_train_step_experiment_suffix():
    """VARIANT+EXPERIMENT[+EXPERIMENT]: parsed and checked; "cdt" turns inductor's
    coordinate-descent tuning on while the variant runs, then restores it; two apply together."""
    from torch._inductor import config as inductor_config

    bench = _load("bench_train_step")
    assert bench.parse_args(["--variants", "ours-tensorwise+cdt"]).variants == ["ours-tensorwise+cdt"]
    assert bench.split_variant("ours-tensorwise+cdt+nd") == ("ours-tensorwise", ("cdt", "nd"))
    for bad in ("ours-tensorwise+nope", "nope+cdt", "ours-tensorwise+rowamax", "ours-tensorwise+cdt+nope"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--variants", bad])
    seen = []

    @bench.in_experiment
    def probe(name):
        seen.append((name, inductor_config.coordinate_descent_tuning))

    before = inductor_config.coordinate_descent_tuning
    probe("ours-tensorwise+cdt")
    probe("ours-tensorwise")
    assert seen == [("ours-tensorwise", True), ("ours-tensorwise", before)]
    assert inductor_config.coordinate_descent_tuning == before


def test_bench_train_step_pin_keeps_float8_inputs_while_the_variant_runs():
    from torch._inductor import config as inductor_config

    from compile_fp8.training import linear_fn

    bench = _load("bench_train_step")
    seen = []

    @bench.in_experiment
    def probe(name):
        seen.append((linear_fn.SAVE_FLOAT8_INPUTS, inductor_config.triton.cudagraphs))

    probe("ours-staticgrads+pin+cg")
    probe("ours-staticgrads")
    assert seen == [(True, True), (False, False)]


def test_bench_train_step_attnhp_filters_the_pass_while_the_variant_runs():
    from torch._functorch import partitioners

    bench = _load("bench_train_step")
    default = partitioners.should_quantize
    seen = []

    @bench.in_experiment
    def probe(name):
        seen.append((name, partitioners.should_quantize is default))

    probe("ours-staticgrads-fastaccum-e5m2saved+attnhp")
    assert seen == [("ours-staticgrads-fastaccum-e5m2saved", False)]
    assert partitioners.should_quantize is default


def test_bench_inference_small(tmp_path, capsys):
    bench = _load("bench_inference")
    rc = bench.main(["--small", "--variants", "bf16,ours-tensorwise", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| prefill | 2x32 | default | ours-tensorwise |" in out and "failed" not in out, out
    assert "| decode | 4x1 | default | bf16 |" in out, out
    assert (tmp_path / "bench_inference.json").exists() and (tmp_path / "bench_inference.md").exists()


def test_bench_inference_kernel_gaps_locate_idle_time():
    """Two calls of kernels a, b, c (start us, duration us): idle 1 us before b, 5 us before c,
    10 us between the calls; per position, averaged over the calls, and the largest gap first."""
    bench = _load("bench_inference")
    timeline = [("a", 0.0, 2.0), ("b", 3.0, 1.0), ("c", 9.0, 1.0),
                ("a", 20.0, 2.0), ("b", 23.0, 1.0), ("c", 29.0, 1.0)]  # fmt: skip
    gaps = bench.kernel_gaps(timeline, calls=2)
    assert gaps["in_call_us"] == 6.0 and gaps["between_calls_us"] == 10.0, gaps
    assert gaps["largest"] == [(5.0, "b", "c"), (1.0, "a", "b")], gaps
    assert gaps["by_kernel"] == [["c", 1, 5.0], ["b", 1, 1.0]], gaps
    assert bench.kernel_gaps(timeline[:-1], calls=2) is None  # unequal calls: no alignment
    text = bench.render_profiles([{"case": "decode", "mode": "reduce-overhead", "variant": "bf16", "ms": 0.05,
                                   "profile": {"kernels": [["a", 1, 2.0]], "total_us": 4.0, "launches": 3,
                                               "gaps": gaps}}])  # fmt: skip
    assert "6 us between its kernels, 10 us between calls" in text and "- 5.0 us: `b` -> `c`" in text, text
    assert "- 5.0 us before 1 x `c`" in text, text


def test_bench_inference_variants_choose_the_small_m_path_in_the_config():
    """`-fp8x` variants ask for float8 x at small M through Float8Config.small_m_activation; the
    others leave it "auto". Variants with a `@PRESET` suffix (module patches) are gone."""
    bench = _load("bench_inference")
    args = bench.parse_args(["--small"])
    cpu = torch.device("cpu")
    assert bench.inference_config("ours-static-fp8x", args, cpu).small_m_activation == "fp8"
    assert bench.inference_config("ours-rowwise-fp8x", args, cpu).recipe == "rowwise"
    static = bench.inference_config("ours-static", args, cpu)
    assert (static.scaling, static.recipe, static.small_m_activation) == ("static", "tensorwise", "auto")
    assert bench.inference_config("ours-tensorwise", args, cpu).mode == "inference"
    for bad in ("ours-static@split2", "ours-static@nogroup", "ours-tensorwise@hpsplitout"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--variants", bad])


def test_profile_compile_splits_the_first_step(tmp_path):
    """Run as a subprocess: the script turns inductor's caches off for its whole process."""
    cmd = [sys.executable, str(ROOT / "scripts" / "profile_compile.py"), "--device", "cpu", "--layers", "1",
           "--d-model", "256", "--batch", "1", "--seq", "32", "--variants", "bf16,ours-tensorwise",
           "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in (tmp_path / "profile_compile.md").read_text().splitlines()
            if line.startswith("| bf16") or line.startswith("| ours")]  # fmt: skip
    assert [r[1].strip() for r in rows] == ["bf16", "ours-tensorwise"], rows
    for r in rows:  # first step > 0, and the FP8 graph generates kernels
        assert float(r[2]) > 0 and int(r[8]) > 0, r


def _stand_in(tmp_path, fail_on: str = "", sleep: bool = False) -> str:
    """An executable for $PYTHON that records its arguments in calls.txt, then fails (exit 3)
    when they contain `fail_on`, or sleeps (`sleep`: to run into a stage's time limit)."""
    path = tmp_path / ("sleep" if sleep else "python")
    body = "exec sleep 30" if sleep else f'case "$*" in *{fail_on or "@@"}*) echo boom; exit 3 ;; esac\necho "1 passed"'
    path.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "calls.txt"}\n{body}\n')
    path.chmod(0o755)
    return str(path)


def _gpu_check(results, **settings) -> subprocess.CompletedProcess:
    """scripts/gpu_check.sh RESULTS with these environment variables (and none of the caller's
    GPU_CHECK_* ones)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(results)], env={**env, **settings},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_gpu_check_runs_every_stage_past_a_failing_one(tmp_path):
    """gpu_check.sh runs pytest -m gpu, then each benchmark with --out under the results folder;
    a failing stage is reported and the next still runs; the exit status says one failed."""
    results = tmp_path / "results"
    done = _gpu_check(results, PYTHON=_stand_in(tmp_path, fail_on="bench_linear.py"))
    assert done.returncode == 1, done.stdout + done.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert "-m pytest -m gpu -q" in calls, calls
    for script in ("bench_linear", "bench_train_step", "bench_inference"):
        call = next(c for c in calls if f"scripts/{script}.py" in c)
        assert call.endswith(f"--out {results}/{script}"), call
    assert "torchao-tensorwise" in next(c for c in calls if "bench_train_step.py" in c)
    summary = done.stdout[done.stdout.index("== summary"):]
    assert "failed (exit 3)" in summary and summary.count(" ok ") == 4, summary  # env, tests, train_step, inference
    assert "tests: 1 passed" in summary, summary
    assert (results / "linear.log").read_text().strip() == "boom"


def test_gpu_check_stages_and_time_limits_come_from_the_environment(tmp_path):
    python = _stand_in(tmp_path)
    done = _gpu_check(tmp_path / "r", PYTHON=python, GPU_CHECK_STAGES="tests inference",
                      GPU_CHECK_INFERENCE_VARIANTS="bf16,ours-static")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 and "--variants bf16,ours-static" in calls[1], calls
    done = _gpu_check(tmp_path / "r", PYTHON=_stand_in(tmp_path, sleep=True), GPU_CHECK_STAGES="tests",
                      GPU_CHECK_TESTS_TIMEOUT="1")  # fmt: skip
    assert done.returncode == 1 and "timed out (1s)" in done.stdout, done.stdout
    done = _gpu_check(tmp_path / "r", PYTHON=python, GPU_CHECK_STAGES="nosuchstage")
    assert done.returncode == 2 and "unknown stage" in done.stderr, done.stderr


@pytest.mark.parametrize("x", ["bf16", "fp16"])
def test_weight_only_kernel_dequantizes_without_f2f(x):
    """sass_tools compiles the weight-only kernel for sm_90a here (no GPU): its float8 -> bf16/fp16
    dequantization must not use F2F, the per-element conversion triton's plain e4m3 -> bf16 emits
    (64 per thread and K tile; `small_m_kernels._dequantize`), and the loop must still run HMMAs."""
    pytest.importorskip("triton")
    counts = sass_tools.opcode_counts(sass_tools.compile_weight_only(x).asm["sass"])
    assert counts["HMMA"] > 0 and counts["F2F"] == 0, counts.most_common(12)


def test_sass_tools_rejects_an_unknown_x():
    with pytest.raises(ValueError, match="allowed"):
        sass_tools.compile_weight_only("int8")


def _alloc(addr, size, filename="model.py", line=0):
    return {"action": "alloc", "addr": addr, "size": size, "frames": [{"filename": filename, "line": line, "name": "f"}]}


def test_profile_memory_finds_what_is_alive_at_the_peak():
    prof = _load("profile_memory")
    events = [
        _alloc(1, 100, "a.py"),
        _alloc(2, 50, "b.py"),
        {"action": "free_requested", "addr": 1},
        {"action": "free_completed", "addr": 1},  # freed once, counted once
        _alloc(3, 80, "c.py"),  # 130 alive: below the peak of 150
        {"action": "free_completed", "addr": 99},  # allocated before the trace: ignored
        _alloc(4, 40, "b.py"),  # 170 alive: the peak, b.py twice
    ]
    result = prof.peak_breakdown(events, top=2)
    assert result["peak_bytes"] == 170 and result["alive_at_peak"] == 3
    assert [(s["site"], s["bytes"], s["count"]) for s in result["sites"]] == [
        ("b.py:0 (f)", 90, 2), ("c.py:0 (f)", 80, 1)]  # fmt: skip
    assert result["other_sites_bytes"] == 0


def test_profile_memory_names_the_site_outside_torch_with_its_source_line():
    prof = _load("profile_memory")
    torch_file = str(pathlib.Path(prof.TORCH_DIR) / "nn" / "functional.py")
    here = str(pathlib.Path(__file__).resolve())
    frames = [{"filename": torch_file, "line": 1, "name": "linear"},
              {"filename": here, "line": 1, "name": "forward"}]  # fmt: skip
    site = prof.allocation_site(frames)
    assert site.startswith("test_scripts.py:1 (forward)") and '"""' in site, site
    assert prof.allocation_site([]) == "(no Python frame)"


def test_profile_memory_refuses_unknown_variants_and_needs_a_gpu(capsys):
    prof = _load("profile_memory")
    with pytest.raises(SystemExit):
        prof.main(["--variants", "bf16,ours-nothing"])
    assert "ours-nothing" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert prof.main(["--variants", "bf16"]) == 2
        assert "no GPU" in capsys.readouterr().err
