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
//   half2) register, replicated so lane l always reads bank l (conflict-free). Each byte value's row is 256 bytes
//   (64 KB, half of it unused) so one PRMT builds the lookup address (see lookup). Weights enter the tensor
//   cores as table values rounded to bf16 (≤ 2^-9 relative, the same bound as the reference's bf16 dequantized
//   weight) or fp16 (≤ 2^-12); the scale and the sums stay fp32. The table is written with 16-byte stores (four
//   lane copies each): a CTA covers only 16-128 rows, so its build is a real share of the CTA's work.
// - Each block scale is computed once per warp and chunk (lane L: row L % 16, block L / 16 of the chunk), loaded with
//   the weights, and handed to the four lanes of its row by shuffle.
// - Split-K inside the CTA: 8 warps share 16·wr_count output rows (wr_count 1-8, chosen at launch), the warps of a
//   row tile take contiguous runs of chunks; partial sums meet in shared memory and one pass writes y. No atomics,
//   no workspace, one launch (CUDA-graph friendly), deterministic. Chunks ride in a ring of registers, 2-3 deep.
// - The weight bytes come in bitsandbytes' row order or in layout.py's decode tiles (row_lane_ptr): only the lane
//   pointers and the chunk stride differ. In rows a load covers 64 bytes of each of 8 rows, which HBM serves at
//   2.6-3.0 TB/s; in tiles 512 contiguous bytes (4.2): 8-17 % faster at 4-16 tokens, 1-3 % at one.
// - What limits it (H200, Nsight Compute and the SASS, benchmarks/README.md): version 7 cut the hot loop from ~238
//   to ~130 instructions per warp and chunk and gained only 5-10 %, so issue is not the wall. Stalls: long
//   scoreboard 36-44 %, MIO throttle and short scoreboard ~12 % each; ptxas puts the global loads and the table
//   lookups (LDS) on shared scoreboards, so waiting for a lookup also waits for loads still in flight. Version 6
//   (git history) streamed the weights through a cp.async ring but ran with the largest shared-memory carveout,
//   which starves L1 of x. For the one-token kernel (gemv_stream.cuh) the busiest unit is the L1/shared pipe (79 %;
//   DRAM 33 %), and grids that leave some SMs one CTA and others two lose up to ~15 %.
#pragma once

#include "gemv_common.cuh"
#include "pdl.cuh"

