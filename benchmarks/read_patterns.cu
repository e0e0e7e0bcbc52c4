// How fast HBM delivers a 4-bit weight's bytes in the access patterns a GEMV kernel can choose: the layout question
// of issue 7 (bitsandbytes' row-major bytes read in tiles of 16 rows, against a layout whose tiles are contiguous).
// Plain CUDA, no torch, so it builds in seconds:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/read_patterns benchmarks/read_patterns.cu
//   /tmp/read_patterns [MiB]      (default 512: far beyond the 60 MB L2)
//
// Every pattern reads the same bytes once (16-byte loads, L1 bypassed, 64 warps per SM so latency is hidden by
// occupancy), folds them into one word per thread, and is timed with CUDA events, median of 15 after 3 warm-ups.
//   copy      : cudaMemcpy device to device (reads + writes: 2x the bytes), the usual "copy bandwidth" floor
//   linear    : the buffer as one stream, each warp 512 contiguous bytes per load instruction
//   rowsSEG   : the buffer as rows of `row` bytes (row = K / 2 of a 4-bit weight), each warp owning a tile of 16 rows
//               and walking it along the row SEG bytes at a time (SEG per row per step: 64 is what a 128-value
//               chunk of a 16-row MMA tile reads, gemv_stream.cuh)
//   split     : as rows64, but the tile's row split among 2 warps (the stream kernel's split-K)
//   schedule  : a one-token GEMV's memory schedule alone (schedule_kernel): per-warp bytes, bytes in flight, CTAs
//               per SM, one launch per weight-sized slice; the last per-warp size of each group fills exactly two
//               CTAs per SM (what an even split of the work would give)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                                  \
  do {                                                                                            \
    cudaError_t e_ = (x);                                                                         \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));     \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// 4 loads in flight per lane: 2 KB per warp.
__global__ void linear_kernel(const uint8_t* buf, int64_t bytes, uint32_t* sink) {
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int64_t gw = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  uint32_t acc = 0;
  for (int64_t off = gw * 2048; off < bytes; off += warps * 2048) {
    uint4 v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = load_stream(buf + off + i * 512 + 16 * lane);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc ^= fold(v[i]);
  }
  sink[int64_t(blockIdx.x) * blockDim.x + threadIdx.x] = acc;
}

// Tiles of 16 rows; warp (tile, part) reads bytes [part * row / parts, (part + 1) * row / parts) of each of the 16
// rows, SEG bytes of every row per step: lanes_per_row = SEG / 16 lanes cover one row's SEG bytes, so one load
// instruction covers 32 / lanes_per_row rows, and a step is 16 * SEG / 512 instructions (2 KB per warp in flight at
// SEG 64 and 128, by unrolling two steps at 64).
template <int SEG>
__global__ void rows_kernel(const uint8_t* buf, int64_t rows, int64_t row, int parts, uint32_t* sink) {
  constexpr int kLanesPerRow = SEG / 16, kRowsPerLoad = 32 / kLanesPerRow, kLoads = 16 / kRowsPerLoad;
  constexpr int kSteps = kLoads >= 4 ? 1 : 4 / kLoads;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int64_t gw = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int r_in = lane / kLanesPerRow, c_in = 16 * (lane % kLanesPerRow);
  const int64_t tiles = rows / 16, work = tiles * parts;
  const int64_t span = row / parts;
  uint32_t acc = 0;
  for (int64_t w = gw; w < work; w += warps) {
    const int64_t tile = w / parts, part = w % parts;
    const uint8_t* base = buf + tile * 16 * row + part * span + c_in;
    for (int64_t k = 0; k < span; k += kSteps * SEG) {
      uint4 v[kSteps * kLoads];
#pragma unroll
      for (int s = 0; s < kSteps; ++s)
#pragma unroll
        for (int i = 0; i < kLoads; ++i)
          v[s * kLoads + i] = load_stream(base + int64_t(i * kRowsPerLoad + r_in) * row + k + s * SEG);
#pragma unroll
      for (int i = 0; i < kSteps * kLoads; ++i) acc ^= fold(v[i]);
    }
  }
  sink[int64_t(blockIdx.x) * blockDim.x + threadIdx.x] = acc;
}

// A GEMV's memory schedule without its arithmetic: one launch per weight, warp w reading its own contiguous
// `per_warp` bytes (what a warp of a tiled GEMV owns), 512 bytes per load instruction, D loads (D/2 KB) in flight
// per warp in a rolling register ring. Dynamic shared memory (unused) caps the CTAs per SM like the kernel's table
// and ring do.
template <int D>
__global__ void schedule_kernel(const uint8_t* buf, int64_t per_warp, uint32_t* sink) {
  extern __shared__ uint32_t pad[];
  const int64_t gw = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const uint8_t* p = buf + gw * per_warp + 16 * lane;
  const int loads = int(per_warp / 512);
  uint4 v[D];
#pragma unroll
  for (int i = 0; i < D; ++i) v[i] = i < loads ? load_stream(p + 512 * i) : make_uint4(0, 0, 0, 0);
  uint32_t acc = 0;
  for (int i0 = 0; i0 < loads; i0 += D) {
#pragma unroll
    for (int i = 0; i < D; ++i) {
      acc ^= fold(v[i]);
      if (i0 + i + D < loads) v[i] = load_stream(p + 512 * (i0 + i + D));
    }
  }
  if (acc == 0x9e3779b9u) pad[0] = acc;  // keeps the loads; never true for the memset pattern
  sink[int64_t(blockIdx.x) * blockDim.x + threadIdx.x] = acc;
}

