// CPU kernels of the counter-based dropout ops. Implements:
//   dropout_copies -> dropout.dropout_copies_ref   (copies, *x.shape): x ⊙ keep_c, the same bits
//   dropout_sum    -> dropout.dropout_sum_ref      Σ_c g[c] ⊙ keep_c, summed in float32 in copy order
// One at::parallel_for over elements; the mask is dropout_math.h's, shared with the CUDA kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../dropout_checks.h"

namespace minqlora {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task: ~10 µs of work, against ~µs of task overhead
constexpr int64_t kTile = 256;       // masks computed a tile at a time, in a loop the compiler vectorizes

// keep[j] = dropout_keep(plan, start + j, thr) for j < len, where start .. start + len - 1 share their high word:
// the same bits in uint32 arithmetic alone (no 64-bit index or compare per element), a loop the compiler vectorizes.
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline void keep_tile_body(const DropoutPlan& plan, uint64_t start, int64_t len, uint64_t thr, float* keep) {
  if (thr > 0xFFFFFFFFull) {  // p rounds to 1 at 2⁻³²: nothing kept
    std::fill(keep, keep + len, 0.0f);
    return;
  }
  const uint32_t lo = static_cast<uint32_t>(start), hk = static_cast<uint32_t>(start >> 32) ^ plan.k2;
  const uint32_t t = static_cast<uint32_t>(thr);
  for (int64_t j = 0; j < len; ++j) keep[j] = mix32(mix32((lo + static_cast<uint32_t>(j)) ^ plan.k1) + hk) >= t;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// setup.py passes no -march (the extension loads on any x86-64), so the portable loop is SSE2, which has no 32-bit
// vector multiply; with AVX2's (vpmulld) the same loop runs about 2× faster (checked at run time).
__attribute__((target("avx2"))) void keep_tile_avx2(const DropoutPlan& plan, uint64_t start, int64_t len,
                                                    uint64_t thr, float* keep) {
  keep_tile_body(plan, start, len, thr, keep);
}
void keep_tile(const DropoutPlan& plan, uint64_t start, int64_t len, uint64_t thr, float* keep) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    keep_tile_avx2(plan, start, len, thr, keep);
  } else {
    keep_tile_body(plan, start, len, thr, keep);
  }
}
#else
void keep_tile(const DropoutPlan& plan, uint64_t start, int64_t len, uint64_t thr, float* keep) {
  keep_tile_body(plan, start, len, thr, keep);
}
#endif

// Calls f(i, len, keep) over [i0, i1) in tiles for copy c, keep[j] the mask of element i + j.
template <typename F>
void for_each_tile(const DropoutPlan& plan, int64_t c, int64_t n, int64_t i0, int64_t i1, F&& f) {
  float keep[kTile];
  const uint64_t base = static_cast<uint64_t>(c) * n;
  for (int64_t i = i0; i < i1;) {
    const uint64_t start = base + i;
    const int64_t to_wrap = static_cast<int64_t>((uint64_t(1) << 32) - (start & 0xFFFFFFFFull));
    const int64_t len = std::min<int64_t>({kTile, i1 - i, to_wrap});
    keep_tile(plan, start, len, plan.threshold[c], keep);
    f(i, len, keep);
    i += len;
  }
}

at::Tensor dropout_copies_cpu(const at::Tensor& x_in, int64_t seed, at::ArrayRef<double> ps, int64_t copies) {
  const DropoutCall call = dropout_copies_call(x_in, seed, ps, copies);
  const DropoutPlan& plan = call.plan;
  const at::Tensor &x = call.in, &out = call.out;
  const int64_t n = call.n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_copies_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t c = 0; c < copies; ++c) {
        scalar_t* oc = op + c * n;
        for_each_tile(plan, c, n, i0, i1, [&](int64_t i, int64_t len, const float* keep) {
          for (int64_t j = 0; j < len; ++j)  // x·0 where dropped (±0), as the spec's multiply
            oc[i + j] = static_cast<scalar_t>(static_cast<float>(xp[i + j]) * keep[j]);
        });
      }
    });
  });
  return out;
}

at::Tensor dropout_sum_cpu(const at::Tensor& g_in, int64_t seed, at::ArrayRef<double> ps) {
  const DropoutCall call = dropout_sum_call(g_in, seed, ps);
  const DropoutPlan& plan = call.plan;
  const at::Tensor &g = call.in, &out = call.out;
  const int64_t n = call.n, copies = plan.copies;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dropout_sum_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      std::vector<float> acc(i1 - i0, 0.0f);  // float32 sums in copy order, as the spec
      for (int64_t c = 0; c < copies; ++c) {
        const scalar_t* gc = gp + c * n;
        for_each_tile(plan, c, n, i0, i1, [&](int64_t i, int64_t len, const float* keep) {
          float* a = acc.data() + (i - i0);
          for (int64_t j = 0; j < len; ++j) a[j] += static_cast<float>(gc[i + j]) * keep[j];
        });
      }
      for (int64_t i = i0; i < i1; ++i) op[i] = static_cast<scalar_t>(acc[i - i0]);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CPU, m) {
  m.impl("dropout_copies", &dropout_copies_cpu);
  m.impl("dropout_sum", &dropout_sum_cpu);
}

}  // namespace minqlora
