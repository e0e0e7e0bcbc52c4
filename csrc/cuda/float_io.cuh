// float32 <-> the 16/32-bit storage types of the kernels, round to nearest even (as c10::Half / c10::BFloat16 on
// the CPU, and as PyTorch's own CUDA kernels store their float32 results). Plain CUDA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace minqlora {

__device__ __forceinline__ float load_f32(float x) { return x; }
__device__ __forceinline__ float load_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float load_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T store_as(float x);
template <> __device__ __forceinline__ float store_as<float>(float x) { return x; }
template <> __device__ __forceinline__ __half store_as<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
// x rounded to T and back: the value an eager PyTorch op leaves in a T tensor between two kernels.
template <typename T> __device__ __forceinline__ float round_as(float x) { return load_f32(store_as<T>(x)); }

}  // namespace minqlora
