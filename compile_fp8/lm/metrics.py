"""`metrics.jsonl`: one JSON object per line, written as the run goes, read by compare_runs.

Records, told apart by their keys::

    {"event": "start", "name": "fp8-tensorwise", "preset": ..., "fp8": ..., "device": ..., ...}
    {"step": 12, "loss": 7.91, "lr": 0.0006, "tokens_per_s": 201234.5, "mfu": 0.31,
     "step_ms": 81.4, "grad_norm": 1.2}                          # one per logged training step
    {"step": 100, "val_loss": 5.43}                              # every --eval-every steps
    {"event": "end", "step": ..., "peak_mem_gib": ..., "peak_mem_kind": ..., "wall_s": ...}

`step` counts optimizer steps done (1-based). `mfu` is null where the peak is unknown (CPU).
A resumed run first drops the records past its checkpoint's step, then appends, so a curve
never has two points for one step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_NAME = "metrics.jsonl"


def _clean(value):
    """NaN/inf are not JSON: write them as null (a diverged run still logs)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to `path`, flushed per line (a killed run keeps what it logged)."""

    def __init__(self, path: Path, *, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        else:
            keep = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def write(self, **record) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(path: Path) -> list[dict]:
    """All records of a metrics file ([] if it does not exist); a cut last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the run was killed mid-write
    return records
