// The one-token fused 4-bit GEMV (decoding, M = 1): y = x · dequant(W)ᵀ with every operand streamed through shared
// memory by cp.async. It implements F.linear(x, quant.dequantize_ref(packed, state).to(x.dtype)) (minqlora/quant.py)
// like gemv_kernels.cuh, with the same tiles, pair table, MMAs and split-K reduction (gemv_common.cuh); the
// launcher is gemv.cu.
//
// Why a second kernel: in the register-ring kernel ptxas puts the global loads (weights, x, scales) and the table
// lookups (LDS) on shared scoreboards, so waiting for a lookup waits for the loads still in flight too; long
// scoreboard was 36-44 % of its stalls on the H200. Here a warp's global traffic is cp.async into its own ring of
// kStreamStages chunks (weights 1 KB, x 256 B, the raw block scales), and cp.async.wait_group waits for exactly the
// chunk about to be decoded; the warp itself only reads shared memory. x comes from the ring as well, so L1 no longer
// has to hold it (which is what made the largest shared-memory carveout slow for version 6, git history).
// One token only: x for 8 tokens would make a stage 3 KB and leave one CTA per SM.
//
// Where the L1 pipe's time goes (Nsight Compute, 14336x4096 in tiles, kStreamStaged): 89 LSU wavefronts per warp and
// 1 KB chunk, 49 of them shared loads (32 pair-table lookups, the staged weights, x and scales) and ~37 the cp.async
// copies, of which the block scales' are the costliest per byte: 32 lanes gather one code word from each of 16
// rows, 16 cache lines for 32 bytes. So each warp copies its rows' raw scales for a run of chunks at once
// (kStreamCodeWindow: codes for 16 chunks, 16 rows × up to 36 contiguous bytes; float32 absmax for 8, up to 64) into
// the pair table's unused half. With double quantization: -9 % on 14336x4096, -20 % on 28672x8192, -3 % on
// 4096x14336 (H200, tiles, bench_gemv.py; benchmarks/README.md). Measured
// and dropped (git history): the weights and x by TMA bulk copies on per-stage mbarriers, which the LSU does not
// execute: 2-16 % slower than the windows alone in tiles, 1.5-2.5x slower in rows (16 copies of 64 bytes a chunk);
// and the same windows in the register ring (gemv_kernels.cuh) at 2-16 tokens: 8-17 % slower there than its own
// per-chunk loads of the codes (a cp.async wait every 16 chunks in a register pipeline, and spills).
#pragma once

#include "gemv_common.cuh"
#include "pdl.cuh"

