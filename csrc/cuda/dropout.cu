// Torch glue of the dropout kernels (dropout_kernels.cuh): the shared checks (dropout_checks.h), allocation, a
// device guard, the current stream, one launch. Implements dropout_copies and dropout_sum (spec: minqlora/dropout.py;
// schemas in csrc/minqlora.cpp).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../dropout_checks.h"
#include "dropout_kernels.cuh"
#include "elementwise_launch.h"
#include "float_dispatch.h"

namespace minqlora {
namespace {

at::Tensor dropout_copies_cuda(const at::Tensor& x_in, int64_t seed, at::ArrayRef<double> ps, int64_t copies) {
  const DropoutCall call = dropout_copies_call(x_in, seed, ps, copies);
  const at::Tensor &x = call.in, &out = call.out;
  const int64_t n = call.n;
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float(x.scalar_type(), "dropout_copies: x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_vec<T>(vec_width(sizeof(T), n, {&x, &out}), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      dropout::dropout_copies_kernel<T, V><<<elementwise_ctas(n / V, x.get_device()), 256, 0, stream>>>(
          static_cast<const T*>(x.data_ptr()), static_cast<T*>(out.data_ptr()), n, call.plan);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dropout_sum_cuda(const at::Tensor& g_in, int64_t seed, at::ArrayRef<double> ps) {
  const DropoutCall call = dropout_sum_call(g_in, seed, ps);
  const at::Tensor &g = call.in, &out = call.out;
  const int64_t n = call.n;
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(g.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float(g.scalar_type(), "dropout_sum: g", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_vec<T>(vec_width(sizeof(T), n, {&g, &out}), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      dropout::dropout_sum_kernel<T, V><<<elementwise_ctas(n / V, g.get_device()), 256, 0, stream>>>(
          static_cast<const T*>(g.data_ptr()), static_cast<T*>(out.data_ptr()), n, call.plan);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CUDA, m) {
  m.impl("dropout_copies", &dropout_copies_cuda);
  m.impl("dropout_sum", &dropout_sum_cuda);
}

}  // namespace minqlora
