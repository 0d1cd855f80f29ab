"""What the benchmark and profiler scripts share: the `--out DIR` option and writing results there,
the machine's description, the CUDA kernels of a few calls (torch profiler), and running one
variant without letting its failure cost the other variants' rows.

Not a command: the scripts beside it import it (each puts scripts/ on sys.path first).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch


def add_out_argument(parser: argparse.ArgumentParser, name: str, what: str | None = None) -> None:
    """`--out DIR`: where the script writes `name`.md (and .json); created if missing."""
    what = what or f"{name}.md and {name}.json"
    parser.add_argument("--out", default=f"runs/{name}", metavar="DIR",
                        help=f"folder for {what}; created if missing (default: %(default)s)")  # fmt: skip


def write_results(out_dir, name: str, text: str, data=None) -> None:
    """`text` to OUT_DIR/name.md and `data` (when given) to OUT_DIR/name.json. Scripts call this
    after every row, so a run cut short (a time limit, a crash) keeps the rows it finished."""
    if not out_dir:
        return
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    if data is not None:
        (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def versions() -> dict:
    """torch's, triton's and torchao's versions ("n/a" for one that is not installed)."""
    out = {"torch": torch.__version__}
    for module in ("triton", "torchao"):
        try:
            out[module] = __import__(module).__version__
        except Exception:  # missing, or broken on this machine
            out[module] = "n/a"
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def raise_compile_limits(limit: int = 64) -> None:
    """Room in dynamo's per-function cache for every variant and shape of one process."""
    cfg = torch._dynamo.config
    for key in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), limit))
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4 * limit)


def kernel_timeline(fn, steps: int = 20) -> list[tuple[str, float, float]]:
    """The CUDA kernels of `steps` calls of `fn` (torch profiler), in launch order on the GPU:
    (name, start us, duration us)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    timeline = []
    for event in prof.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            us = event.device_time if hasattr(event, "device_time") else event.cuda_time
            timeline.append((event.name, event.time_range.start, us))
    return sorted(timeline, key=lambda k: k[1])


def kernels_by_name(timeline) -> dict[str, list]:
    """A `kernel_timeline` summed per kernel name: name -> [launches, total us]."""
    kernels: dict[str, list] = {}
    for name, _, us in timeline:
        entry = kernels.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    return kernels


def try_variant(fn, name: str, notes: list[str], label: str | None = None):
    """`fn()`, or None with a note: "skipped" when a package is missing (torchao), "failed" for
    any other error, so one broken variant does not cost the others' rows."""
    try:
        return fn()
    except ImportError as err:
        notes.append(f"skipped {name}: {err}")
    except Exception as err:  # report, then go on with the other variants
        notes.append(f"{label or name} failed: {type(err).__name__}: {err}"[:300])
    print(f"note: {notes[-1]}", file=sys.stderr, flush=True)
    return None
