"""The benchmark CLIs run on CPU in their --small mode (their speed is measured on the GPU only)."""

import importlib.util
import pathlib

import pytest
import torch

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


def test_bench_train_step_small(tmp_path, capsys):
    bench = _load("bench_train_step")
    rc = bench.main(["--small", "--variants", "bf16,ours-tensorwise", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| bf16 |" in out and "| ours-tensorwise |" in out and "failed" not in out, out
    assert (tmp_path / "bench_train_step.json").exists()


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


def test_bench_train_step_experiment_suffix():
    """VARIANT+EXPERIMENT: parsed and checked; "rowamax" sets the per-row amax with AOTAutograd's
    cache off while the variant runs, then restores both."""
    from compile_fp8 import scaling

    bench = _load("bench_train_step")
    assert bench.parse_args(["--variants", "ours-tensorwise+rowamax"]).variants == ["ours-tensorwise+rowamax"]
    for bad in ("ours-tensorwise+nope", "nope+rowamax"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--variants", bad])
    seen = []

    @bench.in_experiment
    def probe(name):
        seen.append((name, scaling.TENSORWISE_AMAX, torch._functorch.config.enable_autograd_cache))

    cache_on = torch._functorch.config.enable_autograd_cache
    probe("ours-tensorwise+rowamax")
    probe("ours-tensorwise")
    assert seen == [("ours-tensorwise", "rows", False), ("ours-tensorwise", "flat", cache_on)]
    assert scaling.TENSORWISE_AMAX == "flat"


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


def test_bench_inference_installs_fastest_tiles_per_shape(tmp_path, monkeypatch):
    from compile_fp8 import fp8_gemv

    bench = _load("bench_inference")
    monkeypatch.setattr(fp8_gemv, "TUNED_CONFIGS", {})
    tiles = dict(block_k=256, split_k=1, num_warps=4, num_stages=3)
    rows = [
        {"sweep": "tiles", "n": 64, "k": 32, "block_n": 16, "ms": 0.02, **tiles},
        {"sweep": "tiles", "n": 64, "k": 32, "block_n": 32, "ms": 0.01, **tiles},
        {"sweep": "tiles", "x": "fp8", "n": 64, "k": 32, "block_n": 64, "ms": 0.005, "swap_ab": True, **tiles},
        {"sweep": "m", "n": 64, "k": 32, "m": 16, "path": "bf16", "ms": 0.001},
    ]
    sweep = tmp_path / "sweep.json"
    sweep.write_text(bench.json.dumps({"rows": rows, "notes": []}))
    assert bench.install_tuning(sweep) == {  # the fastest per shape and x flavour
        (64, 32): {"block_n": 32, **tiles, "swap_ab": False},
        (64, 32, "fp8"): {"block_n": 64, **tiles, "swap_ab": True},
    }
    assert fp8_gemv.config_for(64, 32)["block_n"] == 32
    assert fp8_gemv.config_for(64, 32, "fp8")["block_n"] == 64
    assert fp8_gemv.config_for(32, 64) == fp8_gemv.WEIGHT_ONLY_CONFIG


def test_bench_inference_tile_preset_applies_to_its_variant_only(monkeypatch):
    """`ours-static@split2`: the preset's tiles are in TUNED_CONFIGS while the variant converts and
    compiles (the layer traces them into its graph), and the previous tuning comes back after."""
    from compile_fp8 import fp8_gemv

    bench = _load("bench_inference")
    monkeypatch.setattr(fp8_gemv, "TUNED_CONFIGS", {(1, 2): {"block_n": 16}})
    seen = []
    monkeypatch.setattr(bench, "_bench_converted", lambda name, *a: seen.append((name, dict(fp8_gemv.TUNED_CONFIGS))))
    bench.bench_variant("ours-static@split2", None, None, "default", None, None, torch.device("cpu"))
    name, tuned = seen[0]
    assert name == "ours-static" and tuned[(2048, 5632, "fp8")]["split_k"] == 2 and (1, 2) in tuned, seen
    assert fp8_gemv.TUNED_CONFIGS == {(1, 2): {"block_n": 16}}
    assert bench.split_variant("bf16", "@") == ("bf16", None)
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "ours-static@nosuchpreset"])


def test_bench_inference_flag_preset_switches_a_pass_for_its_variant_only(monkeypatch):
    """`ours-static@nogroup` / `@castout`: the group pass's switch is off while the variant
    compiles and runs, and back on after (the A/B of docs/benchmarks.md)."""
    from compile_fp8 import group

    bench = _load("bench_inference")
    seen = []
    monkeypatch.setattr(bench, "_bench_converted", lambda name, *a: seen.append((group.ENABLED, group.CAST_IN_KERNEL)))
    for variant in ("ours-static@nogroup", "ours-static@castout", "ours-static"):
        bench.bench_variant(variant, None, None, "default", None, None, torch.device("cpu"))
    assert seen == [(False, True), (True, False), (True, True)], seen
    assert group.ENABLED and group.CAST_IN_KERNEL


def test_profile_compile_splits_the_first_step(tmp_path):
    """Run as a subprocess: the script turns inductor's caches off for its whole process."""
    import subprocess
    import sys

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


@pytest.mark.parametrize("x", ["bf16", "fp16"])
def test_weight_only_kernel_dequantizes_without_f2f(x):
    """probe_sass compiles the weight-only kernel for sm_90a here (no GPU): its float8 -> bf16/fp16
    dequantization must not use F2F, the per-element conversion triton's plain e4m3 -> bf16 emits
    (64 per thread and K tile; `fp8_gemv._dequantize`), and the loop must still run HMMAs."""
    pytest.importorskip("triton")
    probe = _load("probe_sass")
    counts = probe.opcode_counts(probe.compile_weight_only(x).asm["sass"])
    assert counts["HMMA"] > 0 and counts["F2F"] == 0, counts.most_common(12)


def test_probe_sass_rejects_an_unknown_x():
    with pytest.raises(ValueError, match="allowed"):
        _load("probe_sass").compile_weight_only("int8")
