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

// gemm_4bit_group's lists: one entry per weight in each, at least one weight; returns the count.
size_t check_group_lists(at::TensorList packed, at::TensorList absmax,
                         const c10::List<c10::optional<at::Tensor>>& nested_absmax,
                         const c10::List<c10::optional<at::Tensor>>& nested_map, c10::ArrayRef<double> nested_offset,
                         c10::IntArrayRef out_features);

// gemm_4bit per weight of a group: [x · dequant(W_i)ᵀ], W_i of shape (out_features[i], K = x.size(-1)); checks the
// lists' lengths. The CompositeExplicitAutograd kernel of gemm_4bit_group and the CUDA one's fallback.
std::vector<at::Tensor> gemm_4bit_group_each(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                             const c10::List<c10::optional<at::Tensor>>& nested_absmax,
                                             const c10::List<c10::optional<at::Tensor>>& nested_map,
                                             c10::ArrayRef<double> nested_offset, int64_t blocksize,
                                             int64_t nested_blocksize, c10::string_view quant_type,
                                             c10::IntArrayRef out_features);

}  // namespace minqlora
