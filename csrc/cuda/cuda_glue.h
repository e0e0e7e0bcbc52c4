// Helpers shared by the torch side of the CUDA ops (quant_ops.cpp, gemv_ops.cpp), host-compiled: the element-type
// enum of a tensor, integer log2 of a checked power of two, the device check, and 16-byte-aligned views.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "quant_launch.h"

namespace minqlora {

inline cuda::Elem elem_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::Elem::kF32;
    case at::kHalf: return cuda::Elem::kF16;
    case at::kBFloat16: return cuda::Elem::kBF16;
    default: TORCH_CHECK(false, "expected float32, float16 or bfloat16, got ", t);
  }
}

inline int log2_int(int64_t v) {  // v is a power of two (check_blocksize)
  int r = 0;
  while ((int64_t(1) << r) < v) ++r;
  return r;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// The kernels read with vector loads: a tensor viewed at an odd offset into its storage is copied to fresh
// (512-byte aligned) memory first.
inline at::Tensor aligned(const at::Tensor& t, int bytes) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % bytes ? c.clone() : c;
}

}  // namespace minqlora
