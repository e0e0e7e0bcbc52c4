// CUDA kernels of a Llama layer's elementwise work, in plain CUDA (no torch headers; a bare nvcc compile-checks
// them). Each names the function of minqlora/fused.py it implements:
//   rms_norm_kernel           -> fused.rms_norm           one CTA per row: Σx² (float32), then w · T(x · rsqrt)
//   rms_norm_backward_kernel  -> fused._rms_norm_backward  one CTA per row: Σx² and Σ(g·w·x) together, then dx
//   rope_kernel               -> fused.apply_rope          one thread per rotated pair (x_j, x_{j+D/2}), any strides;
//   rope_vec_kernel                                        VEC pairs per thread where the head dim is dense;
//                                fused._rope_backward      both with transpose set: the rotation's adjoint
//   rope_kv_cache_kernel      -> static_cache.rope_kv_cache_ref  decoding: q rotated, k rotated and v written into
//                                the static KV cache at the step's slots, one launch for what took four
//   swiglu_kernel             -> fused.swiglu              grid-stride, VEC elements per thread
//   swiglu_backward_kernel    -> fused._swiglu_backward
// Forward kernels round each intermediate to T where eager PyTorch writes one T tensor per op (x·rsqrt cast to T
// before the weight; x·cos and rotate_half(x)·sin; silu(gate)), so their outputs equal the eager spec's up to the
// order of RMSNorm's float32 sum (and the last ulp of rsqrtf / expf). Backward kernels stay in float32 and round
// once, like fused.py's compiled backward. Torch glue (checks, allocation, streams, launches): layer_ops.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_io.cuh"
#include "pdl.cuh"

namespace minqlora {
namespace layer {

constexpr int kRowThreads = 256;  // threads per row CTA (8 warps): a 4096-wide bf16 row is 2 16-byte loads each

// VEC elements of T in one aligned load / store (VEC · sizeof(T) = 16 bytes, or VEC = 1).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

// Sums a and b over the CTA (kRowThreads threads); every thread gets both totals.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 partial[kRowThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) partial[warp] = make_float2(a, b);
  __syncthreads();
  float2 t = make_float2(0.f, 0.f);
  for (int w = 0; w < kRowThreads / 32; ++w) {  // 8 partials, read by every thread: no second barrier round
    t.x += partial[w].x;
    t.y += partial[w].y;
  }
  return t;
}

// y = w · T(x · rsqrt(mean(x²) + eps)) for one row of h elements per CTA; x, w, y of type T, h % VEC == 0.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                               T* __restrict__ y, int64_t h, float eps) {
  cuda::allow_next_kernel();  // a PDL-launched GEMV after the norm may start its prologue (pdl.cuh)
  const T* xr = x + blockIdx.x * h;
  T* yr = y + blockIdx.x * h;
  float ss = 0.f;
  for (int64_t i = threadIdx.x * VEC; i < h; i += kRowThreads * VEC) {
    const Pack<T, VEC> v = load_pack<T, VEC>(xr + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = load_f32(v.v[j]);
      ss += f * f;
    }
  }
  const float r = rsqrtf(block_sum2(ss, 0.f).x / static_cast<float>(h) + eps);
  for (int64_t i = threadIdx.x * VEC; i < h; i += kRowThreads * VEC) {
    const Pack<T, VEC> v = load_pack<T, VEC>(xr + i), wv = load_pack<T, VEC>(w + i);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = store_as<T>(load_f32(wv.v[j]) * round_as<T>(load_f32(v.v[j]) * r));
    store_pack<T, VEC>(yr + i, out);
  }
}