namespace minqlora {
namespace cuda {
namespace gemv {

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

// The 16 bytes (4 words) of lane t for one row and chunk; p = the row's chunk start + t·16/NBPC. tail: the chunk
// holds only the blocks below K (zeros for the rest); otherwise no checks at all.
template <int NBPC>
__device__ __forceinline__ void load_row_chunk(uint32_t (&w)[4], const uint8_t* p, bool tail, int blocks) {
#pragma unroll
  for (int j = 0; j < NBPC; ++j) {
    const bool ok = !tail || j < blocks;
    const uint8_t* pj = p + j * (64 / NBPC);
    if constexpr (NBPC == 1) {
      const uint4 v = ok ? load_stream16(pj) : make_uint4(0, 0, 0, 0);
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (NBPC == 2) {
      const uint2 v = ok ? load_stream8(pj) : make_uint2(0, 0);
      w[2 * j] = v.x, w[2 * j + 1] = v.y;
    } else {
      w[j] = ok ? load_stream4(pj) : 0u;
    }
  }
}

// 8 values of x (one uint4) per word q: the k's that word q's bytes encode, in the same order. xp = the token's row
// at the chunk start (t's offset included: 2·t·16/NBPC elements).
// live: this lane's B column is a real token (otherwise zeros, no load: fewer L1 wavefronts below 8 tokens).
template <int NBPC>
__device__ __forceinline__ void load_x_chunk(uint4 (&xv)[4], const uint16_t* xp, bool tail, int blocks, bool live) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const bool ok = live && (!tail || q / (4 / NBPC) < blocks);
    xv[q] = ok ? __ldg(reinterpret_cast<const uint4*>(xp + 2 * word_offset<NBPC>(q, 0))) : make_uint4(0, 0, 0, 0);
  }
}

// Registers of one chunk in flight: this lane's 16 weight bytes of rows g and g + 8, its raw block scale(s), and
// (kXInStage) its x values.
template <int NBPC, int NT, bool kXInStage>
struct Stage {
  static constexpr int kSlots = NBPC == 4 ? 2 : 1;
  uint32_t w[2][4];
  uint32_t code[kSlots];
  float val[kSlots];  // absmax2 of the code's group, or the float32 absmax
  uint4 x[kXInStage ? NT : 1][4];
};

// How many chunks a warp keeps in registers (prefetch distance + 1): the 8 tokens of NT = 1 leave room for three,
// 16 tokens for two; at NT = 4 x is read when its chunk starts (an L1/L2 hit) and the weights run one chunk ahead.
template <int NT>
constexpr int stages() { return NT == 1 ? 3 : 2; }

// x (M, K) T, tokens m0 .. m0 + 8·NT of this CTA's token group; W rows 16·wr_count from bx·16·wr_count (bx: the
// CTA's index among its weight's, Launch). Warp w computes row tile w % wr_count over the k split w / wr_count of
// 8 / wr_count.
//
// Version 7: the same tiles and decode as version 5, with a main loop that holds no bounds check and no index math.
// Rows past N read row N - 1 and tokens past M read token M - 1 (valid memory; their outputs are dropped at the
// store), the warps split only the chunks that hold all their blocks, and the last warp of a row tile takes the
// partial chunk (K % 128, whole blocks) on its own, checked, after the loop. Every address is a lane pointer set up
// once and stepped by a constant per chunk. Version 5 spent ~238 instructions per warp and chunk (bf16, blocksize
// 64, M = 1), ~70 of them decode and MMAs and most of the rest address math and predicates rebuilt every chunk.
template <typename T, int NBPC, int NT, bool kGroup>
__global__ void __launch_bounds__(kThreads, NT == 4 ? 1 : 2) gemv_4bit_kernel(const Launch L) {
  extern __shared__ __align__(16) uint32_t smem[];
  int bx, wr_count;
  const Args a = member<kGroup>(L, bx, wr_count);
  build_table<T>(smem, a);
  wait_prior_kernels();  // x may come from the kernel before (a no-op unless launched with PDL: pdl.cuh)
  allow_next_kernel();
  __syncthreads();
  const float* map_s = reinterpret_cast<const float*>(smem + kTableWords);

  constexpr bool kXInStage = NT <= 2;
  constexpr int S = stages<NT>();
  using St = Stage<NBPC, NT, kXInStage>;
  constexpr int kSlots = St::kSlots;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;  // MMA fragment coordinates: group (row / token) and thread in group
  const uint32_t lane4 = 4u * lane;
  const char* tbl = reinterpret_cast<const char*>(smem);
  const int K = a.K, N = a.N, M = a.M;
  const int wr = warp % wr_count, splits = kWarps / wr_count, ks = warp / wr_count;
  const int tile = bx * wr_count + wr;

  // The chunks with all their blocks are split among the row tile's warps; a partial one (NBPC > 1 only: K is a
  // multiple of the blocksize) holds tail_blocks blocks and goes to the last warp.
  const int full = K / kChunk;
  const int tail_blocks = (K % kChunk) / (kChunk / NBPC);
  // With a row-tile count that does not divide 8 (rows_per_cta 48, 80, 96, 112) the warps past splits·wr_count
  // are idle: no chunks, no slot in the reduction.
  const int c_begin = ks < splits ? ks * full / splits : 0, c_end = ks < splits ? (ks + 1) * full / splits : 0;

  // Lane pointers at chunk 0. Rows g and g + 8 of the tile (C rows 0, 1 and 2, 3); past N, row N - 1.
  const uint8_t* wp[2];
  int64_t wstride;  // bytes from one chunk of a row to the next
#pragma unroll
  for (int h = 0; h < 2; ++h) wp[h] = row_lane_ptr(a, tile, g + 8 * h, t * (16 / NBPC), wstride);
  // Tokens: n-tile nt of the B operand is token m0 + 8·nt + g; past M, token M - 1.
  const int m0 = blockIdx.y * 8 * NT;
  const uint16_t* xp[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    xp[nt] = static_cast<const uint16_t*>(a.x) + int64_t(min(m0 + 8 * nt + g, M - 1)) * K + 2 * t * (16 / NBPC);
  // B column g of n-tile nt is a token below M: the others read nothing and multiply zeros. Up to 8 tokens only
  // (H200: M = 4 1-6 % faster); with 16+ the runtime predicate on every x load cost 7-20 % at M = 16.
  bool live[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) live[nt] = NT > 1 || m0 + 8 * nt + g < M;
  // Block scales, computed once per warp and chunk instead of by all four lanes of a row: lane L reads the raw
  // scale of row L & 15 for block (L >> 4) + 2·slot of the chunk (one block per chunk: lanes 16..31 repeat
  // 0..15), decodes it, and the lanes that need it take it by shuffle. s_idx(c, slot) is its index in absmax.
  const int blocks_per_row = K >> a.log2_bs;
  const int s_lane = min(tile * kTileRows + (lane & 15), N - 1) * blocks_per_row + (NBPC == 1 ? 0 : lane >> 4);
  const int log2_bs = a.log2_bs, log2_nbs = a.log2_nested_bs;
  auto s_idx = [&](int c, int slot) {
    return s_lane + (NBPC == 1 ? (c * kChunk) >> log2_bs : c * NBPC + 2 * slot);
  };
  const bool dq = a.codes != nullptr;
  const uint8_t* codes_g = a.codes;
  const float* absmax_g = dq ? a.absmax2 : a.absmax;
  const float offset = a.offset;

  auto load_stage = [&](bool tail, int c, St& st) {
    const int64_t cb = int64_t(c) * 64;  // x: 128 values = 2·64 elements a chunk
#pragma unroll
    for (int h = 0; h < 2; ++h) load_row_chunk<NBPC>(st.w[h], wp[h] + c * wstride, tail, tail_blocks);
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot) {
      // the tail's missing blocks read block 0 of the row (never used: compute stops at tail_blocks)
      const bool ok = !tail || (NBPC == 1 ? 0 : (lane >> 4) + 2 * slot) < tail_blocks;
      const int idx = ok ? s_idx(c, slot) : s_lane;
      if (dq) {
        st.code[slot] = __ldg(codes_g + idx);
        st.val[slot] = __ldg(absmax_g + (idx >> log2_nbs));
      } else {
        st.code[slot] = 0u;
        st.val[slot] = __ldg(absmax_g + idx);
      }
    }
    if constexpr (kXInStage) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) load_x_chunk<NBPC>(st.x[nt], xp[nt] + 2 * cb, tail, tail_blocks, live[nt]);
    }
  };