template <typename F>
float median_ms(F&& launch) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> t;
  for (int i = 0; i < 15; ++i) {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CHECK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  const int64_t mib = argc > 1 ? std::atoll(argv[1]) : 512;
  const int64_t bytes = mib << 20;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  uint8_t *buf, *dst;
  uint32_t* sink;
  constexpr int kThreads = 256;
  const int ctas = sms * 8;  // 64 warps per SM
  CHECK(cudaMalloc(&buf, bytes));
  CHECK(cudaMalloc(&dst, bytes));
  CHECK(cudaMalloc(&sink, int64_t(ctas) * kThreads * 4));
  CHECK(cudaMemset(buf, 1, bytes));
  auto report = [&](const char* name, int64_t row, float ms, double moved) {
    std::printf("%-10s row %6lld B  %8.3f ms  %6.2f TB/s\n", name, static_cast<long long>(row), ms,
                moved / (ms * 1e-3) / 1e12);
  };
  report("copy", 0, median_ms([&] { CHECK(cudaMemcpyAsync(dst, buf, bytes, cudaMemcpyDeviceToDevice)); }),
         2.0 * bytes);
  report("linear", 0, median_ms([&] { linear_kernel<<<ctas, kThreads>>>(buf, bytes, sink); }), bytes);
  // row = K / 2 for K = 4096, 8192, 14336, 28672 (the Llama-3-8B and Llama-2-70B projections)
  for (int64_t row : {2048, 4096, 7168, 14336}) {
    const int64_t rows = bytes / row / 16 * 16;
    const double moved = double(rows) * row;
    report("rows64", row, median_ms([&] { rows_kernel<64><<<ctas, kThreads>>>(buf, rows, row, 1, sink); }), moved);
    report("split64", row, median_ms([&] { rows_kernel<64><<<ctas, kThreads>>>(buf, rows, row, 2, sink); }), moved);
    report("rows128", row, median_ms([&] { rows_kernel<128><<<ctas, kThreads>>>(buf, rows, row, 1, sink); }), moved);
    report("rows256", row, median_ms([&] { rows_kernel<256><<<ctas, kThreads>>>(buf, rows, row, 1, sink); }), moved);
    report("rows512", row, median_ms([&] { rows_kernel<512><<<ctas, kThreads>>>(buf, rows, row, 1, sink); }), moved);
  }
  // GEMV schedules over one weight's bytes (29.4 MB: 14336x4096; 117 MB: 28672x8192), each launch reading the next
  // copy of the weight so nothing is served from L2; µs per launch.
  for (int d : {2, 4, 8}) {
    const int dyn[] = {0, 50 * 1024, 100 * 1024};  // 8, 4 and 2 CTAs of 8 warps per SM
    for (int64_t weight : {int64_t(29360128), int64_t(117440512)}) {
      const int copies = int(bytes / weight);
      // the fixed per-warp sizes give grids of weight / per_warp / 8 CTAs (16384 B at 28 MB: the kernel's 224 CTAs,
      // uneven over 132 SMs x 2); the last size splits the weight evenly over exactly 2 CTAs per SM (0: computed)
      for (int64_t per_warp : {int64_t(4096), int64_t(8192), int64_t(16384), int64_t(32768), int64_t(0)}) {
        if (per_warp == 0) per_warp = weight / (2 * sms * 8) / 512 * 512;  // the remainder (< 0.1 %) is not read
        for (int smem : dyn) {
          const int64_t warps = weight / per_warp;
          const int grid = int(warps / 8);
          auto* k = d == 2 ? schedule_kernel<2> : d == 4 ? schedule_kernel<4> : schedule_kernel<8>;
          CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 110 * 1024));
          const float ms = median_ms([&] {
            for (int c = 0; c < copies; ++c) k<<<grid, kThreads, smem>>>(buf + c * weight, per_warp, sink);
          });
          const float us = ms * 1e3f / copies;
          std::printf("schedule  weight %6.1f MB  per-warp %5lld B  in flight %d KB/warp  %d CTAs/SM max  "
                      "%7.2f us  %5.2f TB/s\n", weight / 1048576.0, static_cast<long long>(per_warp), d / 2,
                      smem == 0 ? 8 : smem < 60 * 1024 ? 4 : 2, us, weight / (us * 1e-6) / 1e12);
        }
      }
    }
  }
  CHECK(cudaFree(buf));
  CHECK(cudaFree(dst));
  CHECK(cudaFree(sink));
  return 0;
}
