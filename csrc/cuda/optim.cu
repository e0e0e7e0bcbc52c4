// Torch glue of the CUDA AdamW step: checks (optim_checks.h), a device guard, the current stream, and a launch of
// optim_kernels.cuh's kernel for p's dtype. Implements adamw_step_32bit and adamw_step_8bit (references in
// minqlora/optim.py). Managed-memory allocation and prefetch live in paged.cu.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../optim_checks.h"
#include "float_dispatch.h"
#include "optim_kernels.cuh"

namespace minqlora {
namespace {

// Cap on CTAs: 8 resident 256-thread CTAs per SM (2048 threads, the H100/H200 limit), so one wave covers the GPU
// and each CTA loops over the rest; the 8-bit kernel then builds its shared map midpoints once per CTA.
int max_ctas(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms * 8;
}

void adamw_step_32bit_cuda(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                           double weight_decay, int64_t step) {
  const int64_t n = check_param_grad(p, grad);
  check_state(exp_avg, at::kFloat, n, p, "exp_avg");
  check_state(exp_avg_sq, at::kFloat, n, p, "exp_avg_sq");
  check_hyper(beta1, beta2, step);
  const AdamScalars s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step);
  const c10::cuda::CUDAGuard guard(p.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int ctas = max_ctas(p.get_device());
  dispatch_cuda_float(p.scalar_type(), "p", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    C10_CUDA_CHECK(launch_adamw_32bit<T>(static_cast<T*>(p.data_ptr()), static_cast<const T*>(grad.data_ptr()),
                                         exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), n, s, ctas,
                                         stream));
  });
}

void adamw_step_8bit_cuda(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& exp_avg,
                          const at::Tensor& exp_avg_sq, const at::Tensor& exp_avg_absmax,
                          const at::Tensor& exp_avg_sq_absmax, const at::Tensor& map_signed,
                          const at::Tensor& map_unsigned, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int64_t step) {
  const int64_t n = check_8bit_args(p, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, map_signed,
                                    map_unsigned);
  check_hyper(beta1, beta2, step);
  const AdamScalars s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step);
  const c10::cuda::CUDAGuard guard(p.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int ctas = max_ctas(p.get_device());
  dispatch_cuda_float(p.scalar_type(), "p", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    C10_CUDA_CHECK(launch_adamw_8bit<T>(
        static_cast<T*>(p.data_ptr()), static_cast<const T*>(grad.data_ptr()), exp_avg.data_ptr<uint8_t>(),
        exp_avg_sq.data_ptr<uint8_t>(), exp_avg_absmax.data_ptr<float>(), exp_avg_sq_absmax.data_ptr<float>(),
        map_signed.data_ptr<float>(), map_unsigned.data_ptr<float>(), n, s, ctas, stream));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CUDA, m) {
  m.impl("adamw_step_32bit", &adamw_step_32bit_cuda);
  m.impl("adamw_step_8bit", &adamw_step_8bit_cuda);
}

}  // namespace minqlora