// dx = r·g·w - x·r³·Σ(g·w·x)/h, r = rsqrt(mean(x²) + eps), per row (the derivation is fused._rms_norm_backward's).
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) rms_norm_backward_kernel(const T* __restrict__ g,
                                                                        const T* __restrict__ x,
                                                                        const T* __restrict__ w,
                                                                        T* __restrict__ dx, int64_t h, float eps) {
  const int64_t base = blockIdx.x * h;
  float ss = 0.f, sd = 0.f;
  for (int64_t i = threadIdx.x * VEC; i < h; i += kRowThreads * VEC) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + base + i), gv = load_pack<T, VEC>(g + base + i),
                       wv = load_pack<T, VEC>(w + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = load_f32(xv.v[j]);
      ss += f * f;
      sd += load_f32(gv.v[j]) * load_f32(wv.v[j]) * f;
    }
  }
  const float2 sums = block_sum2(ss, sd);
  const float r = rsqrtf(sums.x / static_cast<float>(h) + eps);
  const float coeff = r * r * r * sums.y / static_cast<float>(h);
  for (int64_t i = threadIdx.x * VEC; i < h; i += kRowThreads * VEC) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + base + i), gv = load_pack<T, VEC>(g + base + i),
                       wv = load_pack<T, VEC>(w + i);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      out.v[j] = store_as<T>(r * load_f32(gv.v[j]) * load_f32(wv.v[j]) - load_f32(xv.v[j]) * coeff);
    store_pack<T, VEC>(dx + base + i, out);
  }
}

// Sizes and element strides of x (B, heads, S, D) and out (same sizes), and of cos / sin (B or 1, S, D).
struct RopeShape {
  int64_t b, heads, s, d;
  int64_t xs[4], os[4], cs[3], ss[3];
};

// Forward (transpose = false): out_j = x_j·c_j - x_{j+D/2}·s_j, out_{j+D/2} = x_{j+D/2}·c_{j+D/2} + x_j·s_{j+D/2},
// each product and the sum rounded to T as the eager ops do (rotate_half's negation is exact). Transpose: the
// adjoint, d_j = g_j·c_j + g_{j+D/2}·s_{j+D/2}, d_{j+D/2} = g_{j+D/2}·c_{j+D/2} - g_j·s_j, in float32.
template <typename T>
__device__ __forceinline__ void rope_pair(float x1, float x2, float c1, float c2, float s1, float s2, bool transpose,
                                          float& o1, float& o2) {
  if (transpose) {
    o1 = x1 * c1 + x2 * s2;
    o2 = x2 * c2 - x1 * s1;
  } else {
    o1 = round_as<T>(x1 * c1) + round_as<T>(-x2 * s1);
    o2 = round_as<T>(x2 * c2) + round_as<T>(x1 * s2);
  }
}

// Any strides: one thread per rotated pair (x_j, x_{j+D/2}).
template <typename T>
__global__ void __launch_bounds__(256) rope_kernel(const T* __restrict__ x, const T* __restrict__ cos,
                                                   const T* __restrict__ sin, T* __restrict__ out, RopeShape sh,
                                                   bool transpose) {
  const int64_t half = sh.d / 2, pairs = sh.b * sh.heads * sh.s * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < pairs; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i % half, row = i / half;
    const int64_t t = row % sh.s, bh = row / sh.s;
    const int64_t hd = bh % sh.heads, b = bh / sh.heads;
    const int64_t xo = b * sh.xs[0] + hd * sh.xs[1] + t * sh.xs[2], oo = b * sh.os[0] + hd * sh.os[1] + t * sh.os[2];
    const int64_t co = b * sh.cs[0] + t * sh.cs[1], so = b * sh.ss[0] + t * sh.ss[1];
    float o1, o2;
    rope_pair<T>(load_f32(x[xo + j * sh.xs[3]]), load_f32(x[xo + (j + half) * sh.xs[3]]),
                 load_f32(cos[co + j * sh.cs[2]]), load_f32(cos[co + (j + half) * sh.cs[2]]),
                 load_f32(sin[so + j * sh.ss[2]]), load_f32(sin[so + (j + half) * sh.ss[2]]), transpose, o1, o2);
    out[oo + j * sh.os[3]] = store_as<T>(o1);
    out[oo + (j + half) * sh.os[3]] = store_as<T>(o2);
  }
}

