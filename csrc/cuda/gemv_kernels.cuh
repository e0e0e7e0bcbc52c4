// The fused 4-bit GEMV / small GEMM: y = x · dequant(W)ᵀ for few rows of x, read straight from bitsandbytes'
// bytes. It implements F.linear(x, quant.dequantize_ref(packed, state).to(x.dtype)) (minqlora/quant.py) for
// x (M, K) in bf16 or fp16, W (N, K) packed NF4/FP4 with float32 or double-quantized absmax, K a multiple of 32
// and of the blocksize. The launcher is gemv.cu, the torch side gemv_ops.cpp.
//
// Design (numbers for the H200: 132 SMs, ~4.2 TB/s copy bandwidth; a 14336×4096 weight is 29.4 MB, ~7 µs of HBM):
// - Tensor cores with the weight as the 16-row A operand ("swap AB"): mma.m16n8k16 computes 16 output features ×
//   8 tokens, so M = 1..8 costs one MMA per 256 weights and M up to 32 only adds MMAs, never weight traffic.
// - A 128-value chunk of one weight row is 64 bytes; the four lanes of a quad each load 16 of them. Within a chunk a
//   lane's bytes are taken per quantization block (1, 2 or 4 blocks of 128/64/32 values), so every MMA's 16 k-slots
//   lie in ONE block: the block's fp32 absmax then scales the fp32 MMA partial sum, not the weights (exact scale,
//   no per-weight multiply). The k order inside an MMA is a permutation; x is loaded in the same permutation.
// - Decode is one shared-memory lookup per packed byte: a 256-entry table of both nibbles' values as a bf16x2 (or
//   half2) register, replicated 32× so lane l always reads bank l (conflict-free; 32 KB). Weights enter the tensor
//   cores as table values rounded to bf16 (≤ 2^-9 relative, the same bound as the reference's bf16 dequantized
//   weight) or fp16 (≤ 2^-12); the scale and the sums stay fp32. The table is written with 16-byte stores (four
//   lane copies each): a CTA covers only 16-32 rows, so its build is a real share of the CTA's work.
// - Each block scale is computed once per warp and chunk (lane L: row L % 16, block L / 16 of the chunk), loaded one
//   chunk ahead, and handed to the four lanes of its row by shuffle.
// - Split-K inside the CTA: 8 warps share 16·RT output rows, each warp takes a contiguous run of chunks; partial
//   sums meet in shared memory and one pass writes y. No atomics, no workspace, one launch (CUDA-graph friendly),
//   deterministic. The next chunk's weights and x are loaded before the current chunk is decoded.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../common.h"
#include "gemv_launch.h"

