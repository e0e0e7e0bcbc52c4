// The few-row LoRA kernels of decoding (launchers declared in lora_decode_launch.h; torch glue lora_decode_ops.cpp).
// References: lora_fused.LoRAGroup._down's h = x2 @ a.t() (lora_down) and LoRAGroup.forward's in-place
// y2.addmm_(h, b.t(), alpha=s) (lora_up_add), both with autograd off, M <= 16 rows of bf16/fp16.
//
// Why: at batch 1 the adapters' matmuls are a few hundred KB each and cost their launches. Decoding the Llama-3-8B
// shape (H200, CUDA graph, r=16 on all seven projections) spent 741 µs a token on x·Aᵀ (cuBLAS split-K GEMM + its
// reduction kernel, 4.3 + 1.5 µs a call, 128 calls) and 591 µs on addmm (2.6 µs a call, 224 calls): 5,025 µs a
// token against 3,475 merged. Here each is one launch that reads its operands once: lora_down one CTA per column of
// h (a's row is 8-28 KB), lora_up_add one thread per output feature over all of a group's members.
// Leaves out many rows (cuBLAS wins there; the glue falls back to ATen) and autograd (training runs cuBLAS).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "float_io.cuh"
#include "lora_decode_launch.h"
#include "pdl.cuh"

