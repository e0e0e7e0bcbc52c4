// Torch glue of the layer kernels (layer_kernels.cuh): argument checks, allocation, a device guard, the current
// stream, one launch per op. Implements rms_norm, rms_norm_backward, rope, swiglu and swiglu_backward (references
// in minqlora/fused.py) and rope_kv_cache (minqlora/static_cache.py); schemas in csrc/minqlora.cpp. CUDA only:
// fused.py and static_cache.py call them for CUDA tensors alone.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "elementwise_launch.h"
#include "float_dispatch.h"
#include "layer_kernels.cuh"

namespace minqlora {
namespace {

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device(), " like ", ref_name,
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

// The row view shared by both RMSNorm ops: x (..., h) with rows = numel / h, weight (h,). Returns {h, rows}; rows
// is the grid's x dimension, so below 2^31.
std::pair<int64_t, int64_t> check_norm(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dim, got ", x.sizes());
  check_like(weight, x, "rms_norm: weight", "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: weight must be (", x.size(-1),
              ",), got ", weight.sizes());
  const int64_t rows = x.numel() / x.size(-1);
  TORCH_CHECK(rows < (int64_t(1) << 31), op, ": too many rows (", rows, ")");
  return {x.size(-1), rows};
}

at::Tensor rms_norm_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  int64_t h, rows;  // plain names: lambdas below capture them (structured bindings need C++20 for that)
  std::tie(h, rows) = check_norm(x_in, weight_in, "rms_norm");
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  at::Tensor y = at::empty_like(x);
  if (rows == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float(x.scalar_type(), "rms_norm: x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_vec<T>(vec_width(sizeof(T), h, {&x, &w, &y}), [&](auto vec) {
      layer::rms_norm_kernel<T, decltype(vec)::value><<<rows, layer::kRowThreads, 0, stream>>>(
          static_cast<const T*>(x.data_ptr()), static_cast<const T*>(w.data_ptr()), static_cast<T*>(y.data_ptr()),
          h, static_cast<float>(eps));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor rms_norm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight_in,
                                  double eps) {
  int64_t h, rows;  // plain names: lambdas below capture them (structured bindings need C++20 for that)
  std::tie(h, rows) = check_norm(x_in, weight_in, "rms_norm_backward");
  check_like(grad_in, x_in, "rms_norm_backward: grad", "x");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "rms_norm_backward: grad must be ", x_in.sizes(), ", got ",
              grad_in.sizes());
  const at::Tensor g = grad_in.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  if (rows == 0) return dx;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float(x.scalar_type(), "rms_norm_backward: x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_vec<T>(vec_width(sizeof(T), h, {&g, &x, &w, &dx}), [&](auto vec) {
      layer::rms_norm_backward_kernel<T, decltype(vec)::value><<<rows, layer::kRowThreads, 0, stream>>>(
          static_cast<const T*>(g.data_ptr()), static_cast<const T*>(x.data_ptr()),
          static_cast<const T*>(w.data_ptr()), static_cast<T*>(dx.data_ptr()), h, static_cast<float>(eps));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

// x (B, heads, S, D), any strides; cos, sin (B or 1, S, D). out has x's sizes and layout (empty_like).
at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  TORCH_CHECK(x.is_cuda(), "rope: x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rope: x must be (B, heads, S, D) with D even, got ", x.sizes());
  check_like(cos, x, "rope: cos", "x");
  check_like(sin, x, "rope: sin", "x");
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == x.size(0) || t->size(0) == 1) && t->size(1) == x.size(2) &&
                    t->size(2) == x.size(3),
                "rope: cos and sin must be (", x.size(0), " or 1, ", x.size(2), ", ", x.size(3), "), got ",
                t->sizes());
  }
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  layer::RopeShape sh{x.size(0), x.size(1), x.size(2), x.size(3), {}, {}, {}, {}};
  for (int i = 0; i < 4; ++i) {
    sh.xs[i] = x.stride(i);
    sh.os[i] = out.stride(i);
  }
  for (int i = 0; i < 3; ++i) {
    sh.cs[i] = cos.size(i) == 1 ? 0 : cos.stride(i);  // a batch of 1 broadcasts
    sh.ss[i] = sin.size(i) == 1 ? 0 : sin.stride(i);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // rope_vec_kernel where the head dim is dense and every row start is 16-byte aligned, else the strided kernel.
  const int64_t vec = 16 / x.element_size();
  bool dense = sh.xs[3] == 1 && sh.os[3] == 1 && sh.cs[2] == 1 && sh.ss[2] == 1 && (sh.d / 2) % vec == 0;
  for (int i = 0; i < 3 && dense; ++i) dense = sh.xs[i] % vec == 0 && sh.os[i] % vec == 0;
  for (int i = 0; i < 2 && dense; ++i) dense = sh.cs[i] % vec == 0 && sh.ss[i] % vec == 0;
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &cos, &sin, &out})
    dense = dense && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
  const int ctas = elementwise_ctas(x.numel() / 2 / (dense ? vec : 1), x.get_device());
  dispatch_cuda_float(x.scalar_type(), "rope: x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *xp = static_cast<const T*>(x.data_ptr()), *cp = static_cast<const T*>(cos.data_ptr()),
            *sp = static_cast<const T*>(sin.data_ptr());
    T* op = static_cast<T*>(out.data_ptr());
    if (dense) {
      layer::rope_vec_kernel<T, 16 / sizeof(T)><<<ctas, 256, 0, stream>>>(xp, cp, sp, op, sh, transpose);
    } else {
      layer::rope_kernel<T><<<ctas, 256, 0, stream>>>(xp, cp, sp, op, sh, transpose);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// static_cache.rope_kv_cache_ref: q (B, HQ, T, D), k / v (B, HKV, T, D), cos / sin (B or 1, T, D), the caches
// (B, HKV, S, D), slots (T,) int64 on the device (read by the kernel: no host sync, so a CUDA graph can hold it).
// Returns q rotated (empty_like(q), as rope); writes rotated k and v into the caches. Slots are not range-checked
// (that would be a host read); StaticKVCache claims them below max_len.
at::Tensor rope_kv_cache_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                              const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                              const at::Tensor& slots) {
  TORCH_CHECK(q.is_cuda(), "rope_kv_cache: q must be a CUDA tensor, got one on ", q.device());
  TORCH_CHECK(q.dim() == 4 && q.size(3) % 2 == 0, "rope_kv_cache: q must be (B, heads, T, D) with D even, got ",
              q.sizes());
  using Named = std::pair<const at::Tensor*, const char*>;
  for (const auto& [t, name] : std::initializer_list<Named>{
           {&k, "rope_kv_cache: k"}, {&v, "rope_kv_cache: v"}, {&cos, "rope_kv_cache: cos"},
           {&sin, "rope_kv_cache: sin"}, {&k_cache, "rope_kv_cache: k_cache"}, {&v_cache, "rope_kv_cache: v_cache"}})
    check_like(*t, q, name, "q");
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(2) == T && k.size(3) == D && v.sizes() == k.sizes(),
              "rope_kv_cache: k and v must both be (", B, ", kv_heads, ", T, ", ", D, "), got ", k.sizes(), " and ",
              v.sizes());
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == B || t->size(0) == 1) && t->size(1) == T && t->size(2) == D,
                "rope_kv_cache: cos and sin must be (", B, " or 1, ", T, ", ", D, "), got ", t->sizes());
  }
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->dim() == 4 && c->size(0) == B && c->size(1) == k.size(1) && c->size(3) == D,
                "rope_kv_cache: the caches must be (", B, ", ", k.size(1), ", max_len, ", D, "), got ", c->sizes());
  }
  TORCH_CHECK(slots.is_cuda() && slots.device() == q.device() && slots.scalar_type() == at::kLong &&
                  slots.dim() == 1 && slots.size(0) == T,
              "rope_kv_cache: slots must be (", T, ",) int64 on ", q.device(), ", got ", slots.sizes(), " ",
              slots.scalar_type(), " on ", slots.device());
  at::Tensor out = at::empty_like(q);
  if (q.numel() == 0 && k.numel() == 0) return out;
  const at::Tensor sl = slots.contiguous();
  layer::RopeCacheShape sh{B, q.size(1), k.size(1), T, D, {}, {}, {}, {}, {}, {}, {}, {}};
  for (int i = 0; i < 4; ++i) {
    sh.qs[i] = q.stride(i), sh.ks[i] = k.stride(i), sh.vs[i] = v.stride(i), sh.os[i] = out.stride(i);
    sh.kcs[i] = k_cache.stride(i), sh.vcs[i] = v_cache.stride(i);
  }
  for (int i = 0; i < 3; ++i) {
    sh.cs[i] = cos.size(i) == 1 ? 0 : cos.stride(i);  // a batch of 1 broadcasts
    sh.ss[i] = sin.size(i) == 1 ? 0 : sin.stride(i);
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int ctas = elementwise_ctas((q.numel() + 2 * k.numel()) / 2, q.get_device());
  dispatch_cuda_float(q.scalar_type(), "rope_kv_cache: q", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    C10_CUDA_CHECK(cuda::launch_pdl(
        layer::rope_kv_cache_kernel<T>, dim3(ctas), dim3(256), 0, stream, cuda::pdl_applies(stream),
        static_cast<const T*>(q.data_ptr()), static_cast<const T*>(k.data_ptr()), static_cast<const T*>(v.data_ptr()),
        static_cast<const T*>(cos.data_ptr()), static_cast<const T*>(sin.data_ptr()), static_cast<T*>(out.data_ptr()),
        static_cast<T*>(k_cache.data_ptr()), static_cast<T*>(v_cache.data_ptr()), sl.data_ptr<int64_t>(), sh));
  });
  return out;
}

