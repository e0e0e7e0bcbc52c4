// CUDA kernels of the fused AdamW step, in plain CUDA (no torch headers, so a bare nvcc compile-checks them):
//   adamw_32bit_kernel -> optim.adamw_step_ref       (float32 m and v; a grid-stride elementwise loop)
//   adamw_8bit_kernel  -> optim.adamw_step_8bit_ref  (one CTA of 256 threads per 256-element state block: decode
//                                                     m, v -> update -> block absmax -> re-encode, in registers)
// The element arithmetic is optim_math.h's, shared with the CPU kernels; built with --fmad=false and IEEE
// division/sqrt, the results are bit-identical to the CPU's. Torch glue (dispatch, checks, streams): optim.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../optim_math.h"
#include "float_io.cuh"

namespace minqlora {


template <typename T>
__global__ void __launch_bounds__(256) adamw_32bit_kernel(T* __restrict__ p, const T* __restrict__ g,
                                                          float* __restrict__ m, float* __restrict__ v, int64_t n,
                                                          AdamScalars s) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float pv = load_f32(p[i]), mv = m[i], vv = v[i];
    if (adamw_element(pv, load_f32(g[i]), mv, vv, s)) p[i] = store_as<T>(pv);
    m[i] = mv;
    v[i] = vv;
  }
}

// max of two partial absmaxes (each >= 0 or NaN), NaN-propagating like state_absmax_step.
__device__ __forceinline__ float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// kStateBlock (256) threads: thread t owns element t of every block this CTA visits (grid-stride over blocks).
template <typename T>
__global__ void __launch_bounds__(kStateBlock) adamw_8bit_kernel(
    T* __restrict__ p, const T* __restrict__ g, uint8_t* __restrict__ c1, uint8_t* __restrict__ c2,
    float* __restrict__ am1, float* __restrict__ am2, const float* __restrict__ map1,
    const float* __restrict__ map2, int64_t n, AdamScalars s) {
  __shared__ float smap1[256], smap2[256], smid1[256], smid2[256];
  __shared__ float warp1[kStateBlock / 32], warp2[kStateBlock / 32];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  smap1[t] = map1[t];
  smap2[t] = map2[t];
  __syncthreads();
  if (t < 255) {  // quant.map_thresholds
    smid1[t] = (smap1[t] + smap1[t + 1]) * 0.5f;
    smid2[t] = (smap2[t] + smap2[t + 1]) * 0.5f;
  }
  __syncthreads();

  const int64_t nb = (n + kStateBlock - 1) / kStateBlock;
  for (int64_t b = blockIdx.x; b < nb; b += gridDim.x) {
    const int64_t i = b * kStateBlock + t;
    const bool valid = i < n;
    float mv = 0.0f, vv = 0.0f;
    if (valid) {
      mv = smap1[c1[i]] * am1[b];  // decode: one rounding, as dequantize_blockwise_8bit_ref
      vv = smap2[c2[i]] * am2[b];
      float pv = load_f32(p[i]);
      if (adamw_element(pv, load_f32(g[i]), mv, vv, s)) p[i] = store_as<T>(pv);
    }
    // block absmax of the new m and v: warp shuffles, then the 8 warp results through shared memory
    float a1 = state_absmax_step(0.0f, mv), a2 = state_absmax_step(0.0f, vv);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a1 = max_nan(a1, __shfl_xor_sync(0xffffffffu, a1, off));
      a2 = max_nan(a2, __shfl_xor_sync(0xffffffffu, a2, off));
    }
    if (lane == 0) {
      warp1[warp] = a1;
      warp2[warp] = a2;
    }
    __syncthreads();  // also: every thread has read am1[b], am2[b] before thread 0 overwrites them below
    a1 = warp1[0];
    a2 = warp2[0];
#pragma unroll
    for (int w = 1; w < kStateBlock / 32; ++w) {
      a1 = max_nan(a1, warp1[w]);
      a2 = max_nan(a2, warp2[w]);
    }
    __syncthreads();  // warp1/warp2 are rewritten in the next iteration
    if (t == 0) {
      am1[b] = a1;
      am2[b] = a2;
    }
    if (valid) {
      c1[i] = nearest_code(smid1, state_scale(mv, a1, 1.0f / a1));
      c2[i] = nearest_code(smid2, state_scale(vv, a2, 1.0f / a2));
    }
  }
}

// Launchers: grid capped at `max_ctas` (a few waves of the GPU); return the launch's error code.
template <typename T>
cudaError_t launch_adamw_32bit(T* p, const T* g, float* m, float* v, int64_t n, AdamScalars s, int max_ctas,
                               cudaStream_t stream) {
  const int64_t want = (n + 255) / 256;
  const int grid = static_cast<int>(want < max_ctas ? want : max_ctas);
  adamw_32bit_kernel<T><<<grid, 256, 0, stream>>>(p, g, m, v, n, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_adamw_8bit(T* p, const T* g, uint8_t* c1, uint8_t* c2, float* am1, float* am2, const float* map1,
                              const float* map2, int64_t n, AdamScalars s, int max_ctas, cudaStream_t stream) {
  const int64_t want = (n + kStateBlock - 1) / kStateBlock;
  const int grid = static_cast<int>(want < max_ctas ? want : max_ctas);
  adamw_8bit_kernel<T><<<grid, kStateBlock, 0, stream>>>(p, g, c1, c2, am1, am2, map1, map2, n, s);
  return cudaGetLastError();
}

}  // namespace minqlora
