// AVX-512 block kernels behind csrc/cpu/quant.cpp: the same quant.py functions, the same bytes. Included only by
// quant.cpp, which calls them for whole blocks when the CPU has AVX512F+BW+VL (checked at run time) and keeps its
// portable scalar loops for everything else (other CPUs, the partial last block, a NaN block's absmax).
//
// Why a separate path: the portable loops compile to SSE2 (setup.py passes no -march), and at 4096x4096 bf16 they
// quantized in ~127 ms and dequantized NF4+DQ in ~13.6 ms, against bitsandbytes' 0.38 s and 9.6 ms
// (DESIGN.md §9 asks for >= 5x and >= 1x). Functions carry __attribute__((target)) instead of a global -mavx512f so
// the extension still loads on any x86-64.
//
// Exactness (every value must round like the reference): only IEEE multiplies and divides, never FMA; compares
// are ordered-quiet (NaN compares false, as the scalar `s > t` does); float->bf16/fp16 conversions reproduce
// c10::BFloat16(float) and c10::Half(float) bit for bit, NaN included (the hardware instructions differ there:
// vcvtneps2bf16 flushes denormals, vcvtps2ph keeps NaN payloads).
//
// Leaves out: partial blocks, argument checks, threading (all in quant.cpp).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MQ_HAVE_AVX512 1

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common.h"

#define MQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace minqlora {
namespace avx512 {

// The CPU and the OS (zmm state saved) support everything these kernels use.
inline bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// ---- loads: 16 consecutive inputs as float32 (exact widening, like static_cast<float>) ----

MQ_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MQ_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MQ_AVX512 inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// 32 consecutive inputs as two float vectors, in the order pack32() below expects. For bf16 they are the even and
// the odd elements: one 512-bit load holds 16 (even, odd) pairs, and a shift or a mask widens each half for free,
// without the cross-lane vpmovzxwd (the quantize loop is limited by the shuffle port). Otherwise elements 0..15
// and 16..31.
struct Pair {
  __m512 a, b;
};
template <typename T>
MQ_AVX512 inline Pair load32(const T* p) {
  return {load16(p), load16(p + 16)};
}
MQ_AVX512 inline Pair load32(const c10::BFloat16* p) {
  const __m512i w = _mm512_loadu_si512(p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}

// ---- float32 -> 16-bit, rounded exactly as the c10 scalar constructors round ----

// c10::detail::round_to_nearest_even: add 0x7FFF plus the lowest kept bit, truncate; NaN -> 0x7FC0.
MQ_AVX512 inline __m256i to_bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// c10::detail::fp16_ieee_from_fp32_value is IEEE round-to-nearest-even, which vcvtps2ph does too, except for NaN:
// c10 gives sign | 0x7E00 where the instruction keeps payload bits.
MQ_AVX512 inline __m256i to_fp16_bits(__m512 v) {
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i sign = _mm512_srli_epi32(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)), 16);
  const __m256i nan = _mm512_cvtepi32_epi16(_mm512_or_si512(sign, _mm512_set1_epi32(0x7E00)));
  return _mm256_mask_mov_epi16(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
}

MQ_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
MQ_AVX512 inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_fp16_bits(v));
}
MQ_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v));
}

// ---- blockwise scaling (quant._absmax, quant._scale) ----

// max |x| over len elements (len a multiple of 32). vmaxps drops NaN, so NaN is tracked separately and such a
// block takes the scalar absmax_step loop, which decides which NaN is kept exactly as the portable path does.
template <typename T>
MQ_AVX512 inline float block_absmax(const T* x, int64_t len) {
  __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();  // two accumulators hide vmaxps latency
  __mmask16 nan = 0;
  for (int64_t i = 0; i < len; i += 32) {
    const auto [v0, v1] = load32(x + i);
    nan |= _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(v0));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(v1));
  }
  if (nan == 0) return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  float m = 0.0f;
  for (int64_t i = 0; i < len; ++i) m = absmax_step(m, static_cast<float>(x[i]));
  return m;
}