namespace minqlora {
namespace cuda {
namespace gemv {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 16;          // output features per MMA tile (the MMA's M)
constexpr int kChunk = 128;            // k values per chunk: 64 packed bytes per row, 16 per lane of a quad
constexpr int kTableWords = 256 * 32;  // pair table: 256 byte values × 32 lane copies
constexpr int kSmemBytes = (kTableWords + 256) * 4;  // + the 256-entry double-quant map

using Args = GemvArgs;  // gemv_launch.h

__constant__ float kGemvCodes[2][16] = {MQ_NF4_TABLE, MQ_FP4_TABLE};  // indexed by QuantType

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(v);
  else return __float2half_rn(v);
}

// d += A·B for one m16n8k16 tile, fp32 accumulators. A: 4 registers (rows g / g+8 × k-slots 2t.. / 2t+8..), B: 2.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Weights are read once: stream them past L1 (x, read by every warp, stays cached).
__device__ __forceinline__ uint4 load_stream16(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 load_stream8(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t load_stream4(const uint8_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

// Byte offset, within a row, of word q (0..3) of lane t's 16 bytes of chunk c. The lane's bytes come in NBPC runs,
// one per quantization block of the chunk: run j = q / (4/NBPC) starts at c·64 + j·(64/NBPC) + t·(16/NBPC).
template <int NBPC>
__device__ __forceinline__ int word_offset(int c, int q, int t) {
  constexpr int kWordsPerRun = 4 / NBPC;
  return c * 64 + (q / kWordsPerRun) * (64 / NBPC) + t * (16 / NBPC) + 4 * (q % kWordsPerRun);
}

// The 16 bytes (4 words) of lane t for one row and chunk; zeros where the row or the block does not exist.
template <int NBPC>
__device__ __forceinline__ void load_row_chunk(uint32_t (&w)[4], const uint8_t* row, bool row_ok, int c, int t,
                                               int K) {
#pragma unroll
  for (int j = 0; j < NBPC; ++j) {
    const int k0 = c * kChunk + j * (kChunk / NBPC);  // first k of block run j (whole blocks: K % bs == 0)
    const bool ok = row_ok && k0 < K;
    const uint8_t* p = row + word_offset<NBPC>(c, j * (4 / NBPC), t);
    if constexpr (NBPC == 1) {
      const uint4 v = ok ? load_stream16(p) : make_uint4(0, 0, 0, 0);
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (NBPC == 2) {
      const uint2 v = ok ? load_stream8(p) : make_uint2(0, 0);
      w[2 * j] = v.x, w[2 * j + 1] = v.y;
    } else {
      w[j] = ok ? load_stream4(p) : 0u;
    }
  }
}

// 8 values of x (one uint4) per word q: the k's that word q's bytes encode, in the same order.
template <int NBPC>
__device__ __forceinline__ void load_x_chunk(uint4 (&xv)[4], const uint16_t* xrow, bool tok_ok, int c, int t, int K) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int off = word_offset<NBPC>(c, q, t);  // byte offset in the packed row = k / 2
    const bool ok = tok_ok && 2 * off < K;
    xv[q] = ok ? __ldg(reinterpret_cast<const uint4*>(xrow + 2 * off)) : make_uint4(0, 0, 0, 0);
  }
}

// One lookup: the two values of packed byte i of w, as the A-operand register (low half = the high nibble = the
// lower k). `lut` points at this lane's copy (table + lane).
__device__ __forceinline__ uint32_t lookup(const uint32_t* lut, uint32_t w, int i) {
  return lut[((w >> (8 * i)) & 0xffu) << 5];
}

// x (M, K) T, rows m0 .. m0 + 8·NT of them in this CTA's token group; W rows 16·RT from tile blockIdx.x·RT.
template <typename T, int NBPC, int NT, int RT>
__global__ void __launch_bounds__(kThreads) gemv_4bit_kernel(const Args a) {
  extern __shared__ uint32_t smem[];
  uint32_t* table = smem;                                        // [256][32]
  float* map_s = reinterpret_cast<float*>(smem + kTableWords);   // [256]
  {
    // Each warp writes the pairs of its 32 byte values, four bytes per step (4 × 32 lane copies = 512 contiguous
    // bytes, conflict-free): 8 vector stores per thread instead of 32 scalar ones and 32 conversions.
    const float* codes = kGemvCodes[a.quant_type];
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const int byte = w * 32 + s * 4 + (l >> 3);  // kWarps · 32 == 256 byte values
      const uint32_t v = pack_pair<T>(codes[byte >> 4], codes[byte & 15]);
      reinterpret_cast<uint4*>(table)[byte * 8 + (l & 7)] = make_uint4(v, v, v, v);
    }
    if (a.codes != nullptr) map_s[threadIdx.x] = a.map[threadIdx.x];  // kThreads == 256
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;  // MMA fragment coordinates: group (row / token) and thread in group
  const uint32_t* lut = table + lane;
  const int K = a.K, N = a.N;
  const int64_t row_bytes = K / 2;
  const int blocks_per_row = K >> a.log2_bs;

  // this warp's chunks
  const int chunks = (K + kChunk - 1) / kChunk;
  const int c_begin = warp * chunks / kWarps, c_end = (warp + 1) * chunks / kWarps;

  // rows: tile r holds rows n0 + g (C rows 0, 1) and n0 + g + 8 (C rows 2, 3)
  const uint8_t* rows[RT][2];
  bool row_ok[RT][2];
  int row_idx[RT][2];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = (blockIdx.x * RT + r) * kTileRows + g + 8 * h;
      row_ok[r][h] = n < N;
      row_idx[r][h] = n < N ? n : 0;
      rows[r][h] = a.packed + int64_t(row_idx[r][h]) * row_bytes;
    }
  }
  // tokens: n-tile nt of the B operand is token m0 + 8·nt + g
  const int m0 = blockIdx.y * 8 * NT;
  const uint16_t* xrows[NT];
  bool tok_ok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = m0 + 8 * nt + g;
    tok_ok[nt] = m < a.M;
    xrows[nt] = static_cast<const uint16_t*>(a.x) + int64_t(tok_ok[nt] ? m : 0) * K;
  }

