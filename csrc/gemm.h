// The dequantize + matmul forms of gemm_4bit and gemm_4bit_grad_input (gemm.cpp): every backend's path for many
// rows, and the fallback of the fused CUDA kernel (cuda/gemv_ops.cpp) wherever that one does not apply.
#pragma once

#include <ATen/ATen.h>

namespace minqlora {

// y = x · dequant(W)ᵀ: x (..., K) -> (..., N), W of shape (N, K)
at::Tensor gemm_4bit_composite(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_map, double nested_offset, int64_t blocksize,
                               int64_t nested_blocksize, c10::string_view quant_type, c10::IntArrayRef shape);

// grad_x = grad_y · dequant(W): grad_y (..., N) -> (..., K)
at::Tensor gemm_4bit_grad_input_composite(const at::Tensor& grad_y, const at::Tensor& packed,
                                          const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                                          const c10::optional<at::Tensor>& nested_map, double nested_offset,
                                          int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                                          c10::IntArrayRef shape);

}  // namespace minqlora