// Dense head dim (stride 1 in x, out, cos and sin; every other stride, D / 2 and the pointers VEC-aligned): one
// thread per VEC consecutive pairs, six 16-byte loads and two stores, the index division once per VEC pairs. The
// strided kernel above spent about 3× its bytes' time on a Llama-3-8B step (28 µs per (2, 32, 1024, 128) bf16 call).
template <typename T, int VEC>
__global__ void __launch_bounds__(256) rope_vec_kernel(const T* __restrict__ x, const T* __restrict__ cos,
                                                       const T* __restrict__ sin, T* __restrict__ out, RopeShape sh,
                                                       bool transpose) {
  const int64_t half = sh.d / 2, groups = half / VEC, items = sh.b * sh.heads * sh.s * groups;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < items; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = (i % groups) * VEC, row = i / groups;
    const int64_t t = row % sh.s, bh = row / sh.s;
    const int64_t hd = bh % sh.heads, b = bh / sh.heads;
    const int64_t xo = b * sh.xs[0] + hd * sh.xs[1] + t * sh.xs[2] + j, oo = b * sh.os[0] + hd * sh.os[1] + t * sh.os[2] + j;
    const int64_t co = b * sh.cs[0] + t * sh.cs[1] + j, so = b * sh.ss[0] + t * sh.ss[1] + j;
    const Pack<T, VEC> x1 = load_pack<T, VEC>(x + xo), x2 = load_pack<T, VEC>(x + xo + half);
    const Pack<T, VEC> c1 = load_pack<T, VEC>(cos + co), c2 = load_pack<T, VEC>(cos + co + half);
    const Pack<T, VEC> s1 = load_pack<T, VEC>(sin + so), s2 = load_pack<T, VEC>(sin + so + half);
    Pack<T, VEC> o1, o2;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float a, b2;
      rope_pair<T>(load_f32(x1.v[e]), load_f32(x2.v[e]), load_f32(c1.v[e]), load_f32(c2.v[e]), load_f32(s1.v[e]),
                   load_f32(s2.v[e]), transpose, a, b2);
      o1.v[e] = store_as<T>(a);
      o2.v[e] = store_as<T>(b2);
    }
    store_pack<T, VEC>(out + oo, o1);
    store_pack<T, VEC>(out + oo + half, o2);
  }
}

// Sizes and element strides for rope_kv_cache_kernel: q (B, HQ, T, D), k and v (B, HKV, T, D) and q_out (q's
// sizes) any strides; cos / sin (B or 1, T, D) (stride 0 where broadcast); the caches (B, HKV, S, D).
struct RopeCacheShape {
  int64_t b, hq, hkv, t, d;
  int64_t qs[4], ks[4], vs[4], os[4], kcs[4], vcs[4], cs[3], ss[3];
};

