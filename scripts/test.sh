#!/usr/bin/env bash
# The test command (README, .ci/run): on a fresh machine it creates .venv, installs torch 2.13.0 (CPU) and the
# test oracles (bitsandbytes 0.50.2, transformers, peft, ...), builds the extension against that torch, and runs
# the whole suite. Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/test_quant.py -x`).
# On a machine with a GPU, tests/cuda run too; without one they are not collected (tests/cuda/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
# numpy before the build: setup.py imports torch, which warns "Failed to initialize NumPy" without it.
python -m pip install -q torch==2.13.0 numpy
# --no-build-isolation: build against the torch just installed instead of fetching another into a build env.
python -m pip install -q --no-build-isolation -e ".[test]"
python -c "import torch; from minqlora import ops; print('minqlora ready: torch', torch.__version__)"
python -m pytest -q "$@"
if [ $# -eq 0 ]; then
  # The portable scalar kernels (CPUs without AVX-512) against the same reference, byte for byte.
  MINQLORA_DISABLE_AVX512=1 python -m pytest -q tests/test_quant.py tests/test_ops.py tests/test_quant_bnb.py
  # The portable few-row gemm_4bit loop (CPUs without AVX2) against the same reference.
  MINQLORA_DISABLE_AVX2=1 python -m pytest -q tests/test_gemv_cpu.py
fi
