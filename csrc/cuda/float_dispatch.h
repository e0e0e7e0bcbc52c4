// The dtype switch of the CUDA ops' torch glue (optim.cu, layer_ops.cu): calls f with a null pointer of the CUDA
// storage type of a float32 / float16 / bfloat16 tensor, so the caller instantiates its kernel for that type.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace minqlora {

template <typename F>
void dispatch_cuda_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t);
  }
}

}  // namespace minqlora
