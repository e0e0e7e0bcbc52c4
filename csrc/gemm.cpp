// gemm_4bit and gemm_4bit_grad_input for every backend without a fused kernel of its own: dequantize the whole
// weight to the activation dtype through the dequantize_4bit op (so each backend's kernel is used), then one
// matmul. This is bitsandbytes' MatMul4Bit strategy (bnb-format.md §5), the CPU path, and on CUDA the path for many
// rows (cuda/gemv_ops.cpp dispatches few rows to the fused kernel and the rest here). Registered as
// CompositeExplicitAutograd: autograd comes from ops.py (register_autograd).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "gemm.h"

namespace minqlora {
namespace {

// x may be empty (zero rows): the result is then empty too; anything else as check_float.
void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

at::Tensor dequant_weight(const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
                          double nested_offset, int64_t blocksize, int64_t nested_blocksize,
                          c10::string_view quant_type, c10::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(shape.size() == 2, "gemm_4bit needs a 2-D weight shape (N, K), got ", shape);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("minqlora::dequantize_4bit", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&, double, int64_t, int64_t,
                                         c10::string_view, c10::SymIntArrayRef, at::ScalarType)>();
  return op.call(packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize, quant_type,
                 c10::fromIntArrayRefSlow(shape), dtype);
}

}  // namespace

// x (..., K) -> (..., N)
at::Tensor gemm_4bit_composite(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
                     double nested_offset, int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                     c10::IntArrayRef shape) {
  check_activation(x, "x");
  TORCH_CHECK(shape.size() == 2 && x.size(-1) == shape[1], "x has last dimension ", x.size(-1),
              " but the weight shape is ", shape);
  at::Tensor w = dequant_weight(packed, absmax, nested_absmax, nested_map, nested_offset, blocksize,
                                nested_blocksize, quant_type, shape, x.scalar_type());
  return at::matmul(x, w.t());
}

// grad_y (..., N) -> grad_x (..., K)
at::Tensor gemm_4bit_grad_input_composite(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                const c10::optional<at::Tensor>& nested_absmax,
                                const c10::optional<at::Tensor>& nested_map, double nested_offset, int64_t blocksize,
                                int64_t nested_blocksize, c10::string_view quant_type, c10::IntArrayRef shape) {
  check_activation(grad_y, "grad_y");
  TORCH_CHECK(shape.size() == 2 && grad_y.size(-1) == shape[0], "grad_y has last dimension ", grad_y.size(-1),
              " but the weight shape is ", shape);
  at::Tensor w = dequant_weight(packed, absmax, nested_absmax, nested_map, nested_offset, blocksize,
                                nested_blocksize, quant_type, shape, grad_y.scalar_type());
  return at::matmul(grad_y, w);
}

TORCH_LIBRARY_IMPL(minqlora, CompositeExplicitAutograd, m) {
  m.impl("gemm_4bit", &gemm_4bit_composite);
  m.impl("gemm_4bit_grad_input", &gemm_4bit_grad_input_composite);
}

}  // namespace minqlora
