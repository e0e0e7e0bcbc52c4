// The fused 4-bit GEMV instances for bfloat16 activations (gemv_dispatch.cuh; float16 in gemv_f16.cu), and the entry
// point declared in gemv_launch.h.

#include "gemv_dispatch.cuh"

namespace minqlora {
namespace cuda {
namespace gemv {

template cudaError_t launch_typed<__nv_bfloat16>(const GemvArgs& a, int rows_per_cta, cudaStream_t stream);
extern template cudaError_t launch_typed<__half>(const GemvArgs& a, int rows_per_cta, cudaStream_t stream);

}  // namespace gemv

cudaError_t launch_gemv_4bit(Elem t, const GemvArgs& a, int rows_per_cta, cudaStream_t stream) {
  if (rows_per_cta == 0) {
    // 32 rows per tile group (x read once for two tiles) once N has ~8 tiles per SM to share out; 16 below that,
    // so small N still spreads over every SM. Measured choice: benchmarks/README.md (gemv).
    int dev = 0, sms = 132;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    rows_per_cta = (a.N / gemv::kTileRows) >= 8 * sms ? 32 : 16;
  }
  return t == Elem::kBF16 ? gemv::launch_typed<__nv_bfloat16>(a, rows_per_cta, stream)
                          : gemv::launch_typed<__half>(a, rows_per_cta, stream);
}

}  // namespace cuda
}  // namespace minqlora
