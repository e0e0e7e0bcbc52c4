// CUDA kernels of the counter-based dropout ops, in plain CUDA (no torch headers; a bare nvcc compile-checks them):
//   dropout_copies_kernel -> dropout.dropout_copies_ref  x read once (VEC elements, one 16-byte load), every copy
//                                                        written: out[c·n + i] = x[i] · keep_c(i)
//   dropout_sum_kernel    -> dropout.dropout_sum_ref     out[i] = Σ_c g[c·n + i] · keep_c(i), float32 in copy order
// The mask is dropout_math.h's, the same bits as the CPU kernels and the Python spec. Glue: dropout.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../dropout_math.h"
#include "float_io.cuh"
#include "layer_kernels.cuh"  // Pack, load_pack, store_pack

namespace minqlora {
namespace dropout {

using layer::load_pack;
using layer::Pack;
using layer::store_pack;

// n % VEC == 0 when VEC > 1 (the glue picks VEC = 1 otherwise).
template <typename T, int VEC>
__global__ void __launch_bounds__(256) dropout_copies_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n,
                                                             DropoutPlan plan) {
  for (int64_t i = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * VEC; i < n;
       i += (int64_t)gridDim.x * blockDim.x * VEC) {
    const Pack<T, VEC> v = load_pack<T, VEC>(x + i);
    for (int c = 0; c < plan.copies; ++c) {
      const uint64_t base = static_cast<uint64_t>(c) * n + i, thr = plan.threshold[c];
      Pack<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = store_as<T>(load_f32(v.v[e]) * dropout_keep(plan, base + e, thr));
      store_pack<T, VEC>(out + base, o);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256) dropout_sum_kernel(const T* __restrict__ g, T* __restrict__ out, int64_t n,
                                                          DropoutPlan plan) {
  for (int64_t i = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * VEC; i < n;
       i += (int64_t)gridDim.x * blockDim.x * VEC) {
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
    for (int c = 0; c < plan.copies; ++c) {
      const uint64_t base = static_cast<uint64_t>(c) * n + i, thr = plan.threshold[c];
      const Pack<T, VEC> v = load_pack<T, VEC>(g + base);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += load_f32(v.v[e]) * dropout_keep(plan, base + e, thr);
    }
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = store_as<T>(acc[e]);
    store_pack<T, VEC>(out + i, o);
  }
}

}  // namespace dropout
}  // namespace minqlora