// One thread per pair (x_j, x_{j+D/2}) of q, then of k, then of v (which is copied, not rotated): q's pairs rotated
// into q_out, k's into k_cache and v's into v_cache at slot slots[t] of token t. The rotation is rope_pair's, so q
// and the cached k are bit for bit what rope_kernel / rope_vec_kernel and index_copy_ write. At decode (T = 1, the
// 8B shape) that is 3,072 threads, one launch where two ropes and two index_copy_ calls took four (about 8.6 µs of
// a layer on the H200, benchmarks/README.md).
template <typename T>
__global__ void __launch_bounds__(256) rope_kv_cache_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                            const T* __restrict__ v, const T* __restrict__ cos,
                                                            const T* __restrict__ sin, T* __restrict__ q_out,
                                                            T* __restrict__ k_cache, T* __restrict__ v_cache,
                                                            const int64_t* __restrict__ slots, RopeCacheShape sh) {
  cuda::wait_prior_kernels();  // launched with PDL in a captured graph (pdl.cuh): q, k, v come from the GEMV before
  cuda::allow_next_kernel();
  const int64_t half = sh.d / 2, nq = sh.b * sh.hq * sh.t * half, nk = sh.b * sh.hkv * sh.t * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nq + 2 * nk;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int part = i < nq ? 0 : i < nq + nk ? 1 : 2;  // q, k, v
    const int64_t e = part == 0 ? i : part == 1 ? i - nq : i - nq - nk;
    const int64_t heads = part == 0 ? sh.hq : sh.hkv;
    const int64_t j = e % half, row = e / half;
    const int64_t t = row % sh.t, bh = row / sh.t;
    const int64_t hd = bh % heads, b = bh / heads;
    const int64_t* xs = part == 0 ? sh.qs : part == 1 ? sh.ks : sh.vs;
    const T* x = part == 0 ? q : part == 1 ? k : v;
    const int64_t xo = b * xs[0] + hd * xs[1] + t * xs[2];
    T* out;
    const int64_t* os;
    int64_t pos;  // the row's position along dim 2 of out: t for q_out, its cache slot for k and v
    if (part == 0) {
      out = q_out, os = sh.os, pos = t;
    } else {
      out = part == 1 ? k_cache : v_cache, os = part == 1 ? sh.kcs : sh.vcs, pos = slots[t];
    }
    const int64_t oo = b * os[0] + hd * os[1] + pos * os[2];
    if (part == 2) {
      out[oo + j * os[3]] = x[xo + j * xs[3]];
      out[oo + (j + half) * os[3]] = x[xo + (j + half) * xs[3]];
      continue;
    }
    const int64_t co = b * sh.cs[0] + t * sh.cs[1], so = b * sh.ss[0] + t * sh.ss[1];
    float o1, o2;
    rope_pair<T>(load_f32(x[xo + j * xs[3]]), load_f32(x[xo + (j + half) * xs[3]]),
                 load_f32(cos[co + j * sh.cs[2]]), load_f32(cos[co + (j + half) * sh.cs[2]]),
                 load_f32(sin[so + j * sh.ss[2]]), load_f32(sin[so + (j + half) * sh.ss[2]]), false, o1, o2);
    out[oo + j * os[3]] = store_as<T>(o1);
    out[oo + (j + half) * os[3]] = store_as<T>(o2);
  }
}

// silu(g) = g / (1 + e^-g), as PyTorch's silu kernel computes it in float32.
__device__ __forceinline__ float silu_f32(float g) { return g / (1.f + expf(-g)); }

// out = T(silu(gate)) · up over n elements (n % VEC == 0 when VEC > 1).
template <typename T, int VEC>
__global__ void __launch_bounds__(256) swiglu_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                                     T* __restrict__ out, int64_t n) {
  cuda::allow_next_kernel();  // as rms_norm_kernel: down_proj's GEMV follows
  for (int64_t i = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * VEC; i < n;
       i += (int64_t)gridDim.x * blockDim.x * VEC) {
    const Pack<T, VEC> g = load_pack<T, VEC>(gate + i), u = load_pack<T, VEC>(up + i);
    Pack<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = store_as<T>(round_as<T>(silu_f32(load_f32(g.v[j]))) * load_f32(u.v[j]));
    store_pack<T, VEC>(out + i, o);
  }
}

// d gate = grad·up·σ(g)·(1 + g·(1 - σ(g))), d up = grad·g·σ(g), in float32, rounded once.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) swiglu_backward_kernel(const T* __restrict__ grad, const T* __restrict__ gate,
                                                              const T* __restrict__ up, T* __restrict__ d_gate,
                                                              T* __restrict__ d_up, int64_t n) {
  for (int64_t i = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * VEC; i < n;
       i += (int64_t)gridDim.x * blockDim.x * VEC) {
    const Pack<T, VEC> dh = load_pack<T, VEC>(grad + i), g = load_pack<T, VEC>(gate + i),
                       u = load_pack<T, VEC>(up + i);
    Pack<T, VEC> dg, du;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float gf = load_f32(g.v[j]), df = load_f32(dh.v[j]);
      const float sig = 1.f / (1.f + expf(-gf));
      dg.v[j] = store_as<T>(df * load_f32(u.v[j]) * sig * (1.f + gf * (1.f - sig)));
      du.v[j] = store_as<T>(df * gf * sig);
    }
    store_pack<T, VEC>(d_gate + i, dg);
    store_pack<T, VEC>(d_up + i, du);
  }
}

}  // namespace layer
}  // namespace minqlora
