// CUDA kernels for blockwise quantization, byte for byte the reference in minqlora/quant.py:
//   quantize_4bit_kernel             -> quant.quantize_4bit_ref
//   dequantize_4bit_kernel           -> quant.dequantize_ref (double-quantized scales decoded in the kernel)
//   quantize_blockwise_8bit_kernel   -> quant.quantize_blockwise_8bit_ref
//   dequantize_blockwise_8bit_kernel -> quant.dequantize_blockwise_8bit_ref
// Only CUDA headers and ../common.h (the shared encode rules) are used here; the launchers are in quant.cu, the
// torch side (checks, allocation, stream) in quant_ops.cpp. Arithmetic is float32 with explicit round-to-nearest intrinsics (__frcp_rn, __fmul_rn, __fadd_rn), so
// the bytes match the reference whatever the fast-math flags; setup.py also passes --fmad=false.
//
// The 4-bit ops move 2.5 bytes per bf16 element, nearly all of it the 16-bit side, so both kernels are laid out
// around that side: every warp reads or writes the 16-bit tensor as 512 contiguous bytes per instruction (16 bytes
// per lane), and the packed side follows (4 bytes per lane, 128 contiguous bytes per warp instruction). Each
// thread issues all K of its loads before it uses any, so K x 16 bytes per thread are in flight.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../common.h"

namespace minqlora {
namespace cuda {

constexpr int kThreads = 256;  // threads per CTA for every kernel here
constexpr int kWarps = kThreads / 32;
constexpr int kQuantTile = 4096;  // elements per quantize tile: the largest blocksize, so blocks never straddle tiles

__constant__ float kCodeTables[2][16] = {MQ_NF4_TABLE, MQ_FP4_TABLE};  // indexed by QuantType

// ---- element conversions: T <-> float32, 16 bytes at a time ---------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// word w (0..3) of a 16-byte vector; w is a compile-time constant after unrolling, so this stays in registers
__device__ __forceinline__ uint32_t word_of(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// element i of 16 bytes of T, as float32 (exact)
template <typename T>
__device__ __forceinline__ float elem(const uint4& v, int i) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(word_of(v, i));
  } else {
    const uint16_t bits = uint16_t(word_of(v, i / 2) >> (16 * (i % 2)));
    if constexpr (std::is_same<T, __half>::value) return __half2float(__ushort_as_half(bits));
    else return __uint_as_float(uint32_t(bits) << 16);  // bf16 is the top half of a float32
  }
}

// 16 bytes of T starting at x[e0], elements at or past n read as +0 (the tail of the last tile)
template <typename T>
__device__ __forceinline__ uint4 load_tail(const T* x, int64_t e0, int64_t n) {
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < int(16 / sizeof(T)); ++i) {
    if (e0 + i >= n) break;
    if constexpr (sizeof(T) == 4) w[i] = reinterpret_cast<const uint32_t*>(x)[e0 + i];
    else w[i / 2] |= uint32_t(reinterpret_cast<const uint16_t*>(x)[e0 + i]) << (16 * (i % 2));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// 16 / sizeof(T) floats -> 16 bytes of T, each rounded once to nearest even (what torch's .to(dtype) does)
__device__ __forceinline__ uint32_t pack2(float a, float b, __half*) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16*) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <typename T>
__device__ __forceinline__ uint4 pack16(const float* v) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  } else {
    T* tag = nullptr;
    return make_uint4(pack2(v[0], v[1], tag), pack2(v[2], v[3], tag), pack2(v[4], v[5], tag),
                      pack2(v[6], v[7], tag));
  }
}