  float out[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) out[nt][0] = out[nt][1] = out[nt][2] = out[nt][3] = 0.0f;

  auto compute = [&](bool tail, int c, const St& st) {
    uint4 xl[kXInStage ? 1 : NT][4];
    if constexpr (!kXInStage) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        load_x_chunk<NBPC>(xl[nt], xp[nt] + int64_t(c) * 128, tail, tail_blocks, live[nt]);
    }
    // This lane's scales for the chunk: float32 absmax, or decoded from the double-quant code.
    float s_mine[kSlots];
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot)
      s_mine[slot] = dq ? dq_scale(map_s, st.code[slot], st.val[slot], offset) : st.val[slot];
    if constexpr (kXInStage) chunk_mma<T, NBPC, NT>(out, st.w, st.x, s_mine, tbl, lane4, g, tail ? tail_blocks : NBPC);
    else chunk_mma<T, NBPC, NT>(out, st.w, xl, s_mine, tbl, lane4, g, tail ? tail_blocks : NBPC);
  };

  // A ring of S chunks in registers: chunk c + S - 1 is requested before chunk c is decoded. The loop is unrolled
  // by S so every ring slot is a fixed set of registers (no copies between slots). (Prefetching unconditionally,
  // past the warp's last chunk, to keep loads out of branches measured no faster and spilled at M = 16.)
  St ring[S];
#pragma unroll
  for (int i = 0; i < S - 1; ++i)
    if (c_begin + i < c_end) load_stage(false, c_begin + i, ring[i]);
  for (int c0 = c_begin; c0 < c_end; c0 += S) {
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const int c = c0 + i;
      if (c < c_end) {  // warp-uniform
        if (c + S - 1 < c_end) load_stage(false, c + S - 1, ring[(i + S - 1) % S]);
        compute(false, c, ring[i]);
      }
    }
  }
  if (NBPC > 1 && tail_blocks > 0 && ks == splits - 1) {
    load_stage(true, full, ring[0]);
    compute(true, full, ring[0]);
  }

  reduce_store<T, NT>(smem, out, a, wr_count, m0, bx);
}

}  // namespace gemv
}  // namespace cuda
}  // namespace minqlora
