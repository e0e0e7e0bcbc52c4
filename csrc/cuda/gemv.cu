// Launcher of the fused 4-bit GEMV / small GEMM (declared in gemv_launch.h, kernels in gemv_kernels.cuh and, for
// one token, gemv_stream.cuh): picks the kernel, the template instance for the blocksize (blocks per 128-value
// chunk) and the row count (8, 16 or 32 tokens per CTA), the rows of W per CTA (16 · row tiles; the CTA's 8 warps split K among the warps of each tile), and sizes the grid.
// Nothing here throws; gemv_ops.cpp checks arguments and the launch.

#include "gemv_kernels.cuh"
#include "gemv_stream.cuh"

namespace minqlora {
namespace cuda {
namespace {

using gemv::kTableBytes;
using gemv::kThreads;
using gemv::kTileRows;
using gemv::kWarps;

// Row tiles per CTA: one while that still leaves fewer than ~4 CTAs per SM-slot wave (small N: spread over the SMs;
// each warp's K split is 1/8 of K), more for tall weights so each warp walks a longer run of K and the table is
// built once per more rows. Measured choice: benchmarks/README.md (gemv).
inline int row_tiles_per_cta(int tiles, int rows_per_cta) {
  if (rows_per_cta != 0) return rows_per_cta / kTileRows;
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  int wr = 1;
  while (wr < kWarps && tiles / (2 * wr) >= 8 * sms) wr *= 2;
  return wr;
}

template <typename T, int NBPC, int NT>
cudaError_t launch(const GemvArgs& a, int rows_per_cta, cudaStream_t stream) {
  auto* kernel = gemv::gemv_4bit_kernel<T, NBPC, NT>;
  // 66.5 KB of shared memory (the pair table), above the 48 KB default. The carveout stays the driver's choice: the
  // largest shared-memory carveout left L1 too small for x, read by every warp (4096x14336, M=1: 18.7 -> 32.5 us).
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTableBytes);
  if (attr != cudaSuccess) return attr;
  const int tiles = (a.N + kTileRows - 1) / kTileRows;
  const int wr = row_tiles_per_cta(tiles, rows_per_cta);
  const dim3 grid((tiles + wr - 1) / wr, (a.M + 8 * NT - 1) / (8 * NT));
  kernel<<<grid, kThreads, kTableBytes, stream>>>(a, wr);
  return cudaGetLastError();
}

template <typename T, int NBPC>
cudaError_t launch_stream(const GemvArgs& a, int rows_per_cta, cudaStream_t stream) {
  auto* kernel = gemv::gemv_4bit_stream_kernel<T, NBPC>;
  constexpr int smem = gemv::stream_smem_bytes<NBPC>();  // 101-107 KB: two CTAs per SM
  static const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const int tiles = (a.N + kTileRows - 1) / kTileRows;
  const int wr = row_tiles_per_cta(tiles, rows_per_cta);
  kernel<<<(tiles + wr - 1) / wr, kThreads, smem, stream>>>(a, wr);
  return cudaGetLastError();
}

template <typename T, int NBPC>
cudaError_t launch_nt(const GemvArgs& a, int rows_per_cta, int kernel, cudaStream_t stream) {
  // One token: the streaming kernel, unless asked for the register ring, the codes are not 4-byte aligned (its
  // 4-byte copies of them) or the blocksize is 32 (its stages would not fit two CTAs per SM).
  const bool codes_aligned = a.codes == nullptr || reinterpret_cast<uintptr_t>(a.codes) % 4 == 0;
  if constexpr (NBPC <= 2) {
    if (a.M == 1 && kernel != kGemvRing && codes_aligned) return launch_stream<T, NBPC>(a, rows_per_cta, stream);
  }
  if (a.M <= 8) return launch<T, NBPC, 1>(a, rows_per_cta, stream);
  if (a.M <= 16) return launch<T, NBPC, 2>(a, rows_per_cta, stream);
  return launch<T, NBPC, 4>(a, rows_per_cta, stream);  // M > 32: several token groups (grid.y)
}

template <typename T>
cudaError_t launch_bs(const GemvArgs& a, int rows_per_cta, int kernel, cudaStream_t stream) {
  if (a.log2_bs == 5) return launch_nt<T, 4>(a, rows_per_cta, kernel, stream);  // blocksize 32: 4 blocks per chunk
  if (a.log2_bs == 6) return launch_nt<T, 2>(a, rows_per_cta, kernel, stream);  // 64
  return launch_nt<T, 1>(a, rows_per_cta, kernel, stream);                      // 128 .. 4096
}

}  // namespace

cudaError_t launch_gemv_4bit(Elem t, const GemvArgs& a, int rows_per_cta, int kernel, cudaStream_t stream) {
  return t == Elem::kBF16 ? launch_bs<__nv_bfloat16>(a, rows_per_cta, kernel, stream)
                          : launch_bs<__half>(a, rows_per_cta, kernel, stream);
}

}  // namespace cuda
}  // namespace minqlora
