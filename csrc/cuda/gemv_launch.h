// The launcher of the fused 4-bit GEMV / small GEMM (gemv.cu, kernel in gemv_kernels.cuh), callable from plain
// C++: raw pointers in one struct, the element type as an enum, the stream. It launches and returns an error code;
// it never throws. The torch side (checks, allocation, dispatch against dequantize + matmul) is gemv_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant_launch.h"  // Elem

namespace minqlora {
namespace cuda {

// y (M, N) = x (M, K) · dequant(W (N, K))ᵀ; quant.dequantize_ref gives dequant(W).
struct GemvArgs {
  const uint8_t* packed;   // (N·K/2) bytes, element 2j in the high nibble of byte j, in bitsandbytes' row order
                           // or in minqlora/layout.py's tiles: 1 KB chunks of 16 rows × 128 values
  const float* absmax;     // (N·K/bs) float32 scales, or nullptr with double quantization
  const uint8_t* codes;    // (N·K/bs) uint8 codes of absmax - offset (double quantization), or nullptr
  const float* absmax2;    // (ceil(N·K/bs / nested_bs),) float32, with codes
  const float* map;        // (256,) float32 signed dynamic map, with codes
  float offset;            // nested_offset, with codes
  const void* x;           // (M, K) contiguous, 16-byte aligned, bf16 or fp16
  void* y;                 // (M, N) contiguous, x's dtype
  int M, N, K;             // K % 32 == 0 and K % bs == 0 (the caller checks)
  int log2_bs, log2_nested_bs;
  int quant_type;          // kNF4 / kFP4
  bool tiles;              // packed in tiles (N % 16 == 0, K % 128 == 0: the caller checks)
};

// Which kernel: the launcher's choice (for one token the streaming one, gemv_stream.cuh, with scale windows), the
// register ring (gemv_kernels.cuh) at any M, or the streaming kernel with the scales copied per chunk (kGemvStream)
// or by windows (kGemvStreamWindow; gemv_stream.cuh's StreamMode). The streaming kernel needs M == 1; asked for at
// another M, the ring runs.
enum GemvKernel { kGemvAuto = 0, kGemvRing = 1, kGemvStream = 2, kGemvStreamWindow = 3 };

// t is kBF16 or kF16. rows_per_cta: 16·wr output features per CTA (wr = 1..8; a wr that does not divide 8 leaves
// 8 - wr·⌊8/wr⌋ warps idle: for measuring grids that fill the SMs evenly), 0 = the launcher's choice.
cudaError_t launch_gemv_4bit(Elem t, const GemvArgs& args, int rows_per_cta, int kernel, cudaStream_t stream);

// Up to kMaxGroup weights against the same x in one launch: the projections that read one tensor (q/k/v of an
// attention block, gate/up of an MLP) at decode, where each launch of a small weight is mostly fixed cost (1024x4096:
// 2 MB, ~0.5 us of HBM, ~5 us a launch). Each member owns its own run of CTAs with the CTA shape its own launch
// would get, so its y is bit for bit what launch_gemv_4bit writes. x, M, K, the blocksizes and dtype come from w[0]
// and must be the same in every member (the caller checks); the weights, scales, y and N are each member's.
constexpr int kMaxGroup = 3;
struct GemvGroup {
  GemvArgs w[kMaxGroup];
  int count;  // 1 .. kMaxGroup
};
cudaError_t launch_gemv_4bit_group(Elem t, const GemvGroup& group, int kernel, cudaStream_t stream);

}  // namespace cuda
}  // namespace minqlora
