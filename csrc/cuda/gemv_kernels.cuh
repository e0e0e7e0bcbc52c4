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
constexpr int kRowWords = 64;          // words per byte value in the pair table (lanes use 32: see lookup)
constexpr int kTableWords = 256 * kRowWords;  // pair table: 256 byte values × 64 words = 64 KB
constexpr int kStages = 6;             // weight ring depth per warp (1 KB a stage): 5 chunks in flight
// the pair table, the 256-entry double-quant map, and 8 warps' rings: 113 KB, two CTAs per SM (228 KB)
constexpr int kSmemBytes = (kTableWords + 256) * 4 + kWarps * kStages * 1024;

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

// Byte offset, within a row, of word q (0..3) of lane t's 16 bytes of chunk c. The lane's bytes come in NBPC runs,
// one per quantization block of the chunk: run j = q / (4/NBPC) starts at c·64 + j·(64/NBPC) + t·(16/NBPC).
template <int NBPC>
__device__ __forceinline__ int word_offset(int c, int q, int t) {
  constexpr int kWordsPerRun = 4 / NBPC;
  return c * 64 + (q / kWordsPerRun) * (64 / NBPC) + t * (16 / NBPC) + 4 * (q % kWordsPerRun);
}

// 8 values of x (one uint4) per word q: the k's that word q's bytes encode, in the same order. `dep` is zero at run
// time but opaque to the compiler (see the main loop).
template <int NBPC>
__device__ __forceinline__ void load_x_chunk(uint4 (&xv)[4], const uint16_t* xrow, bool tok_ok, int c, int t, int K,
                                             int dep) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int off = word_offset<NBPC>(c, q, t);  // byte offset in the packed row = k / 2
    const bool ok = tok_ok && 2 * off < K;
    xv[q] = ok ? __ldg(reinterpret_cast<const uint4*>(xrow + 2 * off + dep)) : make_uint4(0, 0, 0, 0);
  }
}

// cp.async of 16 bytes global -> shared, zero-filled (nothing read) when !ok; through L2 only (weights are read once).
__device__ __forceinline__ void copy16(uint32_t dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void copy_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// The weight ring: per warp kStages chunks of its 16 rows × 64 bytes in shared memory. Row r's four 16-byte units
// are stored XOR-swizzled, unit u at u ^ swizzle(r), so the fragment reads below hit 32 distinct banks: lanes of rows
// g and g + 2 read the same units of their rows, 256 bytes apart (the same banks) without it.
template <int NBPC>
__device__ __forceinline__ int swizzle(int r) {
  return NBPC == 4 ? (r >> 1) & 3 : NBPC == 2 ? ((r >> 1) & 1) << 1 : 0;
}

// Lane t's 4 words of row r from a ring stage, in the order word_offset gives (one 16-, two 8- or four 4-byte reads).
template <int NBPC>
__device__ __forceinline__ void read_row(uint32_t (&w)[4], const char* stage, int r, int t) {
  const char* row = stage + r * 64;
#pragma unroll
  for (int j = 0; j < NBPC; ++j) {
    const int off = word_offset<NBPC>(0, j * (4 / NBPC), t);
    const char* p = row + (((off >> 4) ^ swizzle<NBPC>(r)) << 4) + (off & 15);
    if constexpr (NBPC == 1) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (NBPC == 2) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      w[2 * j] = v.x, w[2 * j + 1] = v.y;
    } else {
      w[j] = *reinterpret_cast<const uint32_t*>(p);
    }
  }
}

// One lookup: the two values of packed byte i of w, as the A-operand register (low half = the high nibble = the
// lower k). The table row of byte value b is 256 bytes (64 words, lanes use the first 32), so one byte permute
// builds the whole shared-memory offset: byte 0 = 4·lane (from `lane4`), byte 1 = byte i of w, bytes 2, 3 = zero
// (byte 1 of lane4). That is 2 instructions per packed byte (PRMT + LDS) where shift / mask / insert / scale / add
// took 5-6 (kernel version 4).
__device__ __forceinline__ uint32_t lookup(const char* table, uint32_t w, uint32_t lane4, int i) {
  return *reinterpret_cast<const uint32_t*>(table + __byte_perm(w, lane4, 0x5504u | (uint32_t(i) << 4)));
}

// Registers of one chunk's x and raw block scales, loaded one chunk ahead.
template <int NBPC, int NT>
struct Side {
  static constexpr int kSlots = NBPC == 4 ? 2 : 1;
  uint4 x[NT][4];
  uint32_t code[kSlots];
  float val[kSlots];  // absmax2 of the code's group, or the float32 absmax
};

