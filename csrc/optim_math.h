// The arithmetic of one AdamW element and of 8-bit state codes, shared by the CPU kernels (cpu/optim.cpp) and the
// CUDA kernels (cuda/optim_kernels.cuh). It needs no torch and no CUDA headers, so the CUDA part compiles with a
// bare nvcc. It leaves out argument checks (optim_checks.h), loops and launches (the kernel files).
//
// Specification: minqlora/optim.py, adamw_step_ref and adamw_step_8bit_ref. Every line below is one float32
// operation in the order the reference performs it; with no fused multiply-add (-ffp-contract=off, --fmad=false)
// the CPU kernel, the CUDA kernel and the reference agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MQ_OPT_HD __host__ __device__ __forceinline__
#else
#define MQ_OPT_HD inline
#endif

namespace minqlora {

// Blockwise 8-bit state: one float32 absmax per 256 elements (bitsandbytes' 8-bit Adam, bnb-format.md §5).
constexpr int kStateBlock = 256;

// The per-step scalars, computed on the host in double and rounded once to float32 (optim.adamw_scalars).
struct AdamScalars {
  float beta1, one_minus_beta1;  // β1, 1−β1
  float beta2, one_minus_beta2;  // β2, 1−β2
  float decay;                   // 1 − lr·wd (decoupled weight decay)
  float step_size;               // lr · sqrt(1−β2^t) / (1−β1^t)
  float eps_hat;                 // eps · sqrt(1−β2^t)
};

inline AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                int64_t step) {
  const double c1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double c2 = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  AdamScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.step_size = static_cast<float>(lr * c2 / c1);
  s.eps_hat = static_cast<float>(eps * c2);
  return s;
}

// One AdamW element, in float32. A non-finite gradient (g − g is 0 exactly when g is finite) zeroes m and v and
// leaves p alone, as bitsandbytes' 8-bit kernel does; returns whether p changed. Decay comes first, as in
// torch.optim.AdamW and the AdamW paper (Loshchilov & Hutter, Alg. 2): p ← p·(1 − lr·wd) − step_size·m/(√v + ε̂).
MQ_OPT_HD bool adamw_element(float& p, float g, float& m, float& v, const AdamScalars& s) {
  if (!((g - g) == 0.0f)) {
    m = 0.0f;
    v = 0.0f;
    return false;
  }
  m = m * s.beta1 + g * s.one_minus_beta1;
  v = v * s.beta2 + (g * g) * s.one_minus_beta2;
  const float denom = sqrtf(v) + s.eps_hat;
  p = p * s.decay - s.step_size * (m / denom);
  return true;
}

// max(acc, |x|) that propagates NaN; the same rule as common.h's absmax_step (that header needs torch).
MQ_OPT_HD float state_absmax_step(float acc, float x) {
  const float a = x < 0.0f ? -x : x;
  return (a > acc || a != a) ? a : acc;
}

// s = x · (1/absmax), with an all-zero block scaling to 0 and a denormal absmax (1/absmax overflows) dividing
// instead: quant._scale, the same rule as common.h's scale_value.
MQ_OPT_HD float state_scale(float x, float absmax, float inv) {
  if (absmax == 0.0f) return 0.0f;
  if (inv > 3.402823466e38f) return x / absmax;
  return x * inv;
}

// Nearest entry of a sorted 256-entry map given its 255 float32 midpoints mid[k] = (map[k] + map[k+1]) · 0.5:
// code = #{k : s > mid[k]}, ties to the lower code, as torch.bucketize in quant.quantize_blockwise_8bit_ref.
// A branch-free binary search: 8 compares, and never reads past mid[254].
MQ_OPT_HD uint8_t nearest_code(const float* mid, float s) {
  int idx = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int step = 128; step > 0; step >>= 1) idx += (s > mid[idx + step - 1]) ? step : 0;
  return static_cast<uint8_t>(idx);
}

}  // namespace minqlora