// scale_value() for a block whose absmax is nonzero (the caller handles absmax == 0): x * (1/absmax), or
// x / absmax when 1/absmax overflows.
struct Scaler {
  __m512 absmax, inv;
  bool divide;
  MQ_AVX512 explicit Scaler(float a) {
    const float r = 1.0f / a;
    absmax = _mm512_set1_ps(a);
    inv = _mm512_set1_ps(r);
    divide = r > FLT_MAX;
  }
  MQ_AVX512 __m512 operator()(__m512 x) const { return divide ? _mm512_div_ps(x, absmax) : _mm512_mul_ps(x, inv); }
};

// ---- counting thresholds below s: a branch-free binary search in one zmm ----

// For 15 sorted thresholds t_0..t_14, code = #{k : s > t_k} in four steps: compare with t_7, then with t_{c+3},
// t_{c+1}, t_c for the code c found so far. The tables are t shifted by 3, 1 and 0 so that each step is one
// vpermps; entries past t_14 are never read. NaN compares false everywhere, giving 0 like the scalar count.
struct Search16 {
  __m512 mid, t3, t1, t0;
  MQ_AVX512 explicit Search16(const std::array<float, 15>& t) {
    float s3[16], s1[16], s0[16];
    for (int i = 0; i < 16; ++i) {
      s3[i] = t[std::min(i + 3, 14)];
      s1[i] = t[std::min(i + 1, 14)];
      s0[i] = t[std::min(i, 14)];
    }
    mid = _mm512_set1_ps(t[7]);
    t3 = _mm512_loadu_ps(s3);
    t1 = _mm512_loadu_ps(s1);
    t0 = _mm512_loadu_ps(s0);
  }
  MQ_AVX512 __m512i operator()(__m512 s) const {
    __m512i c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(s, mid, _CMP_GT_OQ), _mm512_set1_epi32(8));
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(c, t3), _CMP_GT_OQ), c,
                              _mm512_set1_epi32(4));
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(c, t1), _CMP_GT_OQ), c,
                              _mm512_set1_epi32(2));
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(c, t0), _CMP_GT_OQ), c,
                              _mm512_set1_epi32(1));
    return c;
  }
};

// quant.encode_4bit, FP4: rank r = #{i : |s| > t_i} over 7 thresholds (three search steps), the 3-bit pattern
// FP4_RANK_TO_BITS[r], and bit 3 when s < 0 (-0.0 and NaN are not). |s| by clearing the sign gives the same
// compares as the scalar s < 0 ? -s : s.
struct EncodeFP4 {
  __m512 mid, t1, t0;
  __m512i rank_bits;
  MQ_AVX512 EncodeFP4() {
    const float t[7] = MQ_FP4_THRESHOLDS;
    const int bits[8] = MQ_FP4_RANK_TO_BITS;
    float s1[16], s0[16];
    int b[16];
    for (int i = 0; i < 16; ++i) {
      s1[i] = t[std::min(i + 1, 6)];
      s0[i] = t[std::min(i, 6)];
      b[i] = bits[i & 7];
    }
    mid = _mm512_set1_ps(t[3]);
    t1 = _mm512_loadu_ps(s1);
    t0 = _mm512_loadu_ps(s0);
    rank_bits = _mm512_loadu_si512(b);
  }
  MQ_AVX512 __m512i operator()(__m512 s) const {
    const __m512 a = _mm512_abs_ps(s);
    __m512i r = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(a, mid, _CMP_GT_OQ), _mm512_set1_epi32(4));
    r = _mm512_mask_add_epi32(r, _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(r, t1), _CMP_GT_OQ), r,
                              _mm512_set1_epi32(2));
    r = _mm512_mask_add_epi32(r, _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(r, t0), _CMP_GT_OQ), r,
                              _mm512_set1_epi32(1));
    const __m512i bits = _mm512_permutexvar_epi32(r, rank_bits);
    const __mmask16 neg = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_or_epi32(bits, neg, bits, _mm512_set1_epi32(8));
  }
};

