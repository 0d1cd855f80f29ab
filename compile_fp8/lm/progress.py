"""The progress display: a tqdm bar on a terminal, else plain printed lines.

`mode="auto"` shows a bar when tqdm is installed and stderr is a terminal; otherwise (a log
file, a CI job, a remote job's captured output) it prints one line every ~5% of the run, so
logs stay readable. tqdm is imported lazily: `import compile_fp8` must stay light.
"""

from __future__ import annotations

import sys

MODES = ("auto", "bar", "print")


def _fmt(record: dict) -> str:
    mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
    return (f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
            f"lr {record['lr']:.2e}")


class Progress:
    def __init__(self, mode: str, *, total: int, initial: int, desc: str, say=print):
        if mode not in MODES:
            raise ValueError(f"progress={mode!r} is not supported; allowed values: {list(MODES)}")
        self.total, self.desc, self.say = total, desc, say
        self.every = max(1, total // 20)
        self.bar = self._make_bar(mode, total, initial, desc)

    @staticmethod
    def _make_bar(mode, total, initial, desc):
        if mode == "print" or (mode == "auto" and not sys.stderr.isatty()):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None  # plain lines instead
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, unit="step")

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(_fmt(record), refresh=False)
            self.bar.update(1)
        elif record["step"] % self.every == 0 or record["step"] in (1, self.total):
            self.say(f"[{self.desc}] step {record['step']:5d}/{self.total}  {_fmt(record)}  "
                     f"({record['step_ms']:.0f} ms)")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[{self.desc}] {line}")
        else:
            self.say(f"[{self.desc}] {line}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
