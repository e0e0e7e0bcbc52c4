// The fused 4-bit GEMV instances for float16 activations (gemv_dispatch.cuh; launch_gemv_4bit is in gemv_bf16.cu).

#include "gemv_dispatch.cuh"

namespace minqlora {
namespace cuda {
namespace gemv {

template cudaError_t launch_typed<__half>(const GemvArgs& a, int rows_per_cta, cudaStream_t stream);

}  // namespace gemv
}  // namespace cuda
}  // namespace minqlora
