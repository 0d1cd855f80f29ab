"""The benchmark CLIs run on CPU in their --small mode (their speed is measured on the GPU only)."""

import importlib.util
import pathlib

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


def test_bench_inference_small(tmp_path, capsys):
    bench = _load("bench_inference")
    rc = bench.main(["--small", "--variants", "bf16,ours-tensorwise", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| prefill | 2x32 | default | ours-tensorwise |" in out and "failed" not in out, out
    assert "| decode | 4x1 | default | bf16 |" in out, out
    assert (tmp_path / "bench_inference.json").exists() and (tmp_path / "bench_inference.md").exists()
