// The counter-based dropout mask, shared by the CPU kernels (cpu/dropout.cpp) and the CUDA kernels
// (cuda/dropout_kernels.cuh): the same bits as minqlora/dropout.py (hash_bits, keep_mask), in uint32 arithmetic.
// No torch and no CUDA headers, so the CUDA part compiles with a bare nvcc.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MQ_DROP_HD __host__ __device__ __forceinline__
#else
#define MQ_DROP_HD inline
#endif

namespace minqlora {

constexpr int kMaxDropoutCopies = 8;  // copies per call: a LoRA group has at most 3 members (q, k, v)

// lowbias32 (dropout.mix32).
MQ_DROP_HD uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7FEB352Du;
  v ^= v >> 15;
  v *= 0x846CA68Bu;
  return v ^ (v >> 16);
}

// A seed's keys and the per-copy thresholds (dropout.keys, dropout.threshold): everything a kernel needs.
struct DropoutPlan {
  uint32_t k1, k2;
  uint64_t threshold[kMaxDropoutCopies];  // round(p·2³²): up to 2³² (drop all), hence 64 bits
  int64_t copies;
};

// 1 where element `index` (c·numel + i) of copy c is kept, else 0; threshold = plan.threshold[c].
MQ_DROP_HD float dropout_keep(const DropoutPlan& plan, uint64_t index, uint64_t threshold) {
  const uint32_t lo = static_cast<uint32_t>(index), hi = static_cast<uint32_t>(index >> 32);
  const uint32_t h = mix32(mix32(lo ^ plan.k1) + (hi ^ plan.k2));
  return static_cast<uint64_t>(h) >= threshold ? 1.0f : 0.0f;
}

}  // namespace minqlora
