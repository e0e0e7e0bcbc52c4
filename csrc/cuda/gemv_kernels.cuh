// The fused 4-bit GEMV / small GEMM: y = x · dequant(W)ᵀ for few rows of x, read straight from bitsandbytes'
// bytes. It implements F.linear(x, quant.dequantize_ref(packed, state).to(x.dtype)) (minqlora/quant.py) for
// x (M, K) in bf16 or fp16, W (N, K) packed NF4/FP4 with float32 or double-quantized absmax, K a multiple of 32
// and of the blocksize. The launch choices are gemv_dispatch.cuh, the torch side gemv_ops.cpp.
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
//   weight) or fp16 (≤ 2^-12); the scale and the sums stay fp32.
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

// Lane t's 16 bytes of a chunk come in NBPC runs, one per quantization block of the chunk: run j starts at byte
// chunk·64 + j·(64/NBPC) + t·(16/NBPC) of the row, and word q of the lane is in run q / (4/NBPC).
// The 16 bytes (4 words) of lane t for one row and chunk; p = the row's chunk start + t·(16/NBPC) (run 0).
// Zeros where the row does not exist or, in the tail chunk, the block run does not (k0 >= K).
template <int NBPC>
__device__ __forceinline__ void load_row_chunk(uint32_t (&w)[4], const uint8_t* p, bool row_ok, int k_chunk, int K) {
#pragma unroll
  for (int j = 0; j < NBPC; ++j) {
    const bool ok = row_ok && k_chunk + j * (kChunk / NBPC) < K;  // whole blocks: K % bs == 0
    const uint8_t* q = p + j * (64 / NBPC);
    if constexpr (NBPC == 1) {
      const uint4 v = ok ? load_stream16(q) : make_uint4(0, 0, 0, 0);
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (NBPC == 2) {
      const uint2 v = ok ? load_stream8(q) : make_uint2(0, 0);
      w[2 * j] = v.x, w[2 * j + 1] = v.y;
    } else {
      w[j] = ok ? load_stream4(q) : 0u;
    }
  }
}

// 8 values of x (one uint4) per word q: the k's that word q's bytes encode, in the same order. xrow = this lane's
// token row + 2·(chunk start + t·(16/NBPC)) elements.
template <int NBPC>
__device__ __forceinline__ void load_x_chunk(uint4 (&xv)[4], const uint16_t* xrow, bool tok_ok, int k_chunk, int K) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    constexpr int kWordsPerRun = 4 / NBPC;
    const int run = q / kWordsPerRun;
    const bool ok = tok_ok && k_chunk + run * (kChunk / NBPC) < K;
    const int off = 2 * (run * (64 / NBPC) + 4 * (q % kWordsPerRun));  // elements past xrow
    xv[q] = ok ? __ldg(reinterpret_cast<const uint4*>(xrow + off)) : make_uint4(0, 0, 0, 0);
  }
}

// ---- shared memory ---------------------------------------------------------------------------------------------
// The pair table sits at a 32 KB-aligned shared address, so a lookup address is one LOP3 away from the byte:
// ((w >> s) & 0x7f80) | (table + 4·lane). The 256-entry map and the split-K reduction buffers take the part of the
// allocation before or after it.
template <int RT, int NT>
struct Smem {
  static constexpr int kRedFloats = 2 * kWarps * RT * NT * 128;  // double-buffered: one tile group in flight
  static constexpr int kOtherBytes = 256 * 4 + kRedFloats * 4;
  static constexpr int kTableBytes = kTableWords * 4;             // 32 KB
  // table at offset o in [0, 32 KB): the other part fits before it (o >= kOtherBytes) or after it
  static constexpr int kBytes = kTableBytes + 2 * kOtherBytes > 2 * kTableBytes ? kTableBytes + 2 * kOtherBytes
                                                                                 : 2 * kTableBytes;
};

__device__ __forceinline__ uint32_t shared_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The two values of packed byte i (0..3) of w, as an A-operand register (low half = high nibble = lower k).
// table_bytes is the table's generic address; lane4 = 4·lane (the lane's copy).
__device__ __forceinline__ uint32_t lookup(const uint8_t* table_bytes, uint32_t lane4, uint32_t w, int i) {
  const uint32_t shifted = i == 0 ? (w << 7) : (w >> (8 * i - 7));
  return *reinterpret_cast<const uint32_t*>(table_bytes + ((shifted & 0x7f80u) | lane4));
}

// Registers of one work item (a 16·RT-row tile group × one 128-value chunk): the packed words and the raw scales
// (a double-quant code and its second-level absmax, or the float32 absmax), loaded P items ahead.
template <int NBPC, int RT>
struct Stage {
  uint32_t w[RT][2][4];
  uint32_t code[RT][2][NBPC];
  float s2[RT][2][NBPC];
};