  // Block scales, computed once per warp and chunk instead of by all four lanes of a row: lane L reads the raw
  // scale of row (L & 15) of each row tile for block jj = (L >> 4) + 2·slot of the chunk (one block per chunk:
  // lanes 16..31 repeat 0..15), decodes it, and the lanes that need it take it by shuffle.
  constexpr int kSlots = NBPC == 4 ? 2 : 1;
  int64_t s_base[RT];  // first block of this lane's scale row
  bool s_row_ok[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int n = (blockIdx.x * RT + r) * kTileRows + (lane & 15);
    s_row_ok[r] = n < N;
    s_base[r] = int64_t(n < N ? n : 0) * blocks_per_row;
  }
  uint32_t s_code[RT][kSlots], s_code_next[RT][kSlots];
  float s_val[RT][kSlots], s_val_next[RT][kSlots];  // absmax2 of the code's group, or the float32 absmax
  auto load_scales = [&](int c, uint32_t (&code)[RT][kSlots], float (&val)[RT][kSlots]) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int slot = 0; slot < kSlots; ++slot) {
        const int jj = NBPC == 1 ? 0 : (lane >> 4) + 2 * slot;
        const int k0 = c * kChunk + jj * (kChunk / NBPC);
        const bool ok = s_row_ok[r] && k0 < K;
        const int64_t idx = s_base[r] + (ok ? (k0 >> a.log2_bs) : 0);
        if (a.codes == nullptr) {
          code[r][slot] = 0u;
          val[r][slot] = ok ? __ldg(a.absmax + idx) : 0.0f;
        } else {
          code[r][slot] = ok ? __ldg(a.codes + idx) : 0u;
          val[r][slot] = ok ? __ldg(a.absmax2 + (idx >> a.log2_nested_bs)) : 0.0f;
        }
      }
  };

  float out[RT][NT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) out[r][nt][i] = 0.0f;

  // Registers for this chunk and the next one (loaded before this one is decoded). x is prefetched too while it
  // fits: at NT = 4 it would take 128 registers, so there it is read when its chunk starts (an L2/L1 hit).
  constexpr bool kPrefetchX = NT <= 2;
  uint32_t w[RT][2][4], w_next[RT][2][4];
  uint4 xv[NT][4], xv_next[kPrefetchX ? NT : 1][4];
  auto load_w = [&](int c, uint32_t (&wd)[RT][2][4]) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) load_row_chunk<NBPC>(wd[r][h], rows[r][h], row_ok[r][h], c, t, K);
  };
  auto load_x = [&](int c, uint4 (&xd)[kPrefetchX ? NT : 1][4]) {
#pragma unroll
    for (int nt = 0; nt < (kPrefetchX ? NT : 1); ++nt) load_x_chunk<NBPC>(xd[nt], xrows[nt], tok_ok[nt], c, t, K);
  };
  if (c_begin < c_end) {
    load_w(c_begin, w);
    load_scales(c_begin, s_code, s_val);
    if constexpr (kPrefetchX) load_x(c_begin, xv);
  }

  for (int c = c_begin; c < c_end; ++c) {
    if (c + 1 < c_end) {
      load_w(c + 1, w_next);
      load_scales(c + 1, s_code_next, s_val_next);
      if constexpr (kPrefetchX) load_x(c + 1, xv_next);
    }
    // This lane's scales for the chunk: float32 absmax, or decoded from the double-quant code exactly as
    // quant.dequantize_ref does, map[code] · absmax2[idx / nested_bs] + offset, each step rounded.
    float s_mine[RT][kSlots];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int slot = 0; slot < kSlots; ++slot)
        s_mine[r][slot] = a.codes == nullptr ? s_val[r][slot]
                                             : __fadd_rn(__fmul_rn(map_s[s_code[r][slot]], s_val[r][slot]), a.offset);
    if constexpr (!kPrefetchX) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) load_x_chunk<NBPC>(xv[nt], xrows[nt], tok_ok[nt], c, t, K);
    }
