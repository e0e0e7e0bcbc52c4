#!/usr/bin/env bash
# Training-step benchmarks on the GPU machine (the device tool's `run`, which sets $OUT; carry [".whl"]), in stages
# so each call stays within the 10-minute limit: bitsandbytes from the carried wheel and the extension build happen
# once per machine (skipped when already there), then the named stages run in order. Logs and JSON go under $OUT.
#
#   bash benchmarks/gpu_train.sh tests step8b            # tests/cuda of the training paths, then the 8B step
#   bash benchmarks/gpu_train.sh step70b ctx70b ctx8b    # then the 70B step and the two context searches
#   bash benchmarks/gpu_train.sh load8b                  # peak host RSS loading an 8B-shaped checkpoint
#   bash benchmarks/gpu_train.sh dist8b                  # --parallel none / ddp / fsdp2 on one GPU (NCCL), 8B shape
#   bash benchmarks/gpu_train.sh profile8b optim         # torch.profiler of the 8B step; PagedAdamW over 448 tensors
#   CTX70B="8192 16384" bash benchmarks/gpu_train.sh ctx70b   # other lengths for a context stage (CTX8B likewise)
#   bash benchmarks/gpu_train.sh fused8b       # the elementwise ops as minqlora's kernels vs compiled vs eager
#   PROFILE_BATCH=4x2048 PROFILE_CONFIGS="none full" bash benchmarks/gpu_train.sh profile8b
#
# Stage times (estimates, one H200): tests 1 min, step8b 1.5 min, step70b 3 min, ctx70b 2 min, ctx8b 3 min,
# load8b 1.5 min; the first call adds the build.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/minqlora-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site

if ! python3 -c "import bitsandbytes" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
if ! python3 -c "import minqlora, minqlora.ops; assert minqlora.ops.has_cuda_kernels()" 2> /dev/null; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
  start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi

rc=0
for stage in "$@"; do
  start=$(date +%s)
  case $stage in
    tests) python3 -m pytest tests/cuda/test_training_memory_cuda.py -q -rfE -p no:cacheprovider ;;
    step8b) python3 benchmarks/bench_step.py --shape llama-3-8b --quick --json "$OUT/step8b.json" \
              --plot "$OUT/frontier8b.png" ;;
    step70b) python3 benchmarks/bench_step.py --shape llama-2-70b --batch 1x512 1x2048 --quick \
               --json "$OUT/step70b.json" ;;
    ctx70b) python3 benchmarks/bench_context.py --shape llama-3-70b --cap-gb 48 --quick --lengths ${CTX70B:-16384 24576} \
              --time-budget 150 --snapshot --json "$OUT/ctx70b.json" ;;
    ctx8b) python3 benchmarks/bench_context.py --shape llama-3-8b --cap-gb 80 --quick --lengths ${CTX8B:-131072} \
             --time-budget 200 --json "$OUT/ctx8b.json" ;;
    dist8b) python3 -m torch.distributed.run --nproc-per-node 1 benchmarks/bench_distributed.py --shape 8b ;;
    profile8b) python3 benchmarks/bench_step.py --shape llama-3-8b --batch ${PROFILE_BATCH:-2x1024} \
                 --configs ${PROFILE_CONFIGS:-none full+offload} --profile 30 ;;
    optim) python3 benchmarks/bench_optim.py --device cuda --shape 16 4096 ;;
    fused8b) python3 benchmarks/bench_step.py --shape llama-3-8b --only minqlora --warmup 2 --steps 3 \
               --configs none none+compile full full+compile full+offload full+offload+compile full+offload+eager \
               --json "$OUT/fused8b.json" ;;
    load8b) python3 benchmarks/bench_load.py --shape llama-3-8b --dir /tmp/ckpt-8b --device cuda \
              --json "$OUT/load8b.json" ;;
    *) echo "unknown stage $stage (tests, step8b, step70b, ctx70b, ctx8b, dist8b, profile8b, optim, fused8b, load8b)"
       exit 2 ;;
  esac 2>&1 | grep -v -E "Warning|warnings.warn" | tee "$OUT/$stage.log"
  status=${PIPESTATUS[0]}
  echo "== $stage: exit $status, $(( $(date +%s) - start )) s"
  rc=$(( rc || status ))
done
exit $rc
