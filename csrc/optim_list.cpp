// adamw_step_32bit_list: adamw_step_32bit (optim.adamw_step_ref) for each parameter of a list, in one call from
// Python. Registered as CompositeExplicitAutograd: each element goes through the dispatcher to its own device's
// kernel (csrc/cpu/optim.cpp, csrc/cuda/optim.cu), so CPU, CUDA and mixed lists all work and every element gets
// exactly the single-tensor op's arithmetic and checks. A failing check names the element.

#include <ATen/ATen.h>
#include <torch/library.h>

namespace minqlora {
namespace {

void adamw_step_32bit_list(at::TensorList p, at::TensorList grad, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                           double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  TORCH_CHECK(grad.size() == p.size() && exp_avg.size() == p.size() && exp_avg_sq.size() == p.size(),
              "adamw_step_32bit_list: p, grad, exp_avg and exp_avg_sq must be lists of one length, got ", p.size(),
              ", ", grad.size(), ", ", exp_avg.size(), ", ", exp_avg_sq.size());
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minqlora::adamw_step_32bit", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   double, double, double, double, double, int64_t)>();
  for (size_t i = 0; i < p.size(); ++i) {
    try {
      op.call(p[i], grad[i], exp_avg[i], exp_avg_sq[i], lr, beta1, beta2, eps, weight_decay, step);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "adamw_step_32bit_list, element ", i, ": ", e.what_without_backtrace());
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CompositeExplicitAutograd, m) {
  m.impl("adamw_step_32bit_list", &adamw_step_32bit_list);
}

}  // namespace minqlora