// The shared checks of the SwiGLU ops: tensors of gate's shape, dtype and device, made contiguous.
void check_swiglu(const at::Tensor& gate, const at::Tensor& other, const char* name) {
  TORCH_CHECK(gate.is_cuda(), "swiglu: gate must be a CUDA tensor, got one on ", gate.device());
  check_like(other, gate, name, "gate");
  TORCH_CHECK(other.sizes() == gate.sizes(), name, " must be ", gate.sizes(), " like gate, got ", other.sizes());
}

at::Tensor swiglu_cuda(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu(gate_in, up_in, "swiglu: up");
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor out = at::empty_like(g);
  const int64_t n = g.numel();
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(g.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float(g.scalar_type(), "swiglu: gate", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_vec<T>(vec_width(sizeof(T), n, {&g, &u, &out}), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      layer::swiglu_kernel<T, V><<<elementwise_ctas(n / V, g.get_device()), 256, 0, stream>>>(
          static_cast<const T*>(g.data_ptr()), static_cast<const T*>(u.data_ptr()), static_cast<T*>(out.data_ptr()),
          n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& gate_in,
                                                        const at::Tensor& up_in) {
  check_swiglu(gate_in, up_in, "swiglu_backward: up");
  check_swiglu(gate_in, grad_in, "swiglu_backward: grad");
  const at::Tensor dh = grad_in.contiguous(), g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  const int64_t n = g.numel();
  if (n == 0) return {dg, du};
  const c10::cuda::CUDAGuard guard(g.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float(g.scalar_type(), "swiglu_backward: gate", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_vec<T>(vec_width(sizeof(T), n, {&dh, &g, &u, &dg, &du}), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      layer::swiglu_backward_kernel<T, V><<<elementwise_ctas(n / V, g.get_device()), 256, 0, stream>>>(
          static_cast<const T*>(dh.data_ptr()), static_cast<const T*>(g.data_ptr()),
          static_cast<const T*>(u.data_ptr()), static_cast<T*>(dg.data_ptr()), static_cast<T*>(du.data_ptr()), n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("rope", &rope_cuda);
  m.impl("rope_kv_cache", &rope_kv_cache_cuda);
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace minqlora
