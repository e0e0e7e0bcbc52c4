// AVX2 + FMA (+ F16C) inner loop of the CPU few-row gemm_4bit (gemv.cpp), for CPUs that have them (checked once
// at run time; functions carry __attribute__((target)) so the extension still loads on any x86-64). Same math as
// gemv.cpp's portable loop: per weight row and block, the block's 16 possible values (rounded to x's dtype) are
// looked up by nibble, here 8 at a time with two in-register permutes (vpermps: the low 3 bits of each index pick
// one of 8 floats) and a blend on the index's bit 3, then multiplied into 8-wide float32 sums per row of x. The
// portable loop spends about 1 ns a weight on its scalar lookups on the 2-core AVX2 workstation; this one about a
// third of that. Sums: FMA, 8 lanes, the same lane order as the portable loop but fused multiply-adds, so the two
// paths agree to float32 rounding, not bit for bit (and neither is bit for bit the composite dequantize + matmul).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MQ_HAVE_AVX2 1

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace minqlora {
namespace avx2 {

inline bool supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// v rounded to T and back, as static_cast<float>(static_cast<T>(v)) for finite v (c10's conversions round to
// nearest even; they differ from these only in NaN payloads): the scalar conversions of a block's 16 values cost
// about as much as decoding the block (bf16 x took 1.7x float32's time before this).
template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline __m256 round_to(__m256 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(int(0xFFFF0000u))));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}

// A block's 16 possible weights, table · a rounded to T (gemv.cpp's block_lut), as two vectors of 8.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline void block_lut(const float* table, float a, __m256& lo,
                                                               __m256& hi) {
  const __m256 s = _mm256_set1_ps(a);
  lo = round_to<T>(_mm256_mul_ps(_mm256_loadu_ps(table), s));
  hi = round_to<T>(_mm256_mul_ps(_mm256_loadu_ps(table + 8), s));
}

// 16 weights (8 packed bytes at src, element 2j in byte j's high nibble) as two vectors of 8 floats from lut.
__attribute__((target("avx2,fma"))) inline void decode16(const uint8_t* src, __m256 lut_lo, __m256 lut_hi,
                                                         __m256& w0, __m256& w1) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), lo = _mm_and_si128(bytes, nib);
  const __m128i idx = _mm_unpacklo_epi8(hi, lo);  // hi0 lo0 hi1 lo1 ... : element order
  const __m256i i0 = _mm256_cvtepu8_epi32(idx), i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(idx, 8));
  // vpermps uses each index's low 3 bits; bit 3 (moved to the sign bit) picks the upper half of the table
  w0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, i0), _mm256_permutevar8x32_ps(lut_hi, i0),
                        _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
  w1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, i1), _mm256_permutevar8x32_ps(lut_hi, i1),
                        _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
}

// acc[m] (8 partial sums each) += block · x[m, k0 : k0 + blocksize] for m < M; lut_lo / lut_hi: the block's 16
// values; w: its blocksize / 2 bytes; blocksize a multiple of 16.
__attribute__((target("avx2,fma"))) inline void block_dot(__m256 lut_lo, __m256 lut_hi, const uint8_t* w,
                                                          const float* x, int64_t K, int64_t k0, int64_t blocksize,
                                                          int64_t M, __m256* acc) {
  for (int64_t j = 0; j < blocksize; j += 16) {
    __m256 w0, w1;
    decode16(w + j / 2, lut_lo, lut_hi, w0, w1);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K + k0 + j;
      acc[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m]);
      acc[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m]);
    }
  }
}

// The 8 partial sums in the portable loop's pairwise order.
__attribute__((target("avx2,fma"))) inline float reduce8(__m256 v) {
  alignas(32) float a[8];
  _mm256_store_ps(a, v);
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

}  // namespace avx2
}  // namespace minqlora

#endif
