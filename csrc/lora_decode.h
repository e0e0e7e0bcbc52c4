// lora_down and lora_up_add_ (schemas in minqlora.cpp): the argument checks both backends share and the ATen form
// (lora_decode.cpp), which is every backend's kernel and the fallback of the CUDA one (cuda/lora_decode_ops.cpp)
// wherever the few-row kernels do not apply.
#pragma once

#include <ATen/ATen.h>

namespace minqlora {

// x (..., K), a (R, K) of x's dtype and device.
void check_lora_down_args(const at::Tensor& x, const at::Tensor& a);
// ys[i] (M, N_i), bs[i] (N_i, r_i), h (M, R), all of h's dtype and device; 0 <= offsets[i], offsets[i] + r_i <= R;
// one entry per member in every list.
void check_lora_up_args(at::TensorList ys, const at::Tensor& h, at::TensorList bs, c10::ArrayRef<double> scales,
                        c10::IntArrayRef offsets);

// h = x · aᵀ: at::matmul(x, a.t()), (..., R) in x's dtype.
at::Tensor lora_down_composite(const at::Tensor& x, const at::Tensor& a);
// ys[i].addmm_(h[:, offsets[i] : offsets[i] + r_i], bs[i].t(), 1, scales[i]) for each member i, in place.
void lora_up_add_composite(at::TensorList ys, const at::Tensor& h, at::TensorList bs, c10::ArrayRef<double> scales,
                           c10::IntArrayRef offsets);

}  // namespace minqlora
