// The launchers of the few-row LoRA kernels (lora_decode.cu), callable from plain C++: raw pointers, the element
// type as an enum, the stream. They launch and return an error code; they never throw. The torch side (checks,
// allocation, device guard, the fallback to ATen for anything the kernels do not take) is lora_decode_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant_launch.h"  // Elem

namespace minqlora {
namespace cuda {

constexpr int kLoraMaxRows = 16;     // rows of x (tokens) the kernels take: decode at batch <= 16
constexpr int kLoraMaxRank = 128;    // r of one member in lora_up_add: its h slice sits in shared memory (8 KB)
constexpr int kLoraMaxMembers = 3;   // q/k/v: the largest group of siblings (lora_fused.SHARED_INPUTS)

// h (M, R) = x (M, K) · a (R, K)ᵀ, fp32 accumulation, rounded once to t. x, a contiguous and 16-byte aligned,
// K % 8 == 0, 1 <= M <= kLoraMaxRows (the caller checks). Reference: lora_fused.LoRAGroup._down's x2 @ a.t().
cudaError_t launch_lora_down(Elem t, const void* x, const void* a, void* h, int M, int K, int R,
                             cudaStream_t stream);

// One member of lora_up_add: y (M, N), row stride ldy, += scale · h[:, offset : offset + r] · b (N, r)ᵀ.
struct LoraUpMember {
  void* y;        // (M, N), element stride 1, row stride ldy; read and written in place
  const void* b;  // (N, r) contiguous
  int N, r, offset;
  int64_t ldy;
  float scale;
};

// Up to kLoraMaxMembers members sharing one h (M, R) contiguous; t is every tensor's type (kBF16 or kF16),
// 1 <= M <= kLoraMaxRows, r <= kLoraMaxRank, the members' y do not overlap (the caller checks). Reference:
// LoRAGroup.forward's y2.addmm_(h_i, b_i.t(), alpha=s_i): y + s·(h·bᵀ) in fp32, rounded once, as cuBLAS's epilogue.
struct LoraUpArgs {
  LoraUpMember w[kLoraMaxMembers];
  const void* h;
  int M, R, count;
};
cudaError_t launch_lora_up_add(Elem t, const LoraUpArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace minqlora
