// lora_down and lora_up_add_ for every backend without a kernel of its own: the very ATen calls of
// lora_fused.LoRAGroup (h = x2 @ a.t(); y2.addmm_(h_i, b_i.t(), alpha=s_i)), so on the CPU the ops give that
// code's bits. The CUDA kernels for few rows are cuda/lora_decode.cu; cuda/lora_decode_ops.cpp falls back here for
// the rest. Registered as CompositeExplicitAutograd, without autograd: decoding and eval only (lora_fused.py calls
// them with autograd off).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "lora_decode.h"

namespace minqlora {
namespace {

bool is_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

}  // namespace

void check_lora_down_args(const at::Tensor& x, const at::Tensor& a) {
  TORCH_CHECK(is_float(x), "lora_down: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "lora_down: x must have at least one dimension (..., K)");
  TORCH_CHECK(a.dim() == 2 && a.size(1) == x.size(-1), "lora_down: a must be (R, K) with K = x's last dimension (",
              x.size(-1), "), got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == x.scalar_type(), "lora_down: a must have x's dtype ", x.scalar_type(), ", got ",
              a.scalar_type());
  TORCH_CHECK(a.device() == x.device(), "lora_down: a is on ", a.device(), " but x is on ", x.device());
}

void check_lora_up_args(at::TensorList ys, const at::Tensor& h, at::TensorList bs, c10::ArrayRef<double> scales,
                        c10::IntArrayRef offsets) {
  const size_t n = ys.size();
  TORCH_CHECK(n >= 1 && bs.size() == n && scales.size() == n && offsets.size() == n,
              "lora_up_add_: ys, bs, scales and offsets must have one entry per member (at least one), got ", n, ", ",
              bs.size(), ", ", scales.size(), ", ", offsets.size());
  TORCH_CHECK(is_float(h), "lora_up_add_: h must be float32, float16 or bfloat16, got ", h.scalar_type());
  TORCH_CHECK(h.dim() == 2, "lora_up_add_: h must be (M, R), got ", h.sizes());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &y = ys[i], &b = bs[i];
    TORCH_CHECK(y.dim() == 2 && y.size(0) == h.size(0), "lora_up_add_: ys[", i, "] must be (", h.size(0),
                ", N) like h's rows, got ", y.sizes());
    TORCH_CHECK(b.dim() == 2 && b.size(0) == y.size(1), "lora_up_add_: bs[", i, "] must be (", y.size(1),
                ", r) for ys[", i, "] of ", y.size(1), " features, got ", b.sizes());
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + b.size(1) <= h.size(1), "lora_up_add_: offsets[", i, "] = ",
                offsets[i], " with r = ", b.size(1), " reaches past h's ", h.size(1), " columns");
    TORCH_CHECK(y.scalar_type() == h.scalar_type() && b.scalar_type() == h.scalar_type(), "lora_up_add_: ys[", i,
                "] and bs[", i, "] must have h's dtype ", h.scalar_type(), ", got ", y.scalar_type(), " and ",
                b.scalar_type());
    TORCH_CHECK(y.device() == h.device() && b.device() == h.device(), "lora_up_add_: ys[", i, "] and bs[", i,
                "] must be on h's device ", h.device(), ", got ", y.device(), " and ", b.device());
  }
}

at::Tensor lora_down_composite(const at::Tensor& x, const at::Tensor& a) {
  check_lora_down_args(x, a);
  return at::matmul(x, a.t());
}

void lora_up_add_composite(at::TensorList ys, const at::Tensor& h, at::TensorList bs, c10::ArrayRef<double> scales,
                           c10::IntArrayRef offsets) {
  check_lora_up_args(ys, h, bs, scales, offsets);
  for (size_t i = 0; i < ys.size(); ++i) ys[i].addmm_(h.narrow(1, offsets[i], bs[i].size(1)), bs[i].t(), 1, scales[i]);
}

TORCH_LIBRARY_IMPL(minqlora, CompositeExplicitAutograd, m) {
  m.impl("lora_down", &lora_down_composite);
  m.impl("lora_up_add_", &lora_up_add_composite);
}

}  // namespace minqlora