namespace minqlora {
namespace cuda {
namespace {

constexpr int kDownThreads = 256;  // 8 warps stride over K: K = 4096 is 512 16-byte chunks, two per thread
constexpr int kDownWarps = kDownThreads / 32;
// 128 output features per CTA: a 1024-wide k/v projection still spreads over 8 SMs, a 14336-wide gate/up over 112.
// (Not timed against 256; the H200 profile decides.)
constexpr int kUpThreads = 128;
// 16-byte chunks of a B row loaded before the barrier that publishes h, so that they are in flight meanwhile:
// the whole row for r <= 16.
constexpr int kPreChunks = 2;

// 8 bf16 / fp16 values of a 16-byte load -> float32
template <typename T> __device__ __forceinline__ void to_f32x8(const uint4& v, float* f);
template <> __device__ __forceinline__ void to_f32x8<__nv_bfloat16>(const uint4& v, float* f) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(p[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
template <> __device__ __forceinline__ void to_f32x8<__half>(const uint4& v, float* f) {
  const __half2* p = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(p[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// h[:, j] for j = blockIdx.x: the CTA's threads stride over K with 16-byte loads of a[j] and of each x row, fp32
// FMAs, then a warp-shuffle and shared-memory reduction per row. MT >= M rows of accumulators per thread.
template <typename T, int MT>
__global__ void __launch_bounds__(kDownThreads)
    lora_down_kernel(const T* __restrict__ x, const T* __restrict__ a, T* __restrict__ h, int M, int K, int R) {
  wait_prior_kernels();  // launched with PDL in a captured graph (pdl.cuh): only its launch overlaps the GEMV's end
  allow_next_kernel();
  const int j = blockIdx.x;
  const int chunks = K >> 3;
  const uint4* arow = reinterpret_cast<const uint4*>(a) + static_cast<int64_t>(j) * chunks;
  const uint4* xs = reinterpret_cast<const uint4*>(x);
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  // kUnroll chunks per step, all their loads issued before any FMA: 8-20 16-byte loads in flight per thread.
  // (Written out: with #pragma unroll the PTX interleaved each chunk's loads with its FMAs and ptxas gave the M = 1
  // kernel 31 registers, too few to hold 4 chunks' loads; written out it takes 44.)
  constexpr int kUnroll = MT <= 4 ? 4 : MT <= 8 ? 2 : 1;
  for (int c0 = threadIdx.x; c0 < chunks; c0 += kUnroll * kDownThreads) {
    uint4 ar[kUnroll], xr[kUnroll][MT];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kDownThreads;
      if (c < chunks) {
        ar[u] = __ldg(arow + c);
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < M) xr[u][m] = __ldg(xs + static_cast<int64_t>(m) * chunks + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (c0 + u * kDownThreads < chunks) {
        float av[8];
        to_f32x8<T>(ar[u], av);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            float xv[8];
            to_f32x8<T>(xr[u][m], xv);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[m] = __fmaf_rn(av[k], xv[k], acc[m]);
          }
        }
      }
    }
  }
  __shared__ float part[kDownWarps][MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) part[warp][m] = v;
  }
  __syncthreads();
  if (threadIdx.x < M) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kDownWarps; ++w) s += part[w][threadIdx.x];
    h[threadIdx.x * R + j] = store_as<T>(s);
  }
}

// The kernel's arguments: the members, and member i's CTAs [cta_begin[i], cta_begin[i + 1]) of grid.x (unused
// entries hold the grid's size, so no CTA selects them).
struct UpLaunch {
  LoraUpArgs args;
  int cta_begin[kLoraMaxMembers + 1];
};

// acc[m] += h[m, 8c .. 8c + 8] · b[8c .. 8c + 8] for one 16-byte chunk of a B row; hk = &hs[8c], rows r apart.
template <typename T, int MT>
__device__ __forceinline__ void fma_chunk(const uint4& raw, const float* hk, int r, int M, float (&acc)[MT]) {
  float b[8];
  to_f32x8<T>(raw, b);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < M) {
      const float4 h0 = *reinterpret_cast<const float4*>(hk + m * r);
      const float4 h1 = *reinterpret_cast<const float4*>(hk + m * r + 4);
      float s = acc[m];
      s = __fmaf_rn(h0.x, b[0], s);
      s = __fmaf_rn(h0.y, b[1], s);
      s = __fmaf_rn(h0.z, b[2], s);
      s = __fmaf_rn(h0.w, b[3], s);
      s = __fmaf_rn(h1.x, b[4], s);
      s = __fmaf_rn(h1.y, b[5], s);
      s = __fmaf_rn(h1.z, b[6], s);
      acc[m] = __fmaf_rn(h1.w, b[7], s);
    }
  }
}

// y[m, n] += scale · h[m, offset : offset + r] · b[n] for n = this thread's output feature of its CTA's member, every
// row m: y read as fp32, the dot in fp32, rounded once (cuBLAS's epilogue alpha·acc + beta·C for addmm_). kVec: every
// member's r is a multiple of 8 and its B 16-byte aligned, so B rows load in 16-byte chunks.
template <typename T, int MT, bool kVec>
__global__ void __launch_bounds__(kUpThreads) lora_up_add_kernel(const UpLaunch L) {
  const int cta = blockIdx.x;
  const int i = (cta >= L.cta_begin[1]) + (cta >= L.cta_begin[2]);  // kLoraMaxMembers == 3; no dynamic indexing
  const LoraUpMember w = i == 0 ? L.args.w[0] : i == 1 ? L.args.w[1] : L.args.w[2];
  const int n = (cta - (i == 0 ? 0 : i == 1 ? L.cta_begin[1] : L.cta_begin[2])) * kUpThreads + threadIdx.x;
  const int M = L.args.M, r = w.r;
  const bool live = n < w.N;
  T* y = static_cast<T*>(w.y) + n;
  const T* brow = static_cast<const T*>(w.b) + static_cast<int64_t>(n) * r;

  // The loads that need no h first: the start of this thread's B row (before the wait for the kernels before it:
  // B is fixed in a captured graph, pdl.cuh), then its y values.
  uint4 pre[kPreChunks] = {};
  if constexpr (kVec) {
#pragma unroll
    for (int c = 0; c < kPreChunks; ++c)
      if (live && 8 * c < r) pre[c] = __ldg(reinterpret_cast<const uint4*>(brow) + c);
  }
  wait_prior_kernels();
  allow_next_kernel();
  float yv[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) yv[m] = live && m < M ? load_f32(y[m * w.ldy]) : 0.f;
  // The member's slice of h, (M, r) as fp32 in shared memory: every thread reads all of it.
  __shared__ __align__(16) float hs[kLoraMaxRows * kLoraMaxRank];
  const T* h = static_cast<const T*>(L.args.h) + w.offset;
  for (int e = threadIdx.x; e < M * r; e += kUpThreads) {
    const int m = e / r;
    hs[e] = load_f32(h[m * L.args.R + (e - m * r)]);
  }
  __syncthreads();
  if (!live) return;

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  if constexpr (kVec) {
#pragma unroll
    for (int c = 0; c < kPreChunks; ++c)
      if (8 * c < r) fma_chunk<T, MT>(pre[c], hs + 8 * c, r, M, acc);
    for (int c = kPreChunks; 8 * c < r; ++c)
      fma_chunk<T, MT>(__ldg(reinterpret_cast<const uint4*>(brow) + c), hs + 8 * c, r, M, acc);
  } else {
    for (int k = 0; k < r; ++k) {
      const float bk = load_f32(brow[k]);
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) acc[m] = __fmaf_rn(hs[m * r + k], bk, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
    if (m < M) y[m * w.ldy] = store_as<T>(__fmaf_rn(w.scale, acc[m], yv[m]));
}

// The row-count template argument: the smallest of 1, 2, 4, 8, 16 that holds M (accumulators per thread).
template <typename Launch>
cudaError_t with_rows(int M, Launch&& launch) {
  if (M == 1) return launch(std::integral_constant<int, 1>{});
  if (M == 2) return launch(std::integral_constant<int, 2>{});
  if (M <= 4) return launch(std::integral_constant<int, 4>{});
  if (M <= 8) return launch(std::integral_constant<int, 8>{});
  return launch(std::integral_constant<int, 16>{});
}

template <typename T>
cudaError_t down(const void* x, const void* a, void* h, int M, int K, int R, cudaStream_t stream) {
  return with_rows(M, [&](auto mt) {
    return launch_pdl(lora_down_kernel<T, decltype(mt)::value>, dim3(R), dim3(kDownThreads), 0, stream,
                      pdl_applies(stream), static_cast<const T*>(x), static_cast<const T*>(a), static_cast<T*>(h), M,
                      K, R);
  });
}

template <typename T>
cudaError_t up(const UpLaunch& L, int ctas, bool vec, cudaStream_t stream) {
  return with_rows(L.args.M, [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    const bool pdl = pdl_applies(stream);
    return vec ? launch_pdl(lora_up_add_kernel<T, MT, true>, dim3(ctas), dim3(kUpThreads), 0, stream, pdl, L)
               : launch_pdl(lora_up_add_kernel<T, MT, false>, dim3(ctas), dim3(kUpThreads), 0, stream, pdl, L);
  });
}

}  // namespace

cudaError_t launch_lora_down(Elem t, const void* x, const void* a, void* h, int M, int K, int R,
                             cudaStream_t stream) {
  if (M < 1 || M > kLoraMaxRows || K % 8 != 0 || R < 0 || (t != Elem::kBF16 && t != Elem::kF16))
    return cudaErrorInvalidValue;
  if (R == 0) return cudaSuccess;
  return t == Elem::kBF16 ? down<__nv_bfloat16>(x, a, h, M, K, R, stream) : down<__half>(x, a, h, M, K, R, stream);
}

cudaError_t launch_lora_up_add(Elem t, const LoraUpArgs& args, cudaStream_t stream) {
  if (args.count < 1 || args.count > kLoraMaxMembers || args.M < 1 || args.M > kLoraMaxRows ||
      (t != Elem::kBF16 && t != Elem::kF16))
    return cudaErrorInvalidValue;
  UpLaunch L{};
  L.args = args;
  int total = 0;
  bool vec = true;
  for (int i = 0; i < args.count; ++i) {
    const LoraUpMember& w = args.w[i];
    if (w.r < 0 || w.r > kLoraMaxRank || w.N < 0) return cudaErrorInvalidValue;
    vec = vec && w.r % 8 == 0 && reinterpret_cast<uintptr_t>(w.b) % 16 == 0;
    L.cta_begin[i] = total;
    total += (w.N + kUpThreads - 1) / kUpThreads;
  }
  for (int i = args.count; i <= kLoraMaxMembers; ++i) L.cta_begin[i] = total;
  if (total == 0) return cudaSuccess;
  return t == Elem::kBF16 ? up<__nv_bfloat16>(L, total, vec, stream) : up<__half>(L, total, vec, stream);
}

}  // namespace cuda
}  // namespace minqlora
