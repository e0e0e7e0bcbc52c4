// Launcher of the fused 4-bit GEMV / small GEMM (declared in gemv_launch.h, kernel in gemv_kernels.cuh): picks the
// template instance for the blocksize (blocks per 128-value chunk), the row count (8, 16 or 32 tokens per CTA) and
// the rows of W per CTA, and sizes the grid. Nothing here throws; gemv_ops.cpp checks arguments and the launch.

#include "gemv_kernels.cuh"

namespace minqlora {
namespace cuda {
namespace {

using gemv::kSmemBytes;
using gemv::kThreads;
using gemv::kTileRows;

template <typename T, int NBPC, int NT, int RT>
cudaError_t launch(const GemvArgs& a, cudaStream_t stream) {
  const int tiles = (a.N + kTileRows - 1) / kTileRows;
  const dim3 grid((tiles + RT - 1) / RT, (a.M + 8 * NT - 1) / (8 * NT));
  gemv::gemv_4bit_kernel<T, NBPC, NT, RT><<<grid, kThreads, kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int NBPC, int NT>
cudaError_t launch_rt(const GemvArgs& a, int rows_per_cta, cudaStream_t stream) {
  if constexpr (NT <= 2) {
    if (rows_per_cta == 32) return launch<T, NBPC, NT, 2>(a, stream);
  }
  return launch<T, NBPC, NT, 1>(a, stream);
}

template <typename T, int NBPC>
cudaError_t launch_nt(const GemvArgs& a, int rows_per_cta, cudaStream_t stream) {
  if (a.M <= 8) return launch_rt<T, NBPC, 1>(a, rows_per_cta, stream);
  if (a.M <= 16) return launch_rt<T, NBPC, 2>(a, rows_per_cta, stream);
  return launch_rt<T, NBPC, 4>(a, rows_per_cta, stream);  // M > 32: several token groups (grid.y)
}

template <typename T>
cudaError_t launch_bs(const GemvArgs& a, int rows_per_cta, cudaStream_t stream) {
  if (a.log2_bs == 5) return launch_nt<T, 4>(a, rows_per_cta, stream);  // blocksize 32: 4 blocks per chunk
  if (a.log2_bs == 6) return launch_nt<T, 2>(a, rows_per_cta, stream);  // 64
  return launch_nt<T, 1>(a, rows_per_cta, stream);                      // 128 .. 4096
}

}  // namespace

cudaError_t launch_gemv_4bit(Elem t, const GemvArgs& a, int rows_per_cta, cudaStream_t stream) {
  if (rows_per_cta == 0) {
    // 32 rows per CTA once there are enough tiles for ~4 CTAs per SM either way (fewer, longer-lived CTAs);
    // 16 otherwise, so small N still spreads over the SMs. Measured choice: benchmarks/README.md (gemv).
    int dev = 0, sms = 132;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    rows_per_cta = (a.N / kTileRows) >= 8 * sms ? 32 : 16;
  }
  return t == Elem::kBF16 ? launch_bs<__nv_bfloat16>(a, rows_per_cta, stream)
                          : launch_bs<__half>(a, rows_per_cta, stream);
}

}  // namespace cuda
}  // namespace minqlora
