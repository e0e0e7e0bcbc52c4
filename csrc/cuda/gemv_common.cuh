// What the two fused 4-bit GEMV kernels share (gemv_kernels.cuh: the register ring, any M; gemv_stream.cuh: one
// token, every operand streamed through shared memory by cp.async): the tile constants, the pair table and its
// lookup, the MMA, one chunk's block-scaled MMAs, and the split-K reduction that writes y. Both implement
// F.linear(x, quant.dequantize_ref(packed, state).to(x.dtype)) (minqlora/quant.py); the design is in
// gemv_kernels.cuh's header.
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
constexpr int kRowWords = 64;          // words per byte value in the pair table (lanes use 32: see lookup)
constexpr int kTableWords = 256 * kRowWords;  // pair table: 256 byte values × 64 words = 64 KB
constexpr int kTableBytes = (kTableWords + 256) * 4;  // + the 256-entry double-quant map

using Args = GemvArgs;  // gemv_launch.h

// What a kernel launch receives: one weight (kGroup false: w[0]) or a group (gemv_launch.h's GemvGroup), member i
// computing row tiles of w[i] in CTAs [cta_begin[i], cta_begin[i + 1]) of grid.x with wr[i] row tiles per CTA.
// Unused entries of cta_begin hold the grid's size, so no CTA selects them.
struct Launch {
  Args w[kMaxGroup];
  int wr[kMaxGroup];
  int cta_begin[kMaxGroup + 1];
};

// This CTA's member: its arguments, its CTA index within the member (bx) and its row tiles per CTA.
template <bool kGroup>
__device__ __forceinline__ Args member(const Launch& L, int& bx, int& wr_count) {
  if constexpr (!kGroup) {
    bx = blockIdx.x;
    wr_count = L.wr[0];
    return L.w[0];
  } else {
    const int b = blockIdx.x;
    const int m = (b >= L.cta_begin[1]) + (b >= L.cta_begin[2]);  // kMaxGroup == 3
    bx = b - (m == 0 ? 0 : m == 1 ? L.cta_begin[1] : L.cta_begin[2]);
    wr_count = m == 0 ? L.wr[0] : m == 1 ? L.wr[1] : L.wr[2];
    return m == 0 ? L.w[0] : m == 1 ? L.w[1] : L.w[2];
  }
}
static_assert(kMaxGroup == 3, "member() selects among three");

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

// Byte offset, within a chunk's 64 bytes of one row, of word q (0..3) of lane t's 16 bytes. The lane's bytes come in
// NBPC runs, one per quantization block of the chunk: run j = q / (4/NBPC) starts at j·(64/NBPC) + t·(16/NBPC).
template <int NBPC>
__device__ __forceinline__ constexpr int word_offset(int q, int t) {
  return (q / (4 / NBPC)) * (64 / NBPC) + t * (16 / NBPC) + 4 * (q % (4 / NBPC));
}

// Lane pointer to row r (0..15) of row tile `tile` at chunk 0, `off` bytes into the row's 64 bytes of a chunk, and
// (stride) the step from one 128-value chunk to the next. Rows: bitsandbytes' bytes, row n at n·K/2 (past N, row
// N - 1: valid memory, its outputs dropped at the store), chunks 64 bytes apart; a warp's 16-byte loads cover 64
// bytes of each of 8 rows, which HBM serves at 2.6-3.0 TB/s against 4.2 for contiguous reads (H200,
// benchmarks/read_patterns.cu). Tiles (minqlora/layout.py, to_tiles): chunk (tile, c) is 1 KB at
// (tile·K/128 + c)·1024, row r at 64·r in it, so a load instruction reads 512 contiguous bytes; past N, the last
// tile.
__device__ __forceinline__ const uint8_t* row_lane_ptr(const Args& a, int tile, int r, int off, int64_t& stride) {
  if (a.tiles) {
    stride = 1024;
    // a CTA's row tiles past N (its outputs dropped at the store) read the last tile: valid memory, as for rows
    const int last = a.N / kTileRows - 1;
    return a.packed + int64_t(min(tile, last)) * (a.K / kChunk) * 1024 + r * 64 + off;
  }
  stride = 64;
  return a.packed + int64_t(min(tile * kTileRows + r, a.N - 1)) * (a.K / 2) + off;
}

// One lookup: the two values of packed byte i of w, as the A-operand register (low half = the high nibble = the
// lower k). The table row of byte value b is 256 bytes (64 words, lanes use the first 32), so one byte permute
// builds the whole shared-memory offset: byte 0 = 4·lane (from `lane4`), byte 1 = byte i of w, bytes 2, 3 = zero
// (byte 1 of lane4). That is 2 instructions per packed byte (PRMT + LDS) where shift / mask / insert / scale / add
// took 5-6 (kernel version 4).
__device__ __forceinline__ uint32_t lookup(const char* table, uint32_t w, uint32_t lane4, int i) {
  return *reinterpret_cast<const uint32_t*>(table + __byte_perm(w, lane4, 0x5504u | (uint32_t(i) << 4)));
}