// y (M, N) = x (M, K) · dequant(W)ᵀ. Persistent: each CTA builds the table once and walks tile groups
// blockIdx.x, blockIdx.x + gridDim.x, ... (16·RT rows each); its 8 warps split K into equal runs of chunks; a warp's
// items (tile group, chunk) stream through a ring of P register stages. Token group blockIdx.y: 8·NT rows of x.
template <typename T, int NBPC, int NT, int RT, int P, bool DQ>
__global__ void __launch_bounds__(kThreads, 2) gemv_4bit_kernel(const Args a) {
  using S = Smem<RT, NT>;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t base = shared_addr(smem_raw);
  const uint32_t table_off = ((base + S::kTableBytes - 1) & ~uint32_t(S::kTableBytes - 1)) - base;
  uint8_t* const table_bytes = smem_raw + table_off;
  uint8_t* const other = table_off >= uint32_t(S::kOtherBytes) ? smem_raw : table_bytes + S::kTableBytes;
  float* const map_s = reinterpret_cast<float*>(other);          // [256]
  float* const red = map_s + 256;                                 // [2][kWarps][RT·NT·128]
  {
    uint32_t* table = reinterpret_cast<uint32_t*>(table_bytes);
    const float* codes = kGemvCodes[a.quant_type];
    for (int i = threadIdx.x; i < kTableWords; i += kThreads) {
      const int byte = i >> 5;
      table[i] = pack_pair<T>(codes[byte >> 4], codes[byte & 15]);
    }
    if (DQ) map_s[threadIdx.x] = a.map[threadIdx.x];  // kThreads == 256
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;  // MMA fragment coordinates: group (row / token) and thread in group
  const uint32_t lane4 = 4u * lane;
  const int K = a.K, N = a.N;
  const int64_t row_bytes = K / 2;
  const int blocks_per_row = K >> a.log2_bs;

  // Every warp gets the same number of items per tile group (nc; chunks past K are empty items), so tile-group
  // boundaries, and the __syncthreads() at each, fall on the same item for the whole CTA.
  const int chunks = (K + kChunk - 1) / kChunk;
  const int nc = (chunks + kWarps - 1) / kWarps;
  const int c_first = warp * nc;
  const int groups = (N + kTileRows * RT - 1) / (kTileRows * RT);
  const int my_groups = blockIdx.x < groups ? (groups - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  const int items = my_groups * nc;

  const int m0 = blockIdx.y * 8 * NT;
  const uint16_t* xrows[NT];
  bool tok_ok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = m0 + 8 * nt + g;
    tok_ok[nt] = m < a.M;
    xrows[nt] = static_cast<const uint16_t*>(a.x) + int64_t(tok_ok[nt] ? m : 0) * K;
  }

  // Cursors (chunk, tile group) of the next item to load and of the item being computed: advanced one item at a
  // time, so no division per item; 32-bit offsets (the launcher keeps N·K < 2^32).
  const uint8_t* const packed = a.packed;
  int ld_c = c_first, ld_tg = blockIdx.x;
  uint32_t row_off[RT][2], scale_off[RT][2];
  bool row_ok[RT][2];
  auto set_rows = [&](int tg) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = (tg * RT + r) * kTileRows + g + 8 * h;
        row_ok[r][h] = n < N;
        const uint32_t nn = n < N ? uint32_t(n) : 0u;
        row_off[r][h] = nn * uint32_t(row_bytes) + uint32_t(t * (16 / NBPC));
        scale_off[r][h] = nn * uint32_t(blocks_per_row);
      }
  };
  set_rows(ld_tg);

  auto load_stage = [&](Stage<NBPC, RT>& st) {
    const int kc = ld_c * kChunk;
    const bool chunk_ok = ld_c < chunks;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool ok = row_ok[r][h] && chunk_ok;
        load_row_chunk<NBPC>(st.w[r][h], packed + row_off[r][h] + uint32_t(ld_c * 64), ok, kc, K);
#pragma unroll
        for (int j = 0; j < NBPC; ++j) {
          const int k0 = kc + j * (kChunk / NBPC);
          const bool bok = ok && k0 < K;
          const uint32_t idx = scale_off[r][h] + uint32_t(k0 >> a.log2_bs);
          if (DQ) {
            st.code[r][h][j] = bok ? __ldg(a.codes + idx) : 0u;
            st.s2[r][h][j] = bok ? __ldg(a.absmax2 + (idx >> a.log2_nested_bs)) : 0.0f;
          } else {
            st.s2[r][h][j] = bok ? __ldg(a.absmax + idx) : 0.0f;
          }
        }
      }
    }
    if (++ld_c == c_first + nc) {
      ld_c = c_first;
      ld_tg += gridDim.x;
      set_rows(ld_tg);
    }
  };

  float out[RT][NT][4];
  auto zero_out = [&] {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) out[r][nt][0] = out[r][nt][1] = out[r][nt][2] = out[r][nt][3] = 0.0f;
  };
  zero_out();

  // x: prefetched one item ahead where it fits in registers (NT <= 2), else read when its item starts (L1/L2)
  constexpr bool kPrefetchX = NT <= 2;
  uint4 xv[NT][4], xn[kPrefetchX ? NT : 1][4];
  const int x_lane = 2 * t * (16 / NBPC);  // elements: lane t's first run in a chunk
  auto load_x = [&](int c, uint4 (&xd)[kPrefetchX ? NT : 1][4]) {
#pragma unroll
    for (int nt = 0; nt < (kPrefetchX ? NT : 1); ++nt)
      load_x_chunk<NBPC>(xd[nt], xrows[nt] + c * kChunk + x_lane, tok_ok[nt] && c < chunks, c * kChunk, K);
  };

  auto compute = [&](int c, const Stage<NBPC, RT>& st) {
    if (c >= chunks) return;  // warp-uniform: an empty item
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
            const uint32_t a0 = lookup(table_bytes, lane4, st.w[r][0][q], 2 * s);
            const uint32_t a2 = lookup(table_bytes, lane4, st.w[r][0][q], 2 * s + 1);
            const uint32_t a1 = lookup(table_bytes, lane4, st.w[r][1][q], 2 * s);
            const uint32_t a3 = lookup(table_bytes, lane4, st.w[r][1][q], 2 * s + 1);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const uint32_t b0 = s ? xv[nt][q].z : xv[nt][q].x, b1 = s ? xv[nt][q].w : xv[nt][q].y;
              mma16816<T>(acc[nt], a0, a1, a2, a3, b0, b1);
            }
          }
        }
        float sc[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // quant.dequantize_ref's absmax: map[code] · absmax2 + offset, each step rounded
          sc[h] = DQ ? __fadd_rn(__fmul_rn(map_s[st.code[r][h][j]], st.s2[r][h][j]), a.offset) : st.s2[r][h][j];
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          out[r][nt][0] = fmaf(sc[0], acc[nt][0], out[r][nt][0]);
          out[r][nt][1] = fmaf(sc[0], acc[nt][1], out[r][nt][1]);
          out[r][nt][2] = fmaf(sc[1], acc[nt][2], out[r][nt][2]);
          out[r][nt][3] = fmaf(sc[1], acc[nt][3], out[r][nt][3]);
        }
      }
    }
  };

  // split-K reduction of tile group `tg` over the 8 warps (red[buffer][warp][r][nt][i][lane]), then y
  constexpr int kPerWarp = RT * NT * 4 * 32;
  T* const y = static_cast<T*>(a.y);
  auto reduce = [&](int tg, int buffer) {
    float* rb = red + buffer * kWarps * kPerWarp;
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) rb[warp * kPerWarp + ((r * NT + nt) * 4 + i) * 32 + lane] = out[r][nt][i];
    __syncthreads();
    for (int e = threadIdx.x; e < kPerWarp; e += kThreads) {
      float sum = 0.0f;
#pragma unroll
      for (int v = 0; v < kWarps; ++v) sum += rb[v * kPerWarp + e];
      const int l = e & 31, i = (e >> 5) & 3, rn = e >> 7;  // rn = r·NT + nt
      const int r = rn / NT, nt = rn % NT;
      const int n = (tg * RT + r) * kTileRows + (l >> 2) + 8 * (i >> 1);
      const int m = m0 + 8 * nt + 2 * (l & 3) + (i & 1);
      if (n < N && m < a.M) y[int64_t(m) * N + n] = from_float<T>(sum);
    }
    zero_out();
  };

  Stage<NBPC, RT> st[P];
