// Argument checks of the dropout ops and the plan they build, shared by the CPU and CUDA glue so both refuse the
// same input with the same message. Arithmetic: dropout_math.h; spec: minqlora/dropout.py.
#pragma once

#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common.h"
#include "dropout_math.h"

namespace minqlora {

// seed in [0, 2⁶³) (an int64 >= 0), 1 <= copies <= kMaxDropoutCopies, ps of length 1 or copies, each in [0, 1).
inline DropoutPlan dropout_plan(int64_t seed, at::ArrayRef<double> ps, int64_t copies, const char* op) {
  TORCH_CHECK(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(copies >= 1 && copies <= kMaxDropoutCopies, op, ": copies must be in [1, ", kMaxDropoutCopies,
              "], got ", copies);
  TORCH_CHECK(ps.size() == 1 || static_cast<int64_t>(ps.size()) == copies, op, ": ", ps.size(),
              " probabilities for ", copies, " copies (give 1 or ", copies, ")");
  DropoutPlan plan{};
  plan.k1 = mix32(static_cast<uint32_t>(seed));
  plan.k2 = mix32(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32) ^ 0x9E3779B9u);
  plan.copies = copies;
  for (int64_t c = 0; c < copies; ++c) {
    const double p = ps[ps.size() == 1 ? 0 : c];
    TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout probability must be in [0, 1), got ", p);
    plan.threshold[c] = static_cast<uint64_t>(std::nearbyint(p * 4294967296.0));  // round half to even, as Python
  }
  return plan;
}

inline void check_dropout_input(const at::Tensor& x, const char* op, const char* name) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.numel() < (int64_t(1) << 62) / kMaxDropoutCopies, op, ": ", name, " is too large");
}

// One op call after its checks: the plan, the input made contiguous, the output allocated, its element count n
// (x's for dropout_copies, one copy's for dropout_sum). Both backends start here.
struct DropoutCall {
  DropoutPlan plan;
  at::Tensor in, out;
  int64_t n;
};

// dropout_copies: out (copies, *x.shape) in x's dtype.
inline DropoutCall dropout_copies_call(const at::Tensor& x, int64_t seed, at::ArrayRef<double> ps, int64_t copies) {
  check_dropout_input(x, "dropout_copies", "x");
  DropoutCall call{dropout_plan(seed, ps, copies, "dropout_copies"), x.contiguous(), {}, x.numel()};
  std::vector<int64_t> shape{copies};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  call.out = at::empty(shape, x.options());
  return call;
}

// dropout_sum: g (copies, ...) -> out g.shape[1:] in g's dtype.
inline DropoutCall dropout_sum_call(const at::Tensor& g, int64_t seed, at::ArrayRef<double> ps) {
  check_dropout_input(g, "dropout_sum", "g");
  TORCH_CHECK(g.dim() >= 1, "dropout_sum: g must be (copies, ...), got a 0-d tensor");
  DropoutCall call{dropout_plan(seed, ps, g.size(0), "dropout_sum"), g.contiguous(), {}, 0};
  call.out = at::empty(g.sizes().slice(1), g.options());
  call.n = call.out.numel();
  return call;
}

}  // namespace minqlora