namespace minqlora {
namespace cuda {
namespace gemv {

// Ring depth: 4 stages = two pairs of chunks; a warp decodes one pair while the next is in flight (2 KB of weights per
// warp, 32 KB per SM at two CTAs of 8 warps: a 4.2 TB/s H200 needs ~30 GB/s per SM, so ~25 KB in flight at ~0.8 µs
// loaded latency). Two chunks per step because one chunk's work is a few short dependent chains (weights -> lookups
// -> 4 accumulating MMAs a block): with one chunk per step and 4 warps per scheduler, short scoreboard and fixed-
// latency waits were 40 % of the stalls (Nsight Compute, 14336x4096).
constexpr int kStreamStages = 4;
// How the block scales reach the ring (the header): per chunk with the other operands, or by windows of codes (double
// quantization) or of float32 absmax. The launcher picks the window kind from the weights; a kernel asked for one
// the weights do not have copies per chunk.
enum StreamMode { kStreamStaged = 0, kStreamCodeWindow = 1, kStreamFloatWindow = 2 };
// Scale windows: a run of chunks of one row's raw scales in one 128-byte hole of the pair table (the words 32..63 of
// a byte value's row, which lookups never read): hole (warp, buffer, r) = table row (2·warp + buffer)·16 + r, the
// data 4·r bytes in, so the 16 rows of a lane's reads sit in 16 different banks; 8 warps × 2 buffers × 16 rows =
// the 256 holes. Double quantization: 16 chunks of codes (up to 32 bytes at blocksize 64, 16 at 128+, plus up to 3
// of word alignment; absmax2 still comes per chunk, one value for several rows). float32 absmax: 8 chunks, up to 64
// bytes.
template <int NBPC>
constexpr int window_words(bool dq) { return dq ? (3 + 16 * NBPC + 3) / 4 : 8 * NBPC; }
static_assert(4 * 15 + 4 * 16 <= 128, "a row's window fits its hole");
__device__ __forceinline__ int window_hole(int warp, int buffer, int r) {
  return ((2 * warp + buffer) * 16 + r) * (kRowWords * 4) + 128 + 4 * r;
}
static_assert(kWarps * 2 * 16 == 256, "one hole of the pair table per warp, buffer and row");
template <int NBPC>
constexpr int stream_slots() { return NBPC == 4 ? 2 : 1; }
// One stage of a warp's ring: weights [16 rows][64 B] (16-byte units swizzled), x [128 values], then per slot the
// 32 lanes' raw scale words: the 4-byte word holding the double-quant code, and absmax2 (or the float32 absmax).
constexpr int kStageX = 1024, kStageScales = 1280;
template <int NBPC>
constexpr int stage_bytes() { return kStageScales + stream_slots<NBPC>() * 256; }
template <int NBPC>
constexpr int stream_smem_bytes() { return kTableBytes + kWarps * kStreamStages * stage_bytes<NBPC>(); }
// Two CTAs per SM fit in the H200's 228 KB (1 KB of it reserved per CTA) for blocksizes >= 64; blocksize 32 (two
// scale slots a stage) takes the register ring.
static_assert(2 * (stream_smem_bytes<2>() + 1024) <= 228 * 1024, "two streaming CTAs per SM");

// cp.async global -> shared; bytes beyond src_bytes (0 = all) are zero-filled and not read. 16 bytes through L2
// only (weights are read once); 8 and 4 bytes must go through L1 (.ca).
__device__ __forceinline__ void copy16(uint32_t dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void copy8(uint32_t dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 8 : 0) : "memory");
}
__device__ __forceinline__ void copy4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void copy_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Row r's four 16-byte units are stored XOR-swizzled, unit u at u ^ swizzle(r), so the fragment reads hit 32
// distinct banks: without it the lanes of rows g and g + 2 read the same units of their rows, 128 bytes apart.
template <int NBPC>
__device__ __forceinline__ int swizzle(int r) {
  return NBPC == 4 ? (r >> 1) & 3 : NBPC == 2 ? ((r >> 1) & 1) << 1 : 0;
}

// Lane t's 4 words of row r from a stage, in word_offset's order (one 16-, two 8- or four 4-byte reads).
template <int NBPC>
__device__ __forceinline__ void read_row(uint32_t (&w)[4], const char* stage, int r, int t) {
  const char* row = stage + r * 64;
#pragma unroll
  for (int j = 0; j < NBPC; ++j) {
    const int off = word_offset<NBPC>(j * (4 / NBPC), t);
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

// One window's copies (see window_words): row r of the tile (past N, row N - 1) from block `first`, as kWords 4-byte
// words; codes (one byte a block) from the row's aligned word at or before it, float32 absmax from it. src / bytes:
// the array and its size in bytes; zero past its end.
template <int kWords, bool kCodes>
__device__ __forceinline__ void copy_scale_window(uint32_t smem_s, int warp, int buffer, int lane, int tile, int N,
                                                  int blocks_per_row, int first, const uint8_t* src, int bytes) {
#pragma unroll
  for (int e0 = 0; e0 < 16 * kWords; e0 += 32) {
    const int e = e0 + lane, r = e / kWords, word = e % kWords;
    if (e < 16 * kWords) {
      const int row0 = min(tile * kTileRows + r, N - 1) * blocks_per_row + first;
      const int start = kCodes ? (row0 & ~3) + 4 * word : 4 * (row0 + word);
      copy4(smem_s + window_hole(warp, buffer, r) + 4 * word, src + min(start, bytes - 1) / 4 * 4,
            max(0, min(4, bytes - start)));
    }
  }
}

// x (1, K) T; W rows 16·wr_count from bx·16·wr_count (bx: the CTA's index among its weight's); warp w computes row
// tile w % wr_count over the chunks split w / wr_count of 8 / wr_count (the partial last chunk included: its missing
// blocks arrive as zero x and zero or finite scales, so they add exactly 0). Needs a.codes 4-byte aligned (the
// launcher checks).
template <typename T, int NBPC, bool kGroup, int kMode>
__global__ void __launch_bounds__(kThreads, 2) gemv_4bit_stream_kernel(const Launch L) {
  extern __shared__ __align__(16) uint32_t smem[];
  int bx, wr_count;
  const Args a = member<kGroup>(L, bx, wr_count);
  static_assert(NBPC <= 2, "blocksize 32 takes the register ring");
  constexpr int S = kStreamStages, SB = stage_bytes<NBPC>(), kSlots = stream_slots<NBPC>();
  constexpr bool kCodeWin = kMode == kStreamCodeWindow, kFloatWin = kMode == kStreamFloatWindow;
  constexpr int kLog2Win = kCodeWin ? 4 : 3, kWinChunks = 1 << kLog2Win;  // chunks a window covers
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t lane4 = 4u * lane;
  const int K = a.K, N = a.N;
  const int wr = warp % wr_count, splits = kWarps / wr_count, ks = warp / wr_count;
  const int tile = bx * wr_count + wr;
  const int chunks = (K + kChunk - 1) / kChunk;
  // warps past splits·wr_count (a row-tile count that does not divide 8) are idle, as in gemv_kernels.cuh
  const int c_begin = ks < splits ? ks * chunks / splits : 0, c_end = ks < splits ? (ks + 1) * chunks / splits : 0;

  char* ring = reinterpret_cast<char*>(smem) + kTableBytes + warp * S * SB;
  const float* map_s = reinterpret_cast<const float*>(smem + kTableWords);
  const char* tbl = reinterpret_cast<const char*>(smem);
  const float offset = a.offset;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  // What this lane copies per chunk: unit t (k = 32t .. 32t + 31 of the chunk) of rows g and g + 8 (past N: row
  // N - 1; dropped at the store), 4 values of x, and the raw scale(s) of row L & 15, block (L >> 4) + 2·slot.
  const uint8_t* wsrc[2];
  uint32_t wdst[2];
  int64_t wstride;  // bytes from one chunk of a row to the next
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = g + 8 * h;
    wsrc[h] = row_lane_ptr(a, tile, r, 16 * t, wstride);
    wdst[h] = r * 64 + ((t ^ swizzle<NBPC>(r)) << 4);
  }
  const uint16_t* xsrc = static_cast<const uint16_t*>(a.x) + 4 * lane;
  const int blocks_per_row = K >> a.log2_bs;
  const int n_blocks = N * blocks_per_row;
  const int row_base = min(tile * kTileRows + (lane & 15), N - 1) * blocks_per_row;  // this lane's row's block 0
  const int s_lane = row_base + (NBPC == 1 ? 0 : lane >> 4);
  const int log2_bs = a.log2_bs, log2_nbs = a.log2_nested_bs;
  const bool dq = a.codes != nullptr;
  const bool window = kCodeWin ? dq : kFloatWin && !dq;
  // the first block of chunk c in its row
  auto chunk_block = [&](int c) { return NBPC == 1 ? (c * kChunk) >> log2_bs : c * NBPC; };
  // the scale index of (chunk c, slot), or s_lane (a valid index, its value zero-filled) for a block past K
  auto s_idx = [&](int c, int slot, bool& ok) {
    ok = NBPC == 1 || c * kChunk + ((lane >> 4) + 2 * slot) * (kChunk / NBPC) < K;
    return ok ? s_lane + chunk_block(c) + (NBPC == 1 ? 0 : 2 * slot) : s_lane;
  };

  // Window i of this warp: the raw scales of chunks [c_begin + i·kWinChunks, + kWinChunks) of its 16 rows.
  auto copy_window = [&](int i) {
    const int first = chunk_block(c_begin + i * kWinChunks);
    if constexpr (kCodeWin) {
      copy_scale_window<window_words<NBPC>(true), true>(smem_s, warp, i & 1, lane, tile, N, blocks_per_row, first,
                                                        a.codes, n_blocks);
    } else {
      copy_scale_window<window_words<NBPC>(false), false>(smem_s, warp, i & 1, lane, tile, N, blocks_per_row, first,
                                                          reinterpret_cast<const uint8_t*>(a.absmax), 4 * n_blocks);
    }
  };
  // This lane's raw scale of block idx of chunk c from its window: the code byte idx - (the row's aligned start), or
  // the float idx - (the row's first block). A block past K (ok false: its x is zero, so any finite scale adds 0)
  // reads the window's first unit.
  auto window_unit = [&](int c, int idx, bool ok) {
    const int i = (c - c_begin) >> kLog2Win;
    const int first = row_base + chunk_block(c_begin + i * kWinChunks);
    const char* hole = tbl + window_hole(warp, i & 1, lane & 15);
    if constexpr (kCodeWin) return uint32_t(*reinterpret_cast<const uint8_t*>(hole + (ok ? idx - (first & ~3) : 0)));
    else return *reinterpret_cast<const uint32_t*>(hole + (ok ? 4 * (idx - first) : 0));
  };

  // A chunk's copies in two parts: the frozen weights and scales, which a PDL prologue may request before the
  // previous kernel is done (pdl.cuh), and x, which that kernel may still be writing.
  auto copy_x = [&](int c, int stage) {
    const int kc = c * kChunk;
    copy8(ring_s + stage * SB + kStageX + 8 * lane, xsrc + kc, kc + 4 * lane < K);
  };
  auto copy_weights = [&](int c, int stage) {
    const uint32_t base = ring_s + stage * SB;
    const int kc = c * kChunk;
#pragma unroll
    for (int h = 0; h < 2; ++h) copy16(base + wdst[h], wsrc[h] + c * wstride, kc + 32 * t < K);
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot) {
      bool ok;
      const int idx = s_idx(c, slot, ok);
      const uint32_t dst = base + kStageScales + slot * 256 + 4 * lane;
      if (dq) {
        if (!window) {
          const int word = idx & ~3;  // the code's aligned word; the array may end inside it
          copy4(dst, a.codes + word, min(4, n_blocks - word));
        }
        copy4(dst + 128, a.absmax2 + (idx >> log2_nbs), ok ? 4 : 0);
      } else if (!window) {
        copy4(dst + 128, a.absmax + idx, ok ? 4 : 0);
      }
    }
  };
  auto copy_chunk = [&](int c, int stage) {
    copy_weights(c, stage);
    copy_x(c, stage);
  };

  // Decode one chunk from its stage into out.
  float out[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
  auto compute = [&](int c, int stage) {
    const char* st = ring + stage * SB;
    uint32_t w[2][4];
    read_row<NBPC>(w[0], st, g, t);
    read_row<NBPC>(w[1], st, g + 8, t);
    // x in the order of this lane's weight words: k = 2·word_offset, so byte 4·word_offset of the stage's x. Only
    // the lanes of B column 0 (g == 0) read it: columns 1..7 belong to tokens that do not exist and get zeros, which
    // cuts a 16-byte shared load of all 32 lanes (4 wavefronts) to one of 4 lanes.
    uint4 x[1][4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
      x[0][q] = g == 0 ? *reinterpret_cast<const uint4*>(st + kStageX + 4 * word_offset<NBPC>(q, t))
                       : make_uint4(0u, 0u, 0u, 0u);
    float s_mine[kSlots];
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot) {
      const char* sc = st + kStageScales + slot * 256 + 4 * lane;
      const float v = *reinterpret_cast<const float*>(sc + 128);
      bool ok;
      const int idx = s_idx(c, slot, ok);
      if (dq) {
        const uint32_t code = window ? window_unit(c, idx, ok) : *reinterpret_cast<const uint8_t*>(sc + (idx & 3));
        s_mine[slot] = dq_scale(map_s, code, v, offset);
      } else {
        s_mine[slot] = window ? __uint_as_float(window_unit(c, idx, ok)) : v;
      }
    }
    chunk_mma<T, NBPC, 1>(out, w, x, s_mine, tbl, lane4, g);
  };

  // The first pair's weights are requested before the table is built, so their latency overlaps the build, and
  // both before the wait for the previous kernel (a no-op unless launched with PDL); x after it. One commit group,
  // with the first scale window (in the table's holes, which the build does not write).
  if (window && c_begin < c_end) copy_window(0);
  if (c_begin < c_end) copy_weights(c_begin, 0);
  if (c_begin + 1 < c_end) copy_weights(c_begin + 1, 1);
  build_table<T>(smem, a);
  wait_prior_kernels();
  allow_next_kernel();  // the next PDL kernel may launch now and wait for this one
  if (c_begin < c_end) copy_x(c_begin, 0);
  if (c_begin + 1 < c_end) copy_x(c_begin + 1, 1);
  copy_commit();
  __syncthreads();

  // Pairs of chunks in stages {0, 1} and {2, 3} by turns: pair c, c + 1 is decoded while c + 2, c + 3 (one commit
  // group) is in flight, into the stages the previous pair was read from (every lane is past them: the __syncwarp).
  // The next scale window joins the group of a window's first pair, into the buffer its predecessor's chunks left.
  int stage = 0, c = c_begin;
  for (; c + 1 < c_end; c += 2) {
    if (c + 2 < c_end) copy_chunk(c + 2, stage ^ 2);
    if (c + 3 < c_end) copy_chunk(c + 3, (stage ^ 2) + 1);
    if (window && (c - c_begin) % kWinChunks == 0 && c + kWinChunks < c_end)
      copy_window((c - c_begin) / kWinChunks + 1);
    copy_commit();  // possibly empty: the wait below still means "all but the newest group"
    copy_wait<1>();
    __syncwarp();
    compute(c, stage);
    compute(c + 1, stage + 1);
    __syncwarp();
    stage ^= 2;
  }
  if (c < c_end) {  // an odd count: the last chunk, requested with the previous pair
    copy_wait<0>();
    __syncwarp();
    compute(c, stage);
  }
  reduce_store<T, 1>(smem, out, a, wr_count, 0, bx);
}

}  // namespace gemv
}  // namespace cuda
}  // namespace minqlora
