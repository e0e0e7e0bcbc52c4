// CPU kernels of the fused AdamW step. Implements, bit for bit:
//   adamw_step_32bit -> optim.adamw_step_ref       (float32 m and v)
//   adamw_step_8bit  -> optim.adamw_step_8bit_ref  (m, v as 8-bit codes in the signed/unsigned dynamic maps,
//                                                   one float32 absmax per 256 elements)
// Both update p, the state and (8-bit) the absmax in place. Elements are independent in the 32-bit step and 256-
// blocks in the 8-bit step, so each is one at::parallel_for (OpenMP underneath). The element arithmetic is
// optim_math.h's, shared with the CUDA kernels. Paging does not exist on a CPU: state is whatever tensor is passed.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "../optim_checks.h"

namespace minqlora {
namespace {

// Work per task: enough elements that the task overhead (~µs) is small against ~1 ns per element.
constexpr int64_t kGrain32 = 1 << 14;
constexpr int64_t kGrainBlocks = 64;

void adamw_step_32bit_cpu(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& exp_avg,
                          const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int64_t step) {
  const int64_t n = check_param_grad(p, grad);
  check_state(exp_avg, at::kFloat, n, p, "exp_avg");
  check_state(exp_avg_sq, at::kFloat, n, p, "exp_avg_sq");
  check_hyper(beta1, beta2, step);
  const AdamScalars s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step);
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adamw_step_32bit_cpu", [&] {
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain32, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        float pv = static_cast<float>(pp[i]);
        if (adamw_element(pv, static_cast<float>(gp[i]), m[i], v[i], s)) pp[i] = static_cast<scalar_t>(pv);
      }
    });
  });
}

// midpoints of a 256-entry map: quant.map_thresholds
std::array<float, 255> midpoints(const at::Tensor& map) {
  const float* mp = map.data_ptr<float>();
  std::array<float, 255> mid;
  for (int k = 0; k < 255; ++k) mid[k] = (mp[k] + mp[k + 1]) * 0.5f;
  return mid;
}

void adamw_step_8bit_cpu(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const at::Tensor& exp_avg_absmax,
                         const at::Tensor& exp_avg_sq_absmax, const at::Tensor& map_signed,
                         const at::Tensor& map_unsigned, double lr, double beta1, double beta2, double eps,
                         double weight_decay, int64_t step) {
  const int64_t n = check_8bit_args(p, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, map_signed,
                                    map_unsigned);
  check_hyper(beta1, beta2, step);
  const AdamScalars s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step);
  const int64_t nb = ceil_div(n, kStateBlock);
  const float* map1 = map_signed.data_ptr<float>();
  const float* map2 = map_unsigned.data_ptr<float>();
  const std::array<float, 255> mid1 = midpoints(map_signed), mid2 = midpoints(map_unsigned);
  uint8_t* c1 = exp_avg.data_ptr<uint8_t>();
  uint8_t* c2 = exp_avg_sq.data_ptr<uint8_t>();
  float* am1 = exp_avg_absmax.data_ptr<float>();
  float* am2 = exp_avg_sq_absmax.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adamw_step_8bit_cpu", [&] {
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    at::parallel_for(0, nb, kGrainBlocks, [&](int64_t b0, int64_t b1) {
      std::array<float, kStateBlock> m, v;  // one block of decoded state, updated, then re-encoded
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * kStateBlock, len = std::min<int64_t>(kStateBlock, n - start);
        float a1 = 0.0f, a2 = 0.0f;
        for (int64_t j = 0; j < len; ++j) {
          const int64_t i = start + j;
          m[j] = map1[c1[i]] * am1[b];  // quant.dequantize_blockwise_8bit_ref: one rounding
          v[j] = map2[c2[i]] * am2[b];
          float pv = static_cast<float>(pp[i]);
          if (adamw_element(pv, static_cast<float>(gp[i]), m[j], v[j], s)) pp[i] = static_cast<scalar_t>(pv);
          a1 = state_absmax_step(a1, m[j]);
          a2 = state_absmax_step(a2, v[j]);
        }
        am1[b] = a1;
        am2[b] = a2;
        const float inv1 = 1.0f / a1, inv2 = 1.0f / a2;
        for (int64_t j = 0; j < len; ++j) {
          c1[start + j] = nearest_code(mid1.data(), state_scale(m[j], a1, inv1));
          c2[start + j] = nearest_code(mid2.data(), state_scale(v[j], a2, inv2));
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CPU, m) {
  m.impl("adamw_step_32bit", &adamw_step_32bit_cpu);
  m.impl("adamw_step_8bit", &adamw_step_8bit_cpu);
}

}  // namespace minqlora