__device__ __forceinline__ void store_one(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_one(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_one(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// max that returns NaN if either side is NaN (absmax_step's rule), one instruction on sm_80+
__device__ __forceinline__ float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (b > a || b != b) ? b : a;
#endif
}

// max |x| over the 16 bytes of one chunk, NaN-propagating, exact. 16-bit types: clear the sign bits of two
// elements at once and take a paired max (HMNMX2), one instruction per element instead of absmax_step's three.
// +0 results (never -0), as the reference's abs().amax().
__device__ __forceinline__ float chunk_absmax(const uint4& raw, float*) {
  return nan_max(nan_max(fabsf(__uint_as_float(raw.x)), fabsf(__uint_as_float(raw.y))),
                 nan_max(fabsf(__uint_as_float(raw.z)), fabsf(__uint_as_float(raw.w))));
}
template <typename T2>
__device__ __forceinline__ T2 abs2(uint32_t bits) {
  const uint32_t b = bits & 0x7fff7fffu;
  return *reinterpret_cast<const T2*>(&b);
}
template <typename T2>
__device__ __forceinline__ float chunk_absmax16(const uint4& raw) {
  const T2 m = __hmax2_nan(__hmax2_nan(abs2<T2>(raw.x), abs2<T2>(raw.y)),
                           __hmax2_nan(abs2<T2>(raw.z), abs2<T2>(raw.w)));
  return nan_max(to_float(m.x), to_float(m.y));
}
__device__ __forceinline__ float chunk_absmax(const uint4& raw, __half*) { return chunk_absmax16<__half2>(raw); }
__device__ __forceinline__ float chunk_absmax(const uint4& raw, __nv_bfloat16*) {
  return chunk_absmax16<__nv_bfloat162>(raw);
}

// NF4 encode by table lookup, the same function as encode_nf4_tree (common.h) with one compare instead of four.
// Bin k = round(16 s + 16) splits [-1, 1] into 33 bins of width 1/16. The NF4 thresholds are at least 0.0805
// apart, so a bin holds at most one; none lies within 0.004 of a bin edge, so a value rounded into the
// neighbouring bin still gets the same count. bins[k] = {first threshold at or above the bin's lower edge (+inf if
// none), number of thresholds below that edge}, and code = base + (s > thr). One FMA puts k in the low mantissa bits
// (the 1.5 * 2^23 trick). NaN (bits & 63 = 63) reads an entry {+inf, 0}: code 0, as the tree gives.
// Checked when written against the count rule on every float32 in [-1.01, 1.01] (2.1e9 values, none differ);
// tests/cuda re-checks every float32 near each threshold and every bf16/fp16 value against the reference.
struct Nf4Bin {
  float thr;
  uint32_t base;
};
constexpr int kNf4Bins = 64;

__device__ __forceinline__ void init_nf4_bins(Nf4Bin* bins) {
  const int k = threadIdx.x;  // kThreads >= kNf4Bins
  if (k >= kNf4Bins) return;
  const float t[15] = {kNF4T0, kNF4T1, kNF4T2,  kNF4T3,  kNF4T4,  kNF4T5,  kNF4T6, kNF4T7,
                       kNF4T8, kNF4T9, kNF4T10, kNF4T11, kNF4T12, kNF4T13, kNF4T14};
  const float lo = (k - 0.5f) / 16.0f - 1.0f;  // exact
  Nf4Bin b{__int_as_float(0x7f800000), 0};
#pragma unroll
  for (int i = 14; i >= 0; --i) {
    if (t[i] < lo) ++b.base;
    else b.thr = t[i];
  }
  if (k > 32) b = Nf4Bin{__int_as_float(0x7f800000), 0};  // only NaN lands here
  bins[k] = b;
}

__device__ __forceinline__ uint32_t encode_nf4_bins(float s, const Nf4Bin* bins) {
  const float f = __fmaf_rn(s, 16.0f, 12582928.0f);  // 1.5 * 2^23 + 16: exact 16 s + 16, rounded to an integer
  const Nf4Bin b = bins[__float_as_uint(f) & (kNf4Bins - 1)];
  return b.base + (s > b.thr ? 1u : 0u);
}

// Packed 4-bit unit read per 16 output bytes: 8 nibbles (uint32) for 16-bit T, 4 nibbles (uint16) for float32.
template <typename T>
using PackedUnit = typename std::conditional<sizeof(T) == 2, uint32_t, uint16_t>::type;

// ---------------------------------------------------------------------------------------------------------------
// quant.quantize_4bit_ref. The input is cut into tiles of kThreads * K chunks of V = 16/sizeof(T) elements (4096
// elements); chunk c = k * kThreads + threadIdx.x, so a warp's k-th load covers 32 consecutive chunks (512 bytes).
// A quant block of `blocksize` elements is blocksize / V consecutive chunks: up to 32 of them share a warp (reduced
// with shuffles), more span whole warps (reduced through shared memory). A tile is a multiple of every blocksize,
// so blocks never straddle tiles.
//
// The grid is persistent (as many CTAs as fit at once) and software-pipelined: a CTA loads tile i+1 into registers
// before it encodes tile i, so every thread always has K x 16 bytes in flight. Measured on H200 for a 14336x4096
// bf16 weight: one tile per CTA 77 µs; pipelined 76.5 µs; pipelined with the scale's edge cases decided per block
// instead of per element (encode_chunk) 57 µs, 62% of copy bandwidth. The encode is the limit, not latency.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, int K>
__device__ __forceinline__ void load_tile(uint4 (&raw)[K], const T* __restrict__ x, int64_t tile0, int64_t n) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t e0 = tile0 + int64_t(k * kThreads + threadIdx.x) * V;
    if (e0 + V <= n) raw[k] = __ldcs(reinterpret_cast<const uint4*>(x + e0));
    else raw[k] = load_tail(x, e0, n);  // elements past n read as +0, which never raises an absmax
  }
}