#pragma unroll
  for (int s = 0; s < P; ++s)
    if (s < items) load_stage(st[s]);
  int cp_c = c_first, cp_tg = blockIdx.x, cp_k = 0;  // compute cursor; cp_k counts finished tile groups
  if (kPrefetchX && items > 0) load_x(cp_c, xn);

  for (int i0 = 0; i0 < items; i0 += P) {
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int i = i0 + s;
      if (i < items) {  // CTA-uniform
        const bool last = cp_c + 1 == c_first + nc;  // CTA-uniform: every warp ends the tile group here
        if constexpr (kPrefetchX) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) xv[nt][q] = xn[nt][q];
          if (i + 1 < items) load_x(last ? c_first : cp_c + 1, xn);
        } else {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            load_x_chunk<NBPC>(xv[nt], xrows[nt] + cp_c * kChunk + x_lane, tok_ok[nt] && cp_c < chunks,
                               cp_c * kChunk, K);
        }
        compute(cp_c, st[s]);
        if (i + P < items) load_stage(st[s]);
        if (last) {
          reduce(cp_tg, cp_k & 1);
          cp_c = c_first;
          cp_tg += gridDim.x;
          ++cp_k;
        } else {
          ++cp_c;
        }
      }
    }
  }
}

}  // namespace gemv
}  // namespace cuda
}  // namespace minqlora
