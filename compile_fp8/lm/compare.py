"""Compare training runs: a markdown table and a PNG of the loss curves, from metrics.jsonl files.

For each run (a run folder, or a metrics .jsonl file itself):

* final train loss: the mean of the last 10 logged training losses (one step's loss is noisy);
* final val loss: the last val loss logged (a fixed set of val batches, same for every run);
* relative difference to the reference, the run with `fp8 == "none"` (the baseline, named by
  its parameter dtype: bf16, or fp32 on CPU): (run - ref) / ref;
* tokens/s: the median over the steady state (the first 10% of steps, which include
  compilation, left out); speed-up = tokens/s / the reference's;
* peak memory: CUDA's max allocated on GPU, the process's peak RSS on CPU (as logged);
* first step: seconds of step 1, mostly torch.compile's compilation.

Speed is compared only between runs recorded on a CUDA GPU (the `device` of each run's start
record, which `train.py` writes). On CPU the FP8 GEMMs are emulated (or run torch's reference
`_scaled_mm`), so an FP8 run's tokens/s there measure the emulation, not FP8: a CPU run gets no
tokens/s and no speed-up, the report says why, and only its losses are compared.

matplotlib is imported lazily and with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import METRICS_NAME, read_records

LAST_N = 10


@dataclass
class RunSummary:
    label: str
    fp8: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    start: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return statistics.fmean(self.losses[-LAST_N:]) if self.losses else math.nan

    @property
    def final_val(self) -> float:
        return self.val[-1][1] if self.val else math.nan

    @property
    def steady_tokens_per_s(self) -> float:
        steady = self.tokens_per_s[max(1, len(self.tokens_per_s) // 10):] or self.tokens_per_s
        return statistics.median(steady) if steady else math.nan


def metrics_path(path: str | Path) -> Path:
    path = Path(path)
    return path / METRICS_NAME if path.is_dir() else path


def load_run(path: str | Path) -> RunSummary:
    """Read one run; FileNotFoundError / ValueError say what is wrong with it."""
    file = metrics_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: pass run folders written by "
                                "scripts/train.py --out DIR (or their metrics.jsonl files)")
    records = read_records(file)
    starts = [r for r in records if r.get("event") == "start"]
    if not starts:
        raise ValueError(f"{file} has no start record: not a scripts/train.py metrics file")
    run = RunSummary(label=starts[0].get("name", file.parent.name), fp8=starts[0].get("fp8"),
                     start=starts[0])
    for r in records:
        if r.get("event") == "end":
            run.end = r
        elif r.get("loss") is not None:
            run.steps.append(r["step"])
            run.losses.append(r["loss"])
            run.tokens_per_s.append(r["tokens_per_s"])
        elif r.get("val_loss") is not None:
            run.val.append((r["step"], r["val_loss"]))
    return run


def load_runs(paths) -> list[RunSummary]:
    runs = [load_run(p) for p in paths]
    seen: dict[str, int] = {}
    for run in runs:  # two runs of one name: tell them apart by folder
        seen[run.label] = seen.get(run.label, 0) + 1
    for run, path in zip(runs, paths):
        if seen[run.label] > 1:
            run.label = f"{run.label} ({metrics_path(path).parent.name})"
    return runs


def reference(runs: list[RunSummary]) -> RunSummary:
    """The baseline run (fp8 "none": bf16 or fp32); the first run if there is none."""
    return next((r for r in runs if r.fp8 == "none"), runs[0])


def on_gpu(run: RunSummary) -> bool:
    """Whether the run was recorded on a CUDA device (its start record's `device`, e.g.
    "cuda" or "cuda:0"): the only place its tokens/s say something about FP8's speed."""
    return str(run.start.get("device") or "").split(":")[0] == "cuda"


def speed_comparable(run: RunSummary, ref: RunSummary) -> bool:
    """A speed-up of `run` over `ref` means something: both ran on a GPU."""
    return on_gpu(run) and on_gpu(ref)


def cpu_note(runs: list[RunSummary]) -> str:
    """Why runs get no tokens/s and no speed-up ("" when every run was made on a GPU)."""
    elsewhere = [r for r in runs if not on_gpu(r)]
    if not elsewhere:
        return ""
    where = ", ".join(f"{r.label} on {r.start.get('device') or 'an unrecorded device'}" for r in elsewhere)
    which = "any run" if not on_gpu(reference(runs)) else "those runs"
    return (f"Not on a GPU: {where}. On CPU the FP8 GEMMs are emulated (float32 GEMMs plus the "
            "casts), so tokens/s there are not meaningful for FP8: no tokens/s or speed-up is "
            f"shown for {which}, only the losses are compared. FP8's speed needs a CUDA GPU with "
            "FP8 tensor cores (sm89+: H100, H200, L4, RTX 4090).")


def _rel(value: float, ref: float) -> str:
    if not (math.isfinite(value) and math.isfinite(ref)) or ref == 0:
        return "n/a"
    return f"{100 * (value - ref) / ref:+.2f}%"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)