struct EncodeNF4 {
  Search16 search;
  MQ_AVX512 EncodeNF4()
      : search({kNF4T0, kNF4T1, kNF4T2, kNF4T3, kNF4T4, kNF4T5, kNF4T6, kNF4T7, kNF4T8, kNF4T9, kNF4T10, kNF4T11,
                kNF4T12, kNF4T13, kNF4T14}) {}
  MQ_AVX512 __m512i operator()(__m512 s) const { return search(s); }
};

// quant.pack_nibbles for 16 codes (one per 32-bit lane) -> 8 bytes: lanes 2j and 2j+1 share a 64-bit lane, whose
// low byte becomes c[2j] << 4 | c[2j+1].
MQ_AVX512 inline void store_nibbles(uint8_t* dst, __m512i c) {
  const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi64_epi8(pairs));
}

// The 16 bytes of 32 codes computed from load32()'s two vectors.
template <typename T>
MQ_AVX512 inline void pack32(const T*, uint8_t* dst, __m512i ca, __m512i cb) {
  store_nibbles(dst, ca);
  store_nibbles(dst + 8, cb);
}
MQ_AVX512 inline void pack32(const c10::BFloat16*, uint8_t* dst, __m512i even, __m512i odd) {
  const __m512i bytes = _mm512_or_si512(_mm512_slli_epi32(even, 4), odd);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(bytes));
}

// ---- quant.quantize_4bit_ref, whole blocks [b0, b1) ----

// kBlock, when nonzero, is the blocksize as a compile-time constant: fixed trip counts let the compiler unroll the
// per-block loops, ~25% faster at blocksize 64 (quant.cpp instantiates it for the small blocksizes).
template <typename T, typename Encode, int64_t kBlock = 0>
MQ_AVX512 void quantize_4bit_blocks(const T* x, int64_t b0, int64_t b1, int64_t blocksize, uint8_t zero_code,
                                    float* am, uint8_t* out) {
  const int64_t bs = kBlock != 0 ? kBlock : blocksize;
  const Encode encode;
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = x + b * bs;
    uint8_t* ob = out + b * bs / 2;
    const float a = am[b] = block_absmax(xb, bs);
    if (a == 0.0f) {  // all-zero block: scale_value gives 0 everywhere, i.e. the code of zero
      std::memset(ob, zero_code * 0x11, bs / 2);
      continue;
    }
    const Scaler scale(a);
    for (int64_t i = 0; i < bs; i += 32) {
      const auto [v0, v1] = load32(xb + i);
      pack32(xb, ob + i / 2, encode(scale(v0)), encode(scale(v1)));
    }
  }
}

// ---- quant.dequantize_4bit_ref (after decode_absmax_ref), whole blocks [b0, b1) ----

// One block's 16 possible outputs are table * absmax (16 products, rounded once to T). Each step expands 16 packed
// bytes into 32 outputs with table permutes. kBlock as for quantize_4bit_blocks.
template <int64_t kBlock = 0, typename T, typename BlockScale>
MQ_AVX512 void dequantize_4bit_blocks(const uint8_t* in, T* out, int64_t b0, int64_t b1, int64_t blocksize,
                                      const float* table, const BlockScale& block_scale) {
  const int64_t bs = kBlock != 0 ? kBlock : blocksize;
  const __m512 tab = _mm512_loadu_ps(table);
  // 32-bit output: even outputs (high nibbles) and odd outputs (low nibbles) interleaved by two vpermt2ps.
  const __m512i lo_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 v = _mm512_mul_ps(tab, _mm512_set1_ps(block_scale(b)));
    const uint8_t* src = in + b * bs / 2;
    T* dst = out + b * bs;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t j = 0; j < bs / 2; j += 16) {
        const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), v);  // vpermps reads index bits 0..3
        const __m512 lo = _mm512_permutexvar_ps(w, v);
        _mm512_storeu_ps(dst + 2 * j, _mm512_permutex2var_ps(hi, lo_half, lo));
        _mm512_storeu_ps(dst + 2 * j + 16, _mm512_permutex2var_ps(hi, hi_half, lo));
      }
    } else {
      // 16-bit output: the 16 values twice (vpermw reads 5 index bits), and each 32-bit lane holding byte w
      // becomes the index pair (w >> 4, w): the low word picks the high nibble's value, the high word the low one.
      const __m256i lut = std::is_same_v<T, c10::BFloat16> ? to_bf16_bits(v) : to_fp16_bits(v);
      const __m512i lut2 = _mm512_inserti64x4(_mm512_castsi256_si512(lut), lut, 1);
      for (int64_t j = 0; j < bs / 2; j += 16) {
        const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(w, 4), _mm512_slli_epi32(w, 16));
        _mm512_storeu_si512(dst + 2 * j, _mm512_permutexvar_epi16(idx, lut2));
      }
    }
  }
}

