// Programmatic dependent launch (PDL, sm_90+), for the kernels of a captured decode step: a kernel launched with
// launch_pdl may start while the kernel before it in the stream is still finishing, run a prologue that touches no
// memory that kernel writes (the fused GEMV: its pair table and its first weights, which are frozen), and only then
// wait for it. Between kernels of a few µs, the launch latency and the prologue are a real share of each (the GEMVs
// of a Llama-3-8B decode step: ~2,100 µs in 128 launches, benchmarks/README.md).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

namespace minqlora {
namespace cuda {

// Wait until every kernel before this one in the stream has completed and its writes are visible. Before this
// call a kernel launched with launch_pdl may read only memory no earlier kernel of the stream writes, and may
// write no global memory. Without the launch attribute it returns at once.
__device__ __forceinline__ void wait_prior_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Let the next kernel, if it was launched with launch_pdl, start its prologue now (it still waits for this kernel
// to complete before it reads anything this kernel writes). A no-op for any other successor.
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether launches on `stream` take the PDL attribute: only while the stream is being captured into a CUDA graph,
// where the weights a prologue reads early are fixed for the graph's life (eagerly, the kernel just before could be
// the one writing them: quantization, a merge), and unless MINQLORA_PDL=0 (for measuring the difference).
inline bool pdl_applies(cudaStream_t stream) {
  static const bool on = [] {
    const char* s = std::getenv("MINQLORA_PDL");
    return !(s && s[0] == '0');
  }();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return on && cudaStreamIsCapturing(stream, &status) == cudaSuccess && status == cudaStreamCaptureStatusActive;
}

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic-serialization attribute when pdl is set.
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                       Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace minqlora