def table(runs: list[RunSummary]) -> str:
    """The markdown comparison table (one row per run, the reference first). The tokens/s and
    speed-up columns appear only where some run's speed can be compared (`speed_comparable`);
    a run on CPU shows "n/a" there."""
    ref = reference(runs)
    speed_columns = any(speed_comparable(r, ref) for r in runs)
    header = (f"| run | steps | train loss (last {LAST_N}) | vs {ref.label} | final val loss | "
              f"vs {ref.label} |")
    header += " tokens/s (median) | speed-up |" if speed_columns else ""
    header += " peak memory GiB | first step s |"
    rows = [header, "|---|" + "---:|" * (header.count("|") - 2)]
    for run in [ref] + [r for r in runs if r is not ref]:
        same = run is ref
        row = (f"| {run.label} | {run.steps[-1] if run.steps else 0} | {_num(run.final_loss, '.4f')}"
               f" | {'-' if same else _rel(run.final_loss, ref.final_loss)} | "
               f"{_num(run.final_val, '.4f')} | {'-' if same else _rel(run.final_val, ref.final_val)} |")
        if speed_columns and speed_comparable(run, ref):
            tps, ref_tps = run.steady_tokens_per_s, ref.steady_tokens_per_s
            speed = tps / ref_tps if math.isfinite(tps) and ref_tps else math.nan
            row += f" {_num(tps, ',.0f')} | {_num(speed, '.2f')}x |"
        elif speed_columns:
            row += " n/a | n/a |"
        row += f" {_num(run.end.get('peak_mem_gib'), '.2f')} | {_num(run.end.get('first_step_s'), '.1f')} |"
        rows.append(row)
    return "\n".join(rows)


def context(runs: list[RunSummary]) -> str:
    """One line per run saying where and how it ran (device, parameter dtype, FP8 path, shape)."""
    lines = []
    for run in runs:
        s = run.start
        mem = run.end.get("peak_mem_kind", "")
        dtype = s.get("dtype") or "bfloat16"  # runs logged before the field trained in bf16
        lines.append(f"- {run.label}: preset {s.get('preset')}, {dtype} parameters, "
                     f"{s.get('batch_size')} x {s.get('seq_len')} tokens/step, lr {s.get('lr')}, "
                     f"seed {s.get('seed')}, "
                     f"compile={s.get('compile')}, on {s.get('device_name')} "
                     f"(torch {s.get('torch')}), FP8 path: {s.get('fp8_path')}; "
                     f"peak memory = {mem or 'n/a'}")
    return "\n".join(lines)


def _smooth(values: list[float]) -> list[float]:
    """Trailing mean over ~5% of the run (at most 50 steps; none for short runs)."""
    window = max(1, min(50, len(values) // 20))
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def plot(runs: list[RunSummary], path: str | Path) -> None:
    """Train loss (smoothed; val loss as dots), difference to the reference's smoothed train
    loss in percent, and tokens/s of the runs made on a GPU (no third panel when there is none:
    `cpu_note`)."""
    import matplotlib  # lazy: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference(runs)
    ref_smooth = dict(zip(ref.steps, _smooth(ref.losses)))
    speed = any(on_gpu(r) for r in runs)
    fig, axes = plt.subplots(1, 3 if speed else 2, figsize=(16 if speed else 11, 4.5))
    ax_loss, ax_diff, ax_speed = (*axes, None) if not speed else axes
    for run in runs:
        smooth = _smooth(run.losses)
        (line,) = ax_loss.plot(run.steps, smooth, label=f"{run.label} (train, smoothed)")
        ax_loss.plot(run.steps, run.losses, color=line.get_color(), alpha=0.15, linewidth=0.7)
        if run.val:
            ax_loss.plot(*zip(*run.val), "o--", color=line.get_color(), markersize=4,
                         label=f"{run.label} (val)")
        diff = [(s, 100 * (v - ref_smooth[s]) / ref_smooth[s])
                for s, v in zip(run.steps, smooth) if s in ref_smooth]
        if diff and run is not ref:
            ax_diff.plot(*zip(*diff), color=line.get_color(), label=run.label)
        if ax_speed is not None and on_gpu(run):
            ax_speed.plot(run.steps, run.tokens_per_s, color=line.get_color(), label=run.label)
    _label(ax_loss, "loss", "loss (nats/token)")
    _label(ax_diff, f"smoothed train loss vs {ref.label}", "relative difference (%)")
    ax_diff.axhline(0, color="gray", linewidth=0.8)
    if ax_speed is not None:
        _label(ax_speed, "throughput (GPU runs)", "tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def write_report(paths, out_dir: str | Path) -> str:
    """Write `comparison.md` and `loss.png` into `out_dir`; return the markdown."""
    runs = load_runs(list(paths))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(runs, out_dir / "loss.png")
    ref = reference(runs)
    notes = []
    if any(speed_comparable(r, ref) for r in runs):
        notes.append("tokens/s is the median after the first 10% of steps (compilation left out); "
                     f"speed-up is relative to {ref.label}.")
    if cpu_note(runs):
        notes.append(cpu_note(runs))
    markdown = (f"# Training runs compared\n\n{table(runs)}\n\n{context(runs)}\n\n"
                + "".join(f"{note}\n\n" for note in notes) + "![loss](loss.png)\n")
    (out_dir / "comparison.md").write_text(markdown)
    return markdown