// ---- quant.quantize_blockwise_8bit_ref, whole blocks [b0, b1) ----

// code = #{k : s > mid_k} over 255 sorted midpoints, in two stages: the group g = #{i : s > mid_{16i+15}} (a
// Search16 over every 16th midpoint), then the 15 midpoints mid_{16g..16g+14} inside the group, counted with a
// permute and a compare each from tables row[j][g] = mid_{16g+j}. Sortedness makes the sum exact: every midpoint
// before the group is below s, mid_{16g+15} and everything after it is not.
struct Encode8 {
  Search16 group;
  __m512 row[15];
  static std::array<float, 15> every_16th(const float* mid) {
    std::array<float, 15> c;
    for (int i = 0; i < 15; ++i) c[i] = mid[16 * i + 15];
    return c;
  }
  MQ_AVX512 explicit Encode8(const float* mid) : group(every_16th(mid)) {
    for (int j = 0; j < 15; ++j) {
      float r[16];
      for (int g = 0; g < 16; ++g) r[g] = mid[16 * g + j];  // 16 * 15 + 14 = 254, the last midpoint
      row[j] = _mm512_loadu_ps(r);
    }
  }
  MQ_AVX512 __m512i operator()(__m512 s) const {
    const __m512i g = group(s);
    __m512i c = _mm512_slli_epi32(g, 4);
    for (int j = 0; j < 15; ++j)
      c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(g, row[j]), _CMP_GT_OQ), c,
                                _mm512_set1_epi32(1));
    return c;
  }
};

template <typename T>
MQ_AVX512 void quantize_8bit_blocks(const T* x, int64_t b0, int64_t b1, int64_t bs, const float* mid, float* am,
                                    uint8_t* out) {
  const Encode8 encode(mid);
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = x + b * bs;
    uint8_t* ob = out + b * bs;
    const float a = am[b] = block_absmax(xb, bs);
    const Scaler scale(a);
    const bool zero = a == 0.0f;  // scale_value: an all-zero block scales to 0
    for (int64_t i = 0; i < bs; i += 16) {
      const __m512 s = zero ? _mm512_setzero_ps() : scale(load16(xb + i));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ob + i), _mm512_cvtepi32_epi8(encode(s)));
    }
  }
}

// ---- quant.dequantize_blockwise_8bit_ref, whole blocks [b0, b1): map[code] * absmax, rounded once ----

template <typename T>
MQ_AVX512 void dequantize_8bit_blocks(const uint8_t* codes, const float* am, const float* map, T* out, int64_t b0,
                                      int64_t b1, int64_t bs) {
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 a = _mm512_set1_ps(am[b]);
    for (int64_t i = b * bs; i < (b + 1) * bs; i += 16) {
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      store16(out + i, _mm512_mul_ps(_mm512_i32gather_ps(c, map, 4), a));
    }
  }
}

}  // namespace avx512
}  // namespace minqlora

#endif  // x86-64 with GCC or Clang