// The pair table (and, with double quantization, the 256-entry map after it) in the CTA's shared memory. Each warp
// writes the pairs of its 32 byte values: 4 byte values × 32 lane copies per warp store (four 128-byte rows,
// conflict-free), 8 vector stores per thread. The caller synchronizes.
template <typename T>
__device__ __forceinline__ void build_table(uint32_t* smem, const Args& a) {
  uint32_t* table = smem;                                       // [256][64], lanes use words 0..31
  float* map_s = reinterpret_cast<float*>(smem + kTableWords);  // [256]
  const float* codes = kGemvCodes[a.quant_type];
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const int byte = w * 32 + s * 4 + (l >> 3);  // kWarps · 32 == 256 byte values
    const uint32_t v = pack_pair<T>(codes[byte >> 4], codes[byte & 15]);
    reinterpret_cast<uint4*>(table)[byte * (kRowWords / 4) + (l & 7)] = make_uint4(v, v, v, v);
  }
  if (a.codes != nullptr) map_s[threadIdx.x] = a.map[threadIdx.x];  // kThreads == 256
}

// The double-quant decode of one block scale, exactly as quant.dequantize_ref does: map[code] · absmax2 + offset,
// each step rounded.
__device__ __forceinline__ float dq_scale(const float* map_s, uint32_t code, float absmax2, float offset) {
  return __fadd_rn(__fmul_rn(map_s[code], absmax2), offset);
}

// One chunk: w = this lane's words of rows g and g + 8, x[nt][q] = the B operand values for word q, s_mine = the
// block scales this lane decoded (lane L: row L & 15, block (L >> 4) + 2·slot). out (C fragments) += each block's
// MMA sum times its scale. blocks: how many of the chunk's NBPC blocks exist (a partial last chunk).
template <typename T, int NBPC, int NT>
__device__ __forceinline__ void chunk_mma(float (&out)[NT][4], const uint32_t (&w)[2][4], const uint4 (&x)[NT][4],
                                          const float (&s_mine)[NBPC == 4 ? 2 : 1], const char* tbl,
                                          uint32_t lane4, int g, int blocks = NBPC) {
  constexpr int kSlots = NBPC == 4 ? 2 : 1;
#pragma unroll
  for (int j = 0; j < NBPC; ++j) {
    if (j >= blocks) break;  // warp-uniform
    // Up to 8 tokens (NT = 1), two accumulators per block, one per MMA k-step (bytes 0,1 / 2,3 of each word), summed
    // before the scale: a block's dependent MMA chain is half as long (2 instead of 4 at blocksize 64, 4 instead of
    // 8 at 128+). Measured 1-2 % at one token (H200, 14336x4096: 18.25 -> 17.94 us): the MMA chain is not what
    // limits the kernel (benchmarks/README.md: the L1/shared-memory pipe and the CTA imbalance are). With 16+
    // tokens the n-tiles are independent chains already, and the second set of registers spilled.
    constexpr int kAcc = NT == 1 ? 2 : 1;
    float acc[kAcc][NT][4];
#pragma unroll
    for (int s = 0; s < kAcc; ++s)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) acc[s][nt][0] = acc[s][nt][1] = acc[s][nt][2] = acc[s][nt][3] = 0.0f;
    // block j's words: 4/NBPC of them, two MMA k-steps each (bytes 0,1 then 2,3)
#pragma unroll
    for (int q = j * (4 / NBPC); q < (j + 1) * (4 / NBPC); ++q) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t a0 = lookup(tbl, w[0][q], lane4, 2 * s), a2 = lookup(tbl, w[0][q], lane4, 2 * s + 1);
        const uint32_t a1 = lookup(tbl, w[1][q], lane4, 2 * s), a3 = lookup(tbl, w[1][q], lane4, 2 * s + 1);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          mma16816<T>(acc[s % kAcc][nt], a0, a1, a2, a3, s ? x[nt][q].z : x[nt][q].x, s ? x[nt][q].w : x[nt][q].y);
      }
    }
    // rows g and g + 8 of block j: value j·16 + row, held by lane (j·16 + row) % 32 in slot j / 2
    const float s0 = __shfl_sync(0xffffffffu, s_mine[kSlots == 2 ? j >> 1 : 0], (j * 16 + g) & 31);
    const float s1 = __shfl_sync(0xffffffffu, s_mine[kSlots == 2 ? j >> 1 : 0], (j * 16 + g + 8) & 31);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float sum = kAcc == 2 ? acc[0][nt][i] + acc[kAcc - 1][nt][i] : acc[0][nt][i];
        out[nt][i] = fmaf(i < 2 ? s0 : s1, sum, out[nt][i]);
      }
    }
  }
}

// The split-K reduction over each row tile's warps, through shared memory (the table's, free once every warp is
// done: the first barrier), and the store of y: red[warp][nt][i][lane]. Warp w holds row tile w % wr_count.
template <typename T, int NT>
__device__ __forceinline__ void reduce_store(uint32_t* smem, const float (&out)[NT][4], const Args& a, int wr_count,
                                             int m0, int bx) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, splits = kWarps / wr_count;
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kPerWarp = NT * 4 * 32;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp * kPerWarp + (nt * 4 + i) * 32 + lane] = out[nt][i];
  __syncthreads();
  T* y = static_cast<T*>(a.y);
  for (int e = threadIdx.x; e < wr_count * kPerWarp; e += kThreads) {
    const int tr = e / kPerWarp, el = e % kPerWarp;  // row tile of the CTA, element within it
    float sum = 0.0f;
    for (int v = 0; v < splits; ++v) sum += red[(v * wr_count + tr) * kPerWarp + el];
    const int l = el & 31, i = (el >> 5) & 3, nt = el >> 7;
    const int n = (bx * wr_count + tr) * kTileRows + (l >> 2) + 8 * (i >> 1);
    const int m = m0 + 8 * nt + 2 * (l & 3) + (i & 1);
    if (n < a.N && m < a.M) y[int64_t(m) * a.N + n] = from_float<T>(sum);
  }
}

}  // namespace gemv
}  // namespace cuda
}  // namespace minqlora