// x (M, K) T, tokens m0 .. m0 + 8·NT of this CTA's token group; W rows 16·wr_count from blockIdx.x·16·wr_count.
// Warp w computes row tile w % wr_count over the k split w / wr_count of 8 / wr_count.
template <typename T, int NBPC, int NT>
__global__ void __launch_bounds__(kThreads, NT == 4 ? 1 : 2) gemv_4bit_kernel(const Args a, const int wr_count) {
  extern __shared__ __align__(16) uint32_t smem[];
  uint32_t* table = smem;                                           // [256][64], lanes use words 0..31
  float* map_s = reinterpret_cast<float*>(smem + kTableWords);      // [256]
  char* rings = reinterpret_cast<char*>(smem + kTableWords + 256);  // [warp][kStages][16 rows][64 bytes]
  {
    // Each warp writes the pairs of its 32 byte values: 4 byte values × 32 lane copies per warp store (four 128-byte
    // rows, conflict-free), 8 vector stores per thread.
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

  using Sd = Side<NBPC, NT>;
  constexpr int kSlots = Sd::kSlots;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;  // MMA fragment coordinates: group (row / token) and thread in group
  const uint32_t lane4 = 4u * lane;
  const char* tbl = reinterpret_cast<const char*>(table);
  const int K = a.K, N = a.N;
  const int64_t row_bytes = K / 2;
  const int wr = warp % wr_count, splits = kWarps / wr_count, ks = warp / wr_count;
  const int tile = blockIdx.x * wr_count + wr;

  // this warp's chunks
  const int chunks = (K + kChunk - 1) / kChunk;
  // Chunks ks, ks + splits, ks + 2·splits, ...: the warps of a row tile walk K side by side, so the CTA's reads in
  // flight are one contiguous run of each row (8 warps × 5 ring stages × 64 bytes) instead of 8 runs of 320 bytes
  // far apart. (Contiguous splits measured 1.3 TB/s whatever the ring depth.)
  const int n_mine = ks < chunks ? (chunks - ks + splits - 1) / splits : 0;
  auto chunk_of = [&](int i) { return ks + i * splits; };

  // Rows n0 + g (C rows 0, 1) and n0 + g + 8 (C rows 2, 3): this lane copies unit t of both rows' chunks into the
  // ring and reads its fragment words of the same two rows back.
  const uint8_t* rows[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = tile * kTileRows + g + 8 * h;
    row_ok[h] = n < N;
    rows[h] = a.packed + int64_t(row_ok[h] ? n : 0) * row_bytes + 16 * t;
  }
  char* ring = rings + warp * (kStages * 1024);
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  uint32_t dst[2];  // this lane's two 16-byte units within a stage
#pragma unroll
  for (int h = 0; h < 2; ++h) dst[h] = (g + 8 * h) * 64 + ((t ^ swizzle<NBPC>(g + 8 * h)) << 4);
  auto copy_chunk = [&](int c, int stage) {
    const bool k_ok = c * kChunk + 32 * t < K;  // unit t holds k = c·128 + 32t .. + 31 (K % 32 == 0)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      copy16(ring_s + stage * 1024 + dst[h], rows[h] + int64_t(c) * 64, row_ok[h] && k_ok);
  };

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
  // scale of row L & 15 for block jj = (L >> 4) + 2·slot of the chunk (one block per chunk: lanes 16..31 repeat
  // 0..15), decodes it, and the lanes that need it take it by shuffle.
  const int s_row = tile * kTileRows + (lane & 15);
  const bool s_row_ok = s_row < N;
  const int64_t s_base = int64_t(s_row_ok ? s_row : 0) * (K >> a.log2_bs);

  auto load_side = [&](int c, Sd& sd, int dep) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) load_x_chunk<NBPC>(sd.x[nt], xrows[nt], tok_ok[nt], c, t, K, dep);
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot) {
      const int jj = NBPC == 1 ? 0 : (lane >> 4) + 2 * slot;
      const int k0 = c * kChunk + jj * (kChunk / NBPC);
      const bool ok = s_row_ok && k0 < K;
      const int64_t idx = s_base + (ok ? (k0 >> a.log2_bs) : 0) + dep;
      if (a.codes == nullptr) {
        sd.code[slot] = 0u;
        sd.val[slot] = ok ? __ldg(a.absmax + idx) : 0.0f;
      } else {
        sd.code[slot] = ok ? __ldg(a.codes + idx) : 0u;
        sd.val[slot] = ok ? __ldg(a.absmax2 + (idx >> a.log2_nested_bs)) : 0.0f;
      }
    }
  };

  float out[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) out[nt][0] = out[nt][1] = out[nt][2] = out[nt][3] = 0.0f;

  // This lane's scales for a chunk: float32 absmax, or decoded from the double-quant code exactly as
  // quant.dequantize_ref does, map[code] · absmax2[idx / nested_bs] + offset, each step rounded.
  auto decode_scales = [&](const Sd& sd, float (&s_mine)[kSlots]) {
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot)
      s_mine[slot] = a.codes == nullptr ? sd.val[slot]
                                        : __fadd_rn(__fmul_rn(map_s[sd.code[slot]], sd.val[slot]), a.offset);
  };

  auto compute = [&](int c, const char* stage, const Sd& sd, const float (&s_mine)[kSlots]) {
    uint32_t w[2][4];
    read_row<NBPC>(w[0], stage, g, t);
    read_row<NBPC>(w[1], stage, g + 8, t);
#pragma unroll
    for (int j = 0; j < NBPC; ++j) {
      if (c * kChunk + j * (kChunk / NBPC) >= K) break;  // warp-uniform: the tail chunk holds fewer blocks
      float acc[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
      // block j's words: 4/NBPC of them, two MMA k-steps each (bytes 0,1 then 2,3)
#pragma unroll
      for (int q = j * (4 / NBPC); q < (j + 1) * (4 / NBPC); ++q) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const uint32_t a0 = lookup(tbl, w[0][q], lane4, 2 * s), a2 = lookup(tbl, w[0][q], lane4, 2 * s + 1);
          const uint32_t a1 = lookup(tbl, w[1][q], lane4, 2 * s), a3 = lookup(tbl, w[1][q], lane4, 2 * s + 1);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4 xq = sd.x[nt][q];
            mma16816<T>(acc[nt], a0, a1, a2, a3, s ? xq.z : xq.x, s ? xq.w : xq.y);
          }
        }
      }
      // rows g and g + 8 of block j: value j·16 + row, held by lane (j·16 + row) % 32 in slot j / 2
      const float s0 = __shfl_sync(0xffffffffu, s_mine[kSlots == 2 ? j >> 1 : 0], (j * 16 + g) & 31);
      const float s1 = __shfl_sync(0xffffffffu, s_mine[kSlots == 2 ? j >> 1 : 0], (j * 16 + g + 8) & 31);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        out[nt][0] = fmaf(s0, acc[nt][0], out[nt][0]);
        out[nt][1] = fmaf(s0, acc[nt][1], out[nt][1]);
        out[nt][2] = fmaf(s1, acc[nt][2], out[nt][2]);
        out[nt][3] = fmaf(s1, acc[nt][3], out[nt][3]);
      }
    }
  };

  // The pipeline. Weights stream through the ring with cp.async: chunk c + kStages - 1 is requested before chunk c
  // is decoded, and cp.async.wait_group waits for chunk c alone, so kStages - 1 chunks (5 KB per warp) stay in
  // flight. (Version 5 kept the ring in registers: the compiler gives all outstanding global loads one scoreboard,
  // so the first use of chunk c also waited for the chunks requested after it — one full memory latency per chunk,
  // 1.3 TB/s whatever the depth.) x and the scales are small L2 hits and ride in registers one chunk ahead; `dep`, a
  // zero the compiler cannot see through, makes their next loads wait for this chunk's values, so that first use
  // never waits for loads issued after it.
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < n_mine) copy_chunk(chunk_of(i), i);
    copy_commit();  // empty groups too: the group count stays one per chunk
  }
  __syncthreads();  // the table and map (and nothing of the ring: each warp's ring is its own)
  Sd side[2];
  if (n_mine > 0) load_side(chunk_of(0), side[0], 0);
  auto step = [&](int i, int stage, Sd& cur, Sd& nxt) {  // the warp's i-th chunk
    const int c = chunk_of(i);
    copy_wait<kStages - 2>();
    __syncwarp();  // every lane's copies of chunk c are visible, and every lane is done with the previous stage
    // every register of `cur` is used (or folded into dep) before the next chunk's loads are issued
    float s_mine[kSlots];
    decode_scales(cur, s_mine);
    uint32_t seen = __float_as_uint(s_mine[kSlots - 1]) ^ __float_as_uint(s_mine[0]);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int q = 0; q < 4; ++q) seen ^= cur.x[nt][q].x ^ cur.x[nt][q].y ^ cur.x[nt][q].z ^ cur.x[nt][q].w;
    const int dep = static_cast<int>(seen & static_cast<uint32_t>(a.zero));
    if (i + kStages - 1 < n_mine) copy_chunk(chunk_of(i + kStages - 1), stage == 0 ? kStages - 1 : stage - 1);
    copy_commit();
    if (i + 1 < n_mine) load_side(chunk_of(i + 1), nxt, dep);
    compute(c, ring + stage * 1024, cur, s_mine);
  };
  int stage = 0;
  for (int i = 0; i < n_mine; i += 2) {
    step(i, stage, side[0], side[1]);
    stage = stage + 1 == kStages ? 0 : stage + 1;
    if (i + 1 < n_mine) {
      step(i + 1, stage, side[1], side[0]);
      stage = stage + 1 == kStages ? 0 : stage + 1;
    }
  }
  copy_wait<0>();

  // split-K reduction over each row tile's warps, through the (now free) table memory: red[warp][nt][i][lane]
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
    const int n = (blockIdx.x * wr_count + tr) * kTileRows + (l >> 2) + 8 * (i >> 1);
    const int m = m0 + 8 * nt + 2 * (l & 3) + (i & 1);
    if (n < N && m < a.M) y[int64_t(m) * N + n] = from_float<T>(sum);
  }
}

}  // namespace gemv
}  // namespace cuda
}  // namespace minqlora