// The 4-bit codes of one chunk packed into its bytes (element 2j in the high nibble of byte j, byte j in bits
// 8j..8j+7): s = x * scale, or x / scale when kDivide.
template <typename T, int QT, bool kDivide>
__device__ __forceinline__ uint32_t encode_chunk(const uint4& raw, float scale, const Nf4Bin* bins) {
  constexpr int V = 16 / sizeof(T);
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float xi = elem<T>(raw, i);
    const float s = kDivide ? __fdiv_rn(xi, scale) : __fmul_rn(xi, scale);
    const uint32_t code = QT == kNF4 ? encode_nf4_bins(s, bins) : encode_fp4(s);
    word |= code << (8 * (i / 2) + (i % 2 ? 0 : 4));
  }
  return word;
}

template <typename T, int K, int QT>
__device__ __forceinline__ void quantize_tile(const uint4 (&raw)[K], int64_t tile0, int64_t n, int log2_bs,
                                              float* warp_max, const Nf4Bin* bins, uint8_t* __restrict__ packed,
                                              float* __restrict__ absmax) {
  constexpr int V = 16 / sizeof(T);
  constexpr uint32_t kZeroCode = QT == kNF4 ? 7 : 0;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;

  // absmax per chunk, then per quant block
  float m[K];
#pragma unroll
  for (int k = 0; k < K; ++k) m[k] = chunk_absmax(raw[k], static_cast<T*>(nullptr));
  const int chunks = (1 << log2_bs) / V;  // chunks per quant block: 4 .. 1024
  if (chunks <= 32) {
#pragma unroll
    for (int k = 0; k < K; ++k)
      for (int off = 1; off < chunks; off <<= 1) m[k] = nan_max(m[k], __shfl_xor_sync(0xffffffffu, m[k], off));
  } else {  // uniform branch: blocksize is the same for the whole grid
#pragma unroll
    for (int k = 0; k < K; ++k) {
      for (int off = 1; off < 32; off <<= 1) m[k] = nan_max(m[k], __shfl_xor_sync(0xffffffffu, m[k], off));
      if (lane == 0) warp_max[k * kWarps + warp] = m[k];  // warp rows in chunk order
    }
    __syncthreads();
    const int rows = chunks / 32;  // warp rows per quant block
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int first = (k * kWarps + warp) / rows * rows;
      float a = warp_max[first];
      for (int r = 1; r < rows; ++r) a = nan_max(a, warp_max[first + r]);
      m[k] = a;
    }
  }

  // scale, encode, pack, store
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = k * kThreads + t;
    const int64_t e0 = tile0 + int64_t(c) * V;
    if (e0 >= n) continue;
    const float a = m[k], inv = __frcp_rn(a);  // IEEE reciprocal, as the reference's torch.reciprocal
    // quant._scale's edge cases, decided once per block so the common path is straight-line code: an all-zero
    // block multiplies by 0 instead of inf (its +-0 inputs give +-0, which encode as 0 does); a block whose
    // 1/absmax overflows (denormal absmax) divides. (A branch per element cost 2x in throughput.)
    const uint32_t word = (inv > 3.402823466e38f && a != 0.0f)
                              ? encode_chunk<T, QT, true>(raw[k], a, bins)
                              : encode_chunk<T, QT, false>(raw[k], a == 0.0f ? 0.0f : inv, bins);
    if (((c * V) & ((1 << log2_bs) - 1)) == 0) absmax[e0 >> log2_bs] = a;  // first chunk of its block
    if (e0 + V <= n) {
      if constexpr (V == 8) {
        reinterpret_cast<uint32_t*>(packed)[e0 / 8] = word;
      } else {
        reinterpret_cast<uint16_t*>(packed)[e0 / 4] = uint16_t(word);
      }
    } else {  // the tail chunk: bytes up to (n+1)/2 - 1; the pad nibble of odd n is the code of zero
#pragma unroll
      for (int j = 0; j < V / 2; ++j) {
        const uint32_t byte = (word >> (8 * j)) & 0xffu;
        if (e0 + 2 * j + 1 < n) packed[e0 / 2 + j] = uint8_t(byte);
        else if (e0 + 2 * j < n) packed[e0 / 2 + j] = uint8_t((byte & 0xf0u) | kZeroCode);
      }
    }
  }
}

