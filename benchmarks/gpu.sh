#!/usr/bin/env bash
# The one script for the GPU machine (the device tool's `run`, which sets $OUT): installs bitsandbytes from the
# carried wheel, builds the extension against the machine's own torch, runs all of tests/cuda, then the GPU
# benchmarks. Full logs go under $OUT (env.txt, build.log, pytest.log, bench.log, bench_quant.json); a short
# summary and the benchmark table are printed last.
#
# Here, once: .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# Then run with carry [".whl"]: bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/minqlora-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -1
  python3 -c "import torch, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'bitsandbytes', bitsandbytes.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The machine's python3 holds its torch (2.11, CUDA 13.0); --no-build-isolation builds against it.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

# Four worker processes (pytest-xdist, in the machine's image): faster, and a test that crashes its process is
# reported as a failure instead of ending the run.
start=$(date +%s)
OMP_NUM_THREADS=4 python3 -m pytest tests/cuda -q -n 4 -rfE --durations=8 -p no:cacheprovider > "$OUT/pytest.log" 2>&1
tests_rc=$?
echo "tests/cuda: $(( $(date +%s) - start )) s, exit $tests_rc"
grep -E "^(FAILED|ERROR)|^E  |crashed" "$OUT/pytest.log" | head -n 40

python3 benchmarks/bench_quant.py --out "$OUT/bench_quant.json" > "$OUT/bench.log" 2>&1
bench_rc=$?

echo
echo "==== summary ===="
tail -n 1 "$OUT/pytest.log"
[ $bench_rc -eq 0 ] || tail -n 30 "$OUT/bench.log"
grep -A 40 "TB/s" "$OUT/bench.log" | grep -v "kernels-community"
exit $(( tests_rc || bench_rc ))
