// Template dispatch of the fused 4-bit GEMV (kernel in gemv_kernels.cuh): the instance for the blocksize (blocks per
// 128-value chunk), the row count of x (8, 16 or 32 tokens per CTA), the rows of W per tile group, the prefetch
// depth and double quantization; the persistent grid size. Instantiated once per activation type in
// gemv_bf16.cu / gemv_f16.cu (two files, so the build compiles them in parallel). Nothing here throws.
#pragma once

#include "gemv_kernels.cuh"

namespace minqlora {
namespace cuda {
namespace gemv {

// Every instance: opt in to its (> 48 KB) dynamic shared memory once, and size the persistent grid from its
// occupancy (asked once per instance and device count of SMs).
template <typename T, int NBPC, int NT, int RT, int P, bool DQ>
cudaError_t launch_instance(const GemvArgs& a, cudaStream_t stream) {
  constexpr auto kernel = gemv_4bit_kernel<T, NBPC, NT, RT, P, DQ>;
  constexpr int smem = Smem<RT, NT>::kBytes;
  static int per_sm = -1;
  static int sms = 0;
  if (per_sm < 0) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
    if (err != cudaSuccess) return err;
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  const int groups = (a.N + kTileRows * RT - 1) / (kTileRows * RT);
  const int resident = (per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
  const int token_groups = (a.M + 8 * NT - 1) / (8 * NT);
  const int ctas = groups < resident ? groups : resident;
  kernel<<<dim3(ctas, token_groups), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// Prefetch depth: 4 items in flight per warp where the registers allow it (the kernel is latency-bound otherwise:
// one warp's item is ~0.3 µs of work against ~1 µs of HBM latency under load); 2 where 4 would spill (more tokens,
// two tiles per group, or blocksize 32's eight scales per item). Register counts: nvcc -Xptxas -v, 128 cap.
template <typename T, int NBPC, bool DQ>
cudaError_t launch_rows(const GemvArgs& a, int rows_per_cta, cudaStream_t stream) {
  constexpr int kDeep = NBPC == 4 ? 2 : 4;
  if (a.M <= 8) {
    if constexpr (NBPC < 4) {
      if (rows_per_cta == 32) return launch_instance<T, NBPC, 1, 2, 2, DQ>(a, stream);
    }
    return launch_instance<T, NBPC, 1, 1, kDeep, DQ>(a, stream);
  }
  if (a.M <= 16) return launch_instance<T, NBPC, 2, 1, 2, DQ>(a, stream);
  return launch_instance<T, NBPC, 4, 1, 2, DQ>(a, stream);  // M > 32: several token groups (grid.y)
}

template <typename T>
cudaError_t launch_typed(const GemvArgs& a, int rows_per_cta, cudaStream_t stream) {
  const bool dq = a.codes != nullptr;
  if (a.log2_bs == 5) return dq ? launch_rows<T, 4, true>(a, rows_per_cta, stream)   // blocksize 32
                                : launch_rows<T, 4, false>(a, rows_per_cta, stream);
  if (a.log2_bs == 6) return dq ? launch_rows<T, 2, true>(a, rows_per_cta, stream)   // 64
                                : launch_rows<T, 2, false>(a, rows_per_cta, stream);
  return dq ? launch_rows<T, 1, true>(a, rows_per_cta, stream)                       // 128 .. 4096
            : launch_rows<T, 1, false>(a, rows_per_cta, stream);
}

}  // namespace gemv
}  // namespace cuda
}  // namespace minqlora
