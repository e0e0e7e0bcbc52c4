// Launcher of the fused 4-bit GEMV / small GEMM (declared in gemv_launch.h, kernels in gemv_kernels.cuh and, for
// one token, gemv_stream.cuh): picks the kernel, the template instance for the blocksize (blocks per 128-value
// chunk) and the row count (8, 16 or 32 tokens per CTA), the rows of W per CTA (16 · row tiles; the CTA's 8 warps split K among the warps of each tile), and sizes the grid.
// Nothing here throws; gemv_ops.cpp checks arguments and the launch.

#include "gemv_kernels.cuh"
#include "gemv_stream.cuh"
#include "pdl.cuh"

namespace minqlora {
namespace cuda {
namespace {

using gemv::Args;
using gemv::Launch;
using gemv::kTableBytes;
using gemv::kThreads;
using gemv::kTileRows;
using gemv::kWarps;

// Row tiles per CTA: doubled while each warp's run of K stays under 16 chunks (K / 128 chunks split over the
// 8 / wr_count warps of a row tile) and at least 1.5 CTAs per SM remain. H200, M=1, one run: 14336x4096 (32 chunks)
// at 16 rows per CTA 20.6 us, at 64 19.1; 28672x8192 (64 chunks) at 32 69.3, at 128 78.8; 8192x28672 and
// 4096x14336 best at 16 (60.2 / 16.4 us; 32 rows 63.8 / 17.6). benchmarks/README.md (gemv).
// The current device's SM count, asked once per device (an attribute query per launch is host time in every call).
inline int sm_count() {
  constexpr int kDevices = 64;
  static int sms[kDevices] = {};
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  int* slot = dev >= 0 && dev < kDevices ? &sms[dev] : &n;
  if (*slot == 0 && cudaDeviceGetAttribute(slot, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    *slot = 132;  // the H200's; only the CTA shape depends on it
  return *slot;
}

inline int row_tiles_per_cta(int tiles, int K, int rows_per_cta) {
  if (rows_per_cta != 0) return rows_per_cta / kTileRows;
  const int sms = sm_count();
  const int chunks = (K + gemv::kChunk - 1) / gemv::kChunk;
  int wr = 1;
  while (2 * wr <= kWarps && chunks * 2 * wr <= 16 * kWarps && 2 * (tiles / (2 * wr)) >= 3 * sms) wr *= 2;
  return wr;
}

// The kernel arguments for `count` weights: each member's row tiles per CTA from its own N (so its CTAs do what its
// own launch would), CTAs in member order; *ctas = the grid's x.
Launch make_launch(const Args* w, int count, int rows_per_cta, int* ctas) {
  Launch L{};
  int total = 0;
  for (int i = 0; i < count; ++i) {
    const int tiles = (w[i].N + kTileRows - 1) / kTileRows;
    L.w[i] = w[i];
    L.wr[i] = row_tiles_per_cta(tiles, w[i].K, rows_per_cta);
    L.cta_begin[i] = total;
    total += (tiles + L.wr[i] - 1) / L.wr[i];
  }
  for (int i = count; i <= kMaxGroup; ++i) L.cta_begin[i] = total;
  *ctas = total;
  return L;
}

template <typename T, int NBPC, int NT, bool kGroup>
cudaError_t launch(const Args* w, int count, int rows_per_cta, cudaStream_t stream) {
  auto* kernel = gemv::gemv_4bit_kernel<T, NBPC, NT, kGroup>;
  // 66.5 KB of shared memory (the pair table), above the 48 KB default. The carveout stays the driver's choice: the
  // largest shared-memory carveout left L1 too small for x, read by every warp (4096x14336, M=1: 18.7 -> 32.5 us).
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTableBytes);
  if (attr != cudaSuccess) return attr;
  int ctas = 0;
  const Launch L = make_launch(w, count, rows_per_cta, &ctas);
  if (ctas == 0) return cudaSuccess;
  const dim3 grid(ctas, (w[0].M + 8 * NT - 1) / (8 * NT));
  return cuda::launch_pdl(kernel, grid, dim3(kThreads), kTableBytes, stream, cuda::pdl_applies(stream), L);
}

template <typename T, int NBPC, bool kGroup, int kMode>
cudaError_t launch_stream(const Args* w, int count, int rows_per_cta, cudaStream_t stream) {
  auto* kernel = gemv::gemv_4bit_stream_kernel<T, NBPC, kGroup, kMode>;
  constexpr int smem = gemv::stream_smem_bytes<NBPC>();  // 101-107 KB: two CTAs per SM
  static const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  int ctas = 0;
  const Launch L = make_launch(w, count, rows_per_cta, &ctas);
  if (ctas == 0) return cudaSuccess;
  return cuda::launch_pdl(kernel, dim3(ctas), dim3(kThreads), smem, stream, cuda::pdl_applies(stream), L);
}

// One weight (count 1) or a group. A group runs in one launch up to 16 tokens; with more (the NT = 4 kernel, one CTA
// per SM, where launches are not what costs) its members are launched one by one.
template <typename T, int NBPC>
cudaError_t launch_nt(const Args* w, int count, int rows_per_cta, int kernel, cudaStream_t stream) {
  const int M = w[0].M;
  if (M > 16 && count > 1) {
    for (int i = 0; i < count; ++i) {
      const cudaError_t e = launch_nt<T, NBPC>(w + i, 1, rows_per_cta, kernel, stream);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  }
  // One token: the streaming kernel, unless asked for the register ring, the codes are not 4-byte aligned (its
  // 4-byte copies of them) or the blocksize is 32 (its stages would not fit two CTAs per SM).
  bool codes_aligned = true;
  for (int i = 0; i < count; ++i)
    codes_aligned = codes_aligned && (w[i].codes == nullptr || reinterpret_cast<uintptr_t>(w[i].codes) % 4 == 0);
  if constexpr (NBPC <= 2) {
    if (M == 1 && kernel != kGemvRing && codes_aligned) {
      // auto or windows: of codes if every member is double-quantized, of float32 absmax if none is
      bool all_dq = true, no_dq = true;
      for (int i = 0; i < count; ++i) (w[i].codes != nullptr ? no_dq : all_dq) = false;
      if (kernel != kGemvStream && all_dq) {
        return count > 1 ? launch_stream<T, NBPC, true, gemv::kStreamCodeWindow>(w, count, rows_per_cta, stream)
                         : launch_stream<T, NBPC, false, gemv::kStreamCodeWindow>(w, count, rows_per_cta, stream);
      }
      if (kernel != kGemvStream && no_dq) {
        return count > 1 ? launch_stream<T, NBPC, true, gemv::kStreamFloatWindow>(w, count, rows_per_cta, stream)
                         : launch_stream<T, NBPC, false, gemv::kStreamFloatWindow>(w, count, rows_per_cta, stream);
      }
      return count > 1 ? launch_stream<T, NBPC, true, gemv::kStreamStaged>(w, count, rows_per_cta, stream)
                       : launch_stream<T, NBPC, false, gemv::kStreamStaged>(w, count, rows_per_cta, stream);
    }
  }
  if (M <= 8) {
    return count > 1 ? launch<T, NBPC, 1, true>(w, count, rows_per_cta, stream)
                     : launch<T, NBPC, 1, false>(w, count, rows_per_cta, stream);
  }
  if (M <= 16) {
    return count > 1 ? launch<T, NBPC, 2, true>(w, count, rows_per_cta, stream)
                     : launch<T, NBPC, 2, false>(w, count, rows_per_cta, stream);
  }
  return launch<T, NBPC, 4, false>(w, 1, rows_per_cta, stream);  // M > 32: several token groups (grid.y)
}

template <typename T>
cudaError_t launch_bs(const Args* w, int count, int rows_per_cta, int kernel, cudaStream_t stream) {
  const int log2_bs = w[0].log2_bs;
  if (log2_bs == 5) return launch_nt<T, 4>(w, count, rows_per_cta, kernel, stream);  // blocksize 32: 4 per chunk
  if (log2_bs == 6) return launch_nt<T, 2>(w, count, rows_per_cta, kernel, stream);  // 64
  return launch_nt<T, 1>(w, count, rows_per_cta, kernel, stream);                    // 128 .. 4096
}

cudaError_t launch_any(Elem t, const Args* w, int count, int rows_per_cta, int kernel, cudaStream_t stream) {
  return t == Elem::kBF16 ? launch_bs<__nv_bfloat16>(w, count, rows_per_cta, kernel, stream)
                          : launch_bs<__half>(w, count, rows_per_cta, kernel, stream);
}

}  // namespace

cudaError_t launch_gemv_4bit(Elem t, const GemvArgs& a, int rows_per_cta, int kernel, cudaStream_t stream) {
  return launch_any(t, &a, 1, rows_per_cta, kernel, stream);
}

cudaError_t launch_gemv_4bit_group(Elem t, const GemvGroup& group, int kernel, cudaStream_t stream) {
  if (group.count < 1 || group.count > kMaxGroup) return cudaErrorInvalidValue;
  return launch_any(t, group.w, group.count, 0, kernel, stream);
}

}  // namespace cuda
}  // namespace minqlora
