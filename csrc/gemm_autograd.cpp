// Autograd of gemm_4bit, in C++ at the Autograd dispatch key (every backend): grad_x = grad_y · dequant(W) through
// gemm_4bit_grad_input; the frozen packed weight gets no gradient and only it and its (small) state are saved,
// never a dequantized copy (QLoRA §3: memory is the point). It was a Python torch.library.register_autograd formula;
// in C++ it costs a few µs per call instead of ~1.2× a bf16 F.linear's whole dispatch (measured on the CPU,
// benchmarks/README.md), which decides the eager call overhead of small 4-bit matmuls.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace minqlora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using GemmSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, double, int64_t, int64_t, c10::string_view,
                           c10::SymIntArrayRef);

c10::TypedOperatorHandle<GemmSig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<GemmSig>();
}

c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

class Gemm4bit : public torch::autograd::Function<Gemm4bit> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                            const c10::optional<at::Tensor>& nested_map, double nested_offset, int64_t blocksize,
                            int64_t nested_blocksize, c10::string_view quant_type, c10::SymIntArrayRef shape) {
    ctx->save_for_backward({packed, absmax, nested_absmax.value_or(at::Tensor()), nested_map.value_or(at::Tensor())});
    ctx->saved_data["nested_offset"] = nested_offset;
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["nested_blocksize"] = nested_blocksize;
    ctx->saved_data["quant_type"] = std::string(quant_type);
    ctx->saved_data["shape"] = c10::IValue(shape.vec());
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto gemm = op("minqlora::gemm_4bit");
    return gemm.call(x, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize,
                     quant_type, shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      const variable_list saved = ctx->get_saved_variables();
      const std::string quant_type = ctx->saved_data["quant_type"].toStringRef();
      const std::vector<c10::SymInt> shape = ctx->saved_data["shape"].toSymIntVector();
      static const auto grad_input = op("minqlora::gemm_4bit_grad_input");
      grad_x = grad_input.call(grads[0], saved[0], saved[1], present(saved[2]), present(saved[3]),
                               ctx->saved_data["nested_offset"].toDouble(), ctx->saved_data["blocksize"].toInt(),
                               ctx->saved_data["nested_blocksize"].toInt(), quant_type, shape);
    }
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor gemm_4bit_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_map, double nested_offset, int64_t blocksize,
                              int64_t nested_blocksize, c10::string_view quant_type, c10::SymIntArrayRef shape) {
  // No gradient wanted (decoding, eval, an input that needs none; the packed weight and its state never do): the
  // op below autograd directly, without a Node and its saved state, whose building cost 2.1 µs of a 7.9 µs call
  // on the CPU (no_grad, 32x64 weight, one thread). The output then needs no gradient either, as through apply.
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto gemm = op("minqlora::gemm_4bit");
    return gemm.call(x, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize,
                     quant_type, shape);
  }
  return Gemm4bit::apply(x, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize,
                         quant_type, shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, Autograd, m) {
  m.impl("gemm_4bit", &gemm_4bit_autograd);
}

}  // namespace minqlora
