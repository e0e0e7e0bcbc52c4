// The launchers of the quantization kernels (quant.cu, kernels in quant_kernels.cuh), callable from plain C++:
// raw pointers, the element type as an enum, the stream. They launch and return; they never throw. The torch side
// (argument checks, allocation, device guard, current stream, launch check) is quant_ops.cpp, compiled by the host
// compiler like the CPU kernels, so every error is thrown from host-compiled code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace minqlora {
namespace cuda {

enum class Elem : int { kF32 = 0, kF16 = 1, kBF16 = 2 };  // the 16/32-bit float types the ops take

// quant.quantize_4bit_ref: x (n elements of t) -> packed ((n+1)/2 bytes), absmax (ceil(n / 2^log2_bs) floats).
// Returns the error of the occupancy queries that size its persistent grid (cudaSuccess normally).
cudaError_t launch_quantize_4bit(Elem t, const void* x, int64_t n, int log2_bs, int quant_type, uint8_t* packed,
                                 float* absmax, cudaStream_t stream);

// quant.dequantize_ref: codes == nullptr -> absmax holds float32 scales; otherwise the scale of block b is
// map[codes[b]] * absmax2[b >> log2_nested_bs] + offset (double quantization), decoded inside the kernel.
// tiles_k: 0 for bitsandbytes' row order, or K when packed holds a (N, K) weight in tiles (minqlora/layout.py).
void launch_dequantize_4bit(Elem t, const uint8_t* packed, const float* absmax, const uint8_t* codes,
                            const float* absmax2, const float* map, float offset, int64_t n, int log2_bs,
                            int log2_nested_bs, int quant_type, int64_t tiles_k, void* out, cudaStream_t stream);

// quant.quantize_blockwise_8bit_ref: x (n elements of t) -> codes (n bytes), absmax (ceil(n / 2^log2_bs) floats)
void launch_quantize_blockwise_8bit(Elem t, const void* x, const float* map, int64_t n, int log2_bs,
                                    uint8_t* codes, float* absmax, cudaStream_t stream);

// quant.dequantize_blockwise_8bit_ref: codes (n bytes) -> out (n elements of t)
void launch_dequantize_blockwise_8bit(Elem t, const uint8_t* codes, const float* absmax, const float* map,
                                      int64_t n, int log2_bs, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace minqlora
