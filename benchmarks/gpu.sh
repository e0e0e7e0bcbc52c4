#!/usr/bin/env bash
# The one script for the GPU machine (the device tool's `run`, which sets $OUT): installs bitsandbytes from the
# carried wheel, builds the extension against the machine's own torch, then runs the parts named on the command line
# (default: all), each logging under $OUT, and prints a short summary last.
#
#   bash benchmarks/gpu.sh [tests] [gemv] [quant] [linear] [generate] [step] [context] [sass] [read] ...
#   TESTS="tests/cuda/test_gemv_cuda.py" bash benchmarks/gpu.sh tests    # a subset of tests/cuda
#   GEMV_ARGS=--quick bash benchmarks/gpu.sh gemv                        # extra arguments for one benchmark
#
# Here, once: .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# Then run with carry [".whl"].
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/minqlora-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-tests gemv quant generate step}

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

rc=0
summary=()
bench() {  # bench NAME SCRIPT ARGS...: run one benchmark, log to $OUT/NAME.log
  local name=$1; shift
  local s=$(date +%s)
  python3 "$@" > "$OUT/$name.log" 2>&1
  local r=$?
  summary+=("$name: $(( $(date +%s) - s )) s, exit $r")
  [ $r -eq 0 ] || { rc=1; tail -n 25 "$OUT/$name.log"; }
}

for part in $parts; do
  case $part in
    tests)
      # Four worker processes (pytest-xdist): faster, and a test that crashes its process is reported as a failure
      # instead of ending the run.
      s=$(date +%s)
      OMP_NUM_THREADS=4 python3 -m pytest ${TESTS:-tests/cuda} -q -n 4 -rfE --durations=8 -p no:cacheprovider \
        > "$OUT/pytest.log" 2>&1
      r=$?
      summary+=("tests: $(( $(date +%s) - s )) s, exit $r: $(tail -n 1 "$OUT/pytest.log")")
      [ $r -eq 0 ] || rc=1
      grep -E "^(FAILED|ERROR)|^E  |crashed" "$OUT/pytest.log" | head -n 40 ;;
    gemv) bench gemv benchmarks/bench_gemv.py --out "$OUT/gemv.json" --png "$OUT/gemv.png" ${GEMV_ARGS:-} ;;
    quant) bench quant benchmarks/bench_quant.py --out "$OUT/bench_quant.json" ${QUANT_ARGS:-} ;;
    linear) bench linear benchmarks/bench_linear.py --out "$OUT/linear.json" ${LINEAR_ARGS:-} ;;
    generate) bench generate benchmarks/bench_generate.py ${GENERATE_ARGS:-} ;;
    step) bench step benchmarks/bench_step.py ${STEP_ARGS:-} ;;
    context) bench context benchmarks/bench_context.py ${CONTEXT_ARGS:-} ;;
    read)
      # HBM read patterns and GEMV memory schedules without arithmetic (plain CUDA, no torch): the layout question.
      s=$(date +%s)
      nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/read_patterns benchmarks/read_patterns.cu \
        && /tmp/read_patterns ${READ_MIB:-512} > "$OUT/read_patterns.txt" 2>&1
      r=$?
      summary+=("read: $(( $(date +%s) - s )) s, exit $r")
      [ $r -eq 0 ] || rc=1 ;;
    sass)
      # The machine code of the kernels named by SASS_MATCH (default: the fused GEMV), for reading instruction
      # counts here: ptxas -v is all the workstation has. Summarized by benchmarks/sass_summary.py.
      cuobjdump -sass minqlora/_C*.so 2>/dev/null | python3 benchmarks/sass_summary.py --match "${SASS_MATCH:-gemv_4bit_kernel}" \
        --dump "$OUT/sass.txt" > "$OUT/sass_summary.txt" 2>&1
      summary+=("sass: exit $?: $(wc -l < "$OUT/sass.txt") lines of SASS") ;;
    *) echo "unknown part: $part (tests gemv quant linear generate step context sass read)"; rc=1 ;;
  esac
done

echo
echo "==== summary ===="
printf '%s\n' "${summary[@]}"
for part in $parts; do
  case $part in
    gemv) sed -n '/^==== gemm_4bit/,$p' "$OUT/gemv.log" ;;
    sass) head -n 40 "$OUT/sass_summary.txt" ;;
    quant) grep -A 40 "TB/s" "$OUT/quant.log" | grep -v "kernels-community" ;;
    generate|step|context) [ -f "$OUT/$part.log" ] && tail -n 30 "$OUT/$part.log" ;;
  esac
done
exit $rc