#pragma unroll
    for (int j = 0; j < NBPC; ++j) {
      const int k0 = c * kChunk + j * (kChunk / NBPC);
      if (k0 >= K) break;  // warp-uniform: the tail chunk holds fewer blocks
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
        // block j's words: 4/NBPC of them, two MMA k-steps each (bytes 0,1 then 2,3)
#pragma unroll
        for (int q = j * (4 / NBPC); q < (j + 1) * (4 / NBPC); ++q) {
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            const uint32_t a0 = lookup(lut, w[r][0][q], 2 * s), a2 = lookup(lut, w[r][0][q], 2 * s + 1);
            const uint32_t a1 = lookup(lut, w[r][1][q], 2 * s), a3 = lookup(lut, w[r][1][q], 2 * s + 1);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const uint32_t b0 = s ? xv[nt][q].z : xv[nt][q].x, b1 = s ? xv[nt][q].w : xv[nt][q].y;
              mma16816<T>(acc[nt], a0, a1, a2, a3, b0, b1);
            }
          }
        }
        // rows g and g + 8 of block j: value j·16 + row, held by lane (j·16 + row) % 32 in slot j / 2
        const float s0 = __shfl_sync(0xffffffffu, s_mine[r][kSlots == 2 ? j >> 1 : 0], (j * 16 + g) & 31);
        const float s1 = __shfl_sync(0xffffffffu, s_mine[r][kSlots == 2 ? j >> 1 : 0], (j * 16 + g + 8) & 31);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          out[r][nt][0] = fmaf(s0, acc[nt][0], out[r][nt][0]);
          out[r][nt][1] = fmaf(s0, acc[nt][1], out[r][nt][1]);
          out[r][nt][2] = fmaf(s1, acc[nt][2], out[r][nt][2]);
          out[r][nt][3] = fmaf(s1, acc[nt][3], out[r][nt][3]);
        }
      }
    }
    if (c + 1 < c_end) {
#pragma unroll
      for (int r = 0; r < RT; ++r) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int q = 0; q < 4; ++q) w[r][h][q] = w_next[r][h][q];
#pragma unroll
        for (int slot = 0; slot < kSlots; ++slot) s_code[r][slot] = s_code_next[r][slot], s_val[r][slot] = s_val_next[r][slot];
      }
      if constexpr (kPrefetchX) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int q = 0; q < 4; ++q) xv[nt][q] = xv_next[nt][q];
      }
    }
  }

  // split-K reduction over the 8 warps, through the (now free) table memory: red[warp][r][nt][i][lane]
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kPerWarp = RT * NT * 4 * 32;
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp * kPerWarp + ((r * NT + nt) * 4 + i) * 32 + lane] = out[r][nt][i];
  __syncthreads();
  T* y = static_cast<T*>(a.y);
  for (int e = threadIdx.x; e < kPerWarp; e += kThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += red[v * kPerWarp + e];
    const int l = e & 31, i = (e >> 5) & 3, rn = e >> 7;  // rn = r·NT + nt
    const int r = rn / NT, nt = rn % NT;
    const int n = (blockIdx.x * RT + r) * kTileRows + (l >> 2) + 8 * (i >> 1);
    const int m = m0 + 8 * nt + 2 * (l & 3) + (i & 1);
    if (n < N && m < a.M) y[int64_t(m) * N + n] = from_float<T>(sum);
  }
}

}  // namespace gemv
}  // namespace cuda
}  // namespace minqlora
