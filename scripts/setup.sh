#!/usr/bin/env bash
# Create (or reuse) .venv with a CPU build of torch, the package (editable) and its test and
# train extras (torchao, pytest; numpy, tqdm, tiktoken, matplotlib for the LM demo).
# torch is installed first and pinned: an unpinned `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,train]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchao, compile_fp8, numpy, tqdm, tiktoken, matplotlib; print('env ok: torch', torch.__version__, '| torchao', torchao.__version__, '| tiktoken', tiktoken.__version__)" 2>&1 | grep "env ok"
