"""Token files and a resumable, deterministic batch sampler.

A token file is a flat array of uint16 token ids (2 bytes each, native little-endian), as
`scripts/prepare_data.py` writes `train.bin` and `val.bin`; `meta.json` beside them records the
vocab size and the token counts. Files are memory-mapped, never read whole.

Sampling. The file is cut into `n = (num_tokens - 1) // seq_len` windows of `seq_len + 1`
tokens (consecutive windows share one token: the last target of one is the first input of the
next). Each epoch visits every window once, in an order drawn from `(seed, epoch)`. Global
sample `k` of the run is window `perm_{k // n}[k % n]`, and batch `step` holds samples
`step * batch_size ... + batch_size - 1`. So the whole position of the sampler is the pair
`(seed, step)`: a checkpoint stores `sampler.state_dict()` and a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TOKEN_DTYPE = np.uint16
PREPARE_HINT = "run `python scripts/prepare_data.py` (or pass --data DIR with train.bin/val.bin)"


def read_meta(data_dir: str | os.PathLike) -> dict:
    """`meta.json` of a prepared corpus, or {} when there is none (plain token files)."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {PREPARE_HINT} with --force") from err


def open_tokens(path: str | os.PathLike, *, vocab_size: int, expected_tokens: int | None = None,
                min_tokens: int = 2) -> np.memmap:
    """Memory-map a uint16 token file after checking it is one; errors say how to fix it.

    Checks: the file exists and is not empty; its size is a whole number of uint16 tokens and
    the count `meta.json` promised (`expected_tokens`; a mismatch means another dtype or a cut
    file); at least `min_tokens` tokens; every id < `vocab_size`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist; {PREPARE_HINT}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"token file {path} is empty; {PREPARE_HINT} --force")
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    if size % itemsize:
        raise ValueError(f"token file {path} has {size} bytes, not a whole number of uint16 "
                         f"tokens (truncated or not a token file); {PREPARE_HINT} --force")
    if expected_tokens is not None and size != expected_tokens * itemsize:
        raise ValueError(f"token file {path} has {size // itemsize} uint16 tokens but meta.json "
                         f"says {expected_tokens} (written with another dtype, or cut short); "
                         f"{PREPARE_HINT} --force")
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    if len(tokens) < min_tokens:
        raise ValueError(f"token file {path} has {len(tokens)} tokens, fewer than the "
                         f"{min_tokens} one batch row needs (seq_len + 1): lower --seq-len or "
                         "use a larger corpus")
    top = int(tokens.max())
    if top >= vocab_size:
        raise ValueError(f"token file {path} holds token id {top} >= the model's vocab_size "
                         f"{vocab_size}: the data was tokenized for a larger vocab (pick a "
                         f"preset or --vocab-size >= {-(-(top + 1) // 64) * 64}) or the file is "
                         "corrupt")
    return tokens


@dataclass
class BatchSampler:
    """Deterministic batches `(inputs, targets)`, each [batch_size, seq_len] int64.

    `state_dict()` is `{"seed", "step", "batch_size", "seq_len"}`; `load_state_dict` refuses a
    different batch shape, since the sample order depends on it.
    """

    tokens: np.ndarray
    batch_size: int
    seq_len: int
    seed: int = 0
    step: int = 0

    def __post_init__(self):
        self.num_windows = (len(self.tokens) - 1) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(self.tokens)} tokens are too few for seq_len={self.seq_len}")
        self._perm_epoch, self._perm = -1, None

    def _window_ids(self, step: int) -> np.ndarray:
        """Window index of each row of batch `step` ([batch_size] int64)."""
        first = step * self.batch_size
        ids = np.empty(self.batch_size, dtype=np.int64)
        for row, k in enumerate(range(first, first + self.batch_size)):
            epoch, pos = divmod(k, self.num_windows)
            if epoch != self._perm_epoch:  # one permutation per epoch, cached
                self._perm = np.random.default_rng((self.seed, epoch)).permutation(
                    self.num_windows)
                self._perm_epoch = epoch
            ids[row] = self._perm[pos]
        return ids

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._window_ids(step) * self.seq_len
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])  # [B, T + 1]
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]  # inputs, targets: [B, T] each

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's data position is for {key}={state[key]}, "
                                 f"this run has {key}={getattr(self, key)}: resume with "
                                 f"--{key.replace('_', '-')} {state[key]} so the data order "
                                 "continues exactly")
        self.seed, self.step = state["seed"], state["step"]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """The first `max_batches` batches of consecutive windows of `tokens` (fixed: same every
    evaluation, so val losses of different runs and steps compare)."""
    windows = (len(tokens) - 1) // seq_len
    for first in range(0, min(windows, max_batches * batch_size), batch_size):
        starts = range(first * seq_len, min(first + batch_size, windows) * seq_len, seq_len)
        rows = torch.from_numpy(
            np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        yield rows[:, :-1], rows[:, 1:]


def open_corpus(data_dir: str | os.PathLike, *, vocab_size: int, seq_len: int):
    """(train tokens, val tokens, meta) of a prepared corpus folder, all checked."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist; {PREPARE_HINT}")
    meta = read_meta(data_dir)
    if meta.get("vocab_size", 0) > vocab_size:
        raise ValueError(f"{data_dir} was tokenized for vocab_size {meta['vocab_size']} (meta.json)"
                         f" but the model has {vocab_size}: pick a preset or --vocab-size >= "
                         f"{meta['vocab_size']}")
    counts = meta.get("tokens", {})
    splits = [open_tokens(data_dir / f"{split}.bin", vocab_size=vocab_size,
                          expected_tokens=counts.get(split), min_tokens=seq_len + 1)
              for split in ("train", "val")]
    return splits[0], splits[1], meta