template <typename T, int QT>
__global__ void __launch_bounds__(kThreads)
    quantize_4bit_kernel(const T* __restrict__ x, int64_t n, int log2_bs, uint8_t* __restrict__ packed,
                         float* __restrict__ absmax) {
  constexpr int K = kQuantTile / (kThreads * (16 / int(sizeof(T))));  // 16-byte loads per thread per tile
  // warp maxima, double-buffered by tile parity: a warp may write tile i+1's before a slower one has read tile i's
  __shared__ float warp_max[2][K * kWarps];
  __shared__ Nf4Bin bins[kNf4Bins];
  if (QT == kNF4) init_nf4_bins(bins);
  __syncthreads();

  const int64_t n_tiles = (n + kQuantTile - 1) / kQuantTile;
  int64_t tile = blockIdx.x;
  uint4 raw[K];
  if (tile < n_tiles) load_tile<T, K>(raw, x, tile * kQuantTile, n);
  for (int parity = 0; tile < n_tiles; tile += gridDim.x, parity ^= 1) {
    uint4 next[K];
    if (tile + gridDim.x < n_tiles) load_tile<T, K>(next, x, (tile + gridDim.x) * kQuantTile, n);
    quantize_tile<T, K, QT>(raw, tile * kQuantTile, n, log2_bs, warp_max[parity], bins, packed, absmax);
#pragma unroll
    for (int k = 0; k < K; ++k) raw[k] = next[k];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// quant.dequantize_ref. A CTA takes a tile of kThreads * K units of V = 16/sizeof(T) outputs; unit
// c = k * kThreads + threadIdx.x, so each warp store instruction writes 512 contiguous bytes. The CTA first decodes
// the scales of the quant blocks its tile touches into shared memory, one thread per block: plain float32, or with
// double quantization map[code] * absmax2 + offset, product and sum each rounded to float32 (no FMA). The packed
// loads are issued before that decode so they are in flight while it runs. With tiles_k = K the packed bytes are in
// tiles (minqlora/layout.py): only the address a unit's bytes are loaded from changes (tile_byte), the outputs and
// the scales keep their row order. A unit (2 or 4 bytes) never straddles a tile's 64-byte row piece, and N·K is a
// multiple of V, so tiles never take the tail path.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ int64_t tile_byte(int64_t e, int64_t tiles_k) {  // element e of a (N, tiles_k) weight
  const int64_t row = e / tiles_k, col = e - row * tiles_k;
  return (((row >> 4) * (tiles_k >> 7) + (col >> 7)) << 10) + ((row & 15) << 6) + ((col >> 1) & 63);
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                           const uint8_t* __restrict__ codes, const float* __restrict__ absmax2,
                           const float* __restrict__ code_map, float offset, int64_t n, int log2_bs,
                           int log2_nested_bs, int quant_type, int64_t tiles_k, T* __restrict__ out) {
  using P = PackedUnit<T>;
  constexpr int V = 16 / sizeof(T);
  constexpr int kTile = kThreads * K * V;
  __shared__ float lut[16];
  __shared__ float scale[kTile / 32];  // blocksize >= 32, so a tile touches at most kTile / 32 blocks
  const int t = threadIdx.x;
  const int64_t tile0 = blockIdx.x * int64_t(kTile);

  // 1. Packed loads. The tail unit gathers its bytes one by one (up to byte (n+1)/2 - 1).
  P w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t e0 = tile0 + int64_t(k * kThreads + t) * V;
    if (tiles_k != 0) {
      w[k] = e0 < n ? __ldcs(reinterpret_cast<const P*>(packed + tile_byte(e0, tiles_k))) : P(0);
    } else if (e0 + V <= n) {
      w[k] = __ldcs(reinterpret_cast<const P*>(packed) + e0 / V);
    } else {
      uint32_t acc = 0;
      for (int j = 0; j < V / 2 && e0 + 2 * j < n; ++j) acc |= uint32_t(packed[e0 / 2 + j]) << (8 * j);
      w[k] = P(acc);
    }
  }

  // 2. The code table and this tile's scales into shared memory.
  if (t < 16) lut[t] = kCodeTables[quant_type][t];
  const int64_t block0 = tile0 >> log2_bs, n_blocks = ((n - 1) >> log2_bs) + 1;
  for (int b = t; b < (kTile >> log2_bs) && block0 + b < n_blocks; b += kThreads) {
    const int64_t g = block0 + b;
    scale[b] = codes == nullptr
                   ? absmax[g]
                   : __fadd_rn(__fmul_rn(__ldg(code_map + codes[g]), absmax2[g >> log2_nested_bs]), offset);
  }
  __syncthreads();

  // 3. table[nibble] * scale in float32, one rounding to T, one 16-byte store per unit.
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int u = k * kThreads + t;
    const int64_t e0 = tile0 + int64_t(u) * V;
    if (e0 >= n) continue;
    const float a = scale[(u * V) >> log2_bs];
    float o[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      // element 2j is the high nibble of byte j, which sits in bits 8j..8j+7 of the little-endian unit
      const int nib = (uint32_t(w[k]) >> (8 * (i / 2) + (i % 2 ? 0 : 4))) & 0xF;
      o[i] = __fmul_rn(lut[nib], a);
    }
    if (e0 + V <= n) {
      reinterpret_cast<uint4*>(out)[e0 / V] = pack16<T>(o);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i)
        if (e0 + i < n) store_one(out + e0 + i, o[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// quant.quantize_blockwise_8bit_ref. Small inputs in practice (double quantization's absmax vector, n / 64 values;
// 8-bit optimizer state), so one warp per quant block: a pass for the absmax (shuffle-reduced), a second pass
// (from L1) that encodes each value by a branch-free binary search over the 255 midpoints of the map
// (quant.map_thresholds) in shared memory. Grid-stride over blocks.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_blockwise_8bit_kernel(const T* __restrict__ x, const float* __restrict__ code_map, int64_t n,
                                   int log2_bs, uint8_t* __restrict__ codes, float* __restrict__ absmax) {
  __shared__ float mid[255];
  const int t = threadIdx.x, lane = t & 31;
  if (t < 255) mid[t] = __fmul_rn(__fadd_rn(code_map[t], code_map[t + 1]), 0.5f);
  __syncthreads();
  const int64_t n_blocks = ((n - 1) >> log2_bs) + 1;
  for (int64_t b = int64_t(blockIdx.x) * kWarps + (t >> 5); b < n_blocks; b += int64_t(gridDim.x) * kWarps) {
    const int64_t b0 = b << log2_bs;
    const int len = int(n - b0 < (int64_t(1) << log2_bs) ? n - b0 : (int64_t(1) << log2_bs));
    float a = 0.0f;
    for (int i = lane; i < len; i += 32) a = nan_max(a, fabsf(to_float(x[b0 + i])));
    for (int off = 1; off < 32; off <<= 1) a = nan_max(a, __shfl_xor_sync(0xffffffffu, a, off));
    const float inv = __frcp_rn(a);
#pragma unroll 4
    for (int i = lane; i < len; i += 32) {
      const float s = scale_value(to_float(x[b0 + i]), a, inv);
      // the number of midpoints strictly below s (ties to the lower code): 255 = 2^8 - 1 sorted entries, so
      // eight halving steps, never reading past mid[254]
      int lo = 0;
#pragma unroll
      for (int step = 128; step >= 1; step >>= 1)
        if (mid[lo + step - 1] < s) lo += step;
      codes[b0 + i] = uint8_t(lo);
    }
    if (lane == 0) absmax[b] = a;
  }
}

// quant.dequantize_blockwise_8bit_ref: map[code] * absmax[block] in float32, rounded once to T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_blockwise_8bit_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                                     const float* __restrict__ code_map, int64_t n, int log2_bs,
                                     T* __restrict__ out) {
  __shared__ float map[256];
  map[threadIdx.x] = code_map[threadIdx.x];  // kThreads == 256
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < n; e += stride)
    store_one(out + e, __fmul_rn(map[codes[e]], absmax[e >> log2_bs]));
}

}  // namespace cuda
}  // namespace minqlora
