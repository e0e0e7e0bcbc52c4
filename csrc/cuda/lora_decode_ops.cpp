// CUDA backend of lora_down and lora_up_add_ (schemas in ../minqlora.cpp; kernels in lora_decode.cu). Few rows of
// bf16/fp16 (decoding: M <= 16 tokens) go to the kernels; everything else (more rows, float32, K not a multiple of 8,
// a member's r above 128, more than three members, strided or overlapping outputs) runs the ATen form of
// ../lora_decode.cpp, which is what lora_fused.py computed before these kernels existed. Host-compiled torch glue:
// checks, allocation, the device guard, the current stream, the launch check.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "../lora_decode.h"
#include "cuda_glue.h"
#include "lora_decode_launch.h"

namespace minqlora {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

bool half_width(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

at::Tensor lora_down_cuda(const at::Tensor& x_in, const at::Tensor& a_in) {
  check_lora_down_args(x_in, a_in);
  const int64_t K = x_in.size(-1), R = a_in.size(0);
  const int64_t M = K > 0 ? x_in.numel() / K : 0;
  const bool fits = x_in.is_cuda() && half_width(x_in) && M >= 1 && M <= cuda::kLoraMaxRows && K > 0 &&
                    K % 8 == 0 && K <= kIntMax && R >= 1 && R <= kIntMax / cuda::kLoraMaxRows;
  if (!fits) return lora_down_composite(x_in, a_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned(x_in.reshape({M, K}), 16);  // 16-byte loads: a copy only if strided or misaligned
  const at::Tensor a = aligned(a_in, 16);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = R;
  at::Tensor h = at::empty(out_shape, x_in.options());
  C10_CUDA_CHECK(cuda::launch_lora_down(elem_of(x.scalar_type()), x.data_ptr(), a.data_ptr(), h.data_ptr(),
                                        static_cast<int>(M), static_cast<int>(K), static_cast<int>(R),
                                        c10::cuda::getCurrentCUDAStream()));
  return h;
}

// The bytes y (M, N) spans with row stride y.stride(0), element stride 1.
std::pair<uintptr_t, uintptr_t> span_of(const at::Tensor& y) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(y.data_ptr());
  return {begin, begin + ((y.size(0) - 1) * y.stride(0) + y.size(1)) * y.element_size()};
}

// Whether the kernel can update ys in place: each y's elements dense along a row, its rows disjoint, and no two ys
// overlapping (one thread per element: overlapping outputs would race where sequential addmm_ calls do not).
bool disjoint_rows(at::TensorList ys) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const at::Tensor& y : ys) {
    if (y.numel() == 0) continue;
    if (y.size(1) > 1 && y.stride(1) != 1) return false;
    if (y.size(0) > 1 && y.stride(0) < y.size(1)) return false;
    spans.push_back(span_of(y));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) return false;
  return true;
}

void lora_up_add_cuda(at::TensorList ys, const at::Tensor& h_in, at::TensorList bs, c10::ArrayRef<double> scales,
                      c10::IntArrayRef offsets) {
  check_lora_up_args(ys, h_in, bs, scales, offsets);
  const size_t n = ys.size();
  const int64_t M = h_in.size(0), R = h_in.size(1);
  bool fits = h_in.is_cuda() && half_width(h_in) && n <= static_cast<size_t>(cuda::kLoraMaxMembers) && M >= 1 &&
              M <= cuda::kLoraMaxRows && R <= kIntMax / cuda::kLoraMaxRows;
  for (size_t i = 0; fits && i < n; ++i) fits = bs[i].size(1) <= cuda::kLoraMaxRank && ys[i].size(1) <= kIntMax;
  if (!fits || !disjoint_rows(ys)) return lora_up_add_composite(ys, h_in, bs, scales, offsets);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  std::vector<at::Tensor> keep;  // contiguous B, alive until the launch is queued
  cuda::LoraUpArgs args{};
  args.h = h.data_ptr();
  args.M = static_cast<int>(M);
  args.R = static_cast<int>(R);
  args.count = static_cast<int>(n);
  for (size_t i = 0; i < n; ++i) {
    keep.push_back(bs[i].contiguous());
    cuda::LoraUpMember& w = args.w[i];
    w.y = ys[i].data_ptr();
    w.b = keep.back().data_ptr();
    w.N = static_cast<int>(ys[i].size(1));
    w.r = static_cast<int>(bs[i].size(1));
    w.offset = static_cast<int>(offsets[i]);
    w.ldy = ys[i].stride(0);
    w.scale = static_cast<float>(scales[i]);  // cuBLAS takes addmm's alpha as a float for bf16/fp16 too
  }
  C10_CUDA_CHECK(cuda::launch_lora_up_add(elem_of(h.scalar_type()), args, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CUDA, m) {
  m.impl("lora_down", &lora_down_cuda);
  m.impl("lora_up_add_", &lora_up_add_cuda);
}

}  // namespace minqlora
