// gemm_4bit and gemm_4bit_grad_input for every backend without a fused kernel of its own: dequantize the whole
// weight to the activation dtype through the dequantize_4bit op (so each backend's kernel is used), then one
// matmul. This is bitsandbytes' MatMul4Bit strategy (bnb-format.md §5), and on the CPU and CUDA the path for many
// rows (cpu/gemv.cpp and cuda/gemv_ops.cpp take few rows to their fused loops and send the rest here). Registered as
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

size_t check_group_lists(at::TensorList packed, at::TensorList absmax,
                         const c10::List<c10::optional<at::Tensor>>& nested_absmax,
                         const c10::List<c10::optional<at::Tensor>>& nested_map, c10::ArrayRef<double> nested_offset,
                         c10::IntArrayRef out_features) {
  const size_t n = packed.size();
  TORCH_CHECK(n >= 1, "gemm_4bit_group needs at least one weight");
  TORCH_CHECK(absmax.size() == n && nested_absmax.size() == n && nested_map.size() == n &&
                  nested_offset.size() == n && out_features.size() == n,
              "gemm_4bit_group: packed, absmax, nested_absmax, nested_map, nested_offset and out_features must have "
              "one entry per weight (", n, "), got ", absmax.size(), ", ", nested_absmax.size(), ", ",
              nested_map.size(), ", ", nested_offset.size(), ", ", out_features.size());
  return n;
}

std::vector<at::Tensor> gemm_4bit_group_each(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                             const c10::List<c10::optional<at::Tensor>>& nested_absmax,
                                             const c10::List<c10::optional<at::Tensor>>& nested_map,
                                             c10::ArrayRef<double> nested_offset, int64_t blocksize,
                                             int64_t nested_blocksize, c10::string_view quant_type,
                                             c10::IntArrayRef out_features) {
  const size_t n = check_group_lists(packed, absmax, nested_absmax, nested_map, nested_offset, out_features);
  TORCH_CHECK(x.dim() >= 1, "gemm_4bit_group: x must have at least one dimension");
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("minqlora::gemm_4bit", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double,
                                         int64_t, int64_t, c10::string_view, c10::SymIntArrayRef)>();
  std::vector<at::Tensor> ys;
  ys.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::vector<int64_t> shape{out_features[i], x.size(-1)};
    ys.push_back(op.call(x, packed[i], absmax[i], nested_absmax.get(i), nested_map.get(i), nested_offset[i],
                         blocksize, nested_blocksize, quant_type, c10::fromIntArrayRefSlow(shape)));
  }
  return ys;
}

TORCH_LIBRARY_IMPL(minqlora, CompositeExplicitAutograd, m) {
  m.impl("gemm_4bit_group", &gemm_4bit_group_each);
  m.impl("gemm_4bit", &gemm_4bit_composite);
  m.impl("gemm_4bit_grad_input", &gemm_4bit_grad_input_composite);
}

}  // namespace minqlora
