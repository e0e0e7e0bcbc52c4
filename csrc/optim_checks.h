// Argument checks of the AdamW ops, shared by the CPU and CUDA kernels so both refuse the same input with the same
// message. The arithmetic lives in optim_math.h; the kernels in cpu/optim.cpp and cuda/optim.cu.
#pragma once

#include <torch/library.h>

#include "common.h"
#include "optim_math.h"

namespace minqlora {

// p and grad: same float dtype, shape and device, contiguous (optim.py makes them so). Returns numel.
inline int64_t check_param_grad(const at::Tensor& p, const at::Tensor& grad) {
  check_float(p, "p");
  TORCH_CHECK(grad.scalar_type() == p.scalar_type(), "grad must have p's dtype ", p.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.sizes() == p.sizes(), "grad has shape ", grad.sizes(), " but p has shape ", p.sizes());
  check_same_device(p, grad, "p", "grad");
  TORCH_CHECK(p.is_contiguous() && grad.is_contiguous(), "p and grad must be contiguous");
  return p.numel();
}

inline void check_state(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Tensor& p,
                        const char* name) {
  check_dtype(t, dtype, name);
  TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " elements, expected ", numel);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  check_same_device(p, t, "p", name);
}

inline void check_hyper(double beta1, double beta2, int64_t step) {
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(step >= 1, "step must be >= 1 (the count including this update), got ", step);
}

inline void check_map(const at::Tensor& map, const at::Tensor& p, const char* name) {
  check_dtype(map, at::kFloat, name);
  TORCH_CHECK(map.numel() == 256 && map.is_contiguous(), name, " must be 256 contiguous float32 values");
  check_same_device(p, map, "p", name);
}

// All checks of adamw_step_8bit; returns numel.
inline int64_t check_8bit_args(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& exp_avg,
                               const at::Tensor& exp_avg_sq, const at::Tensor& absmax1, const at::Tensor& absmax2,
                               const at::Tensor& map_signed, const at::Tensor& map_unsigned) {
  const int64_t n = check_param_grad(p, grad);
  const int64_t nb = ceil_div(n, kStateBlock);
  check_state(exp_avg, at::kByte, n, p, "exp_avg");
  check_state(exp_avg_sq, at::kByte, n, p, "exp_avg_sq");
  check_state(absmax1, at::kFloat, nb, p, "exp_avg_absmax");
  check_state(absmax2, at::kFloat, nb, p, "exp_avg_sq_absmax");
  check_map(map_signed, p, "map_signed");
  check_map(map_unsigned, p, "map_unsigned");
  return n;
}

}  // namespace minqlora
