// Launchers of the quantization kernels (declared in quant_launch.h, kernels in quant_kernels.cuh): grid sizes and
// the element-type switch. No torch code runs here and nothing throws; quant_ops.cpp checks arguments, allocates,
// and checks each launch.

#include "quant_kernels.cuh"
#include "quant_launch.h"

namespace minqlora {
namespace cuda {
namespace {

// f(static_cast<T*>(nullptr)) with T the CUDA type of `t`
template <typename F>
void with_elem(Elem t, F&& f) {
  switch (t) {
    case Elem::kF32: f(static_cast<float*>(nullptr)); break;
    case Elem::kF16: f(static_cast<__half*>(nullptr)); break;
    case Elem::kBF16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CTAs of `Kernel` that fit on the current device at once: the size of a persistent grid. Occupancy is asked once
// per kernel; the multiprocessor count each time (cheap, and per device).
template <auto Kernel>
cudaError_t resident_ctas(int64_t* ctas) {
  static int per_sm = 0;
  cudaError_t err = cudaSuccess;
  if (per_sm == 0) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0);
  int dev = 0, sms = 0;
  if (err == cudaSuccess) err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  *ctas = int64_t(per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
  return err;
}

template <typename T, int QT>
cudaError_t quantize_4bit(const T* x, int64_t n, int log2_bs, uint8_t* packed, float* absmax, cudaStream_t stream) {
  constexpr auto kernel = quantize_4bit_kernel<T, QT>;
  int64_t resident = 1;
  const cudaError_t err = resident_ctas<kernel>(&resident);
  const int64_t tiles = ceil_div64(n, kQuantTile);
  kernel<<<dim3(tiles < resident ? tiles : resident), kThreads, 0, stream>>>(x, n, log2_bs, packed, absmax);
  return err;
}

constexpr int kDequantK = 4;  // packed units (16 output bytes each) per thread in dequantize_4bit

}  // namespace

cudaError_t launch_quantize_4bit(Elem t, const void* x, int64_t n, int log2_bs, int quant_type, uint8_t* packed,
                                 float* absmax, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_elem(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    err = quant_type == kNF4 ? quantize_4bit<T, kNF4>(static_cast<const T*>(x), n, log2_bs, packed, absmax, stream)
                             : quantize_4bit<T, kFP4>(static_cast<const T*>(x), n, log2_bs, packed, absmax, stream);
  });
  return err;
}

void launch_dequantize_4bit(Elem t, const uint8_t* packed, const float* absmax, const uint8_t* codes,
                            const float* absmax2, const float* map, float offset, int64_t n, int log2_bs,
                            int log2_nested_bs, int quant_type, int64_t tiles_k, void* out, cudaStream_t stream) {
  with_elem(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t tile = int64_t(kThreads) * kDequantK * (16 / sizeof(T));
    dequantize_4bit_kernel<T, kDequantK><<<dim3(ceil_div64(n, tile)), kThreads, 0, stream>>>(
        packed, absmax, codes, absmax2, map, offset, n, log2_bs, log2_nested_bs, quant_type, tiles_k,
        static_cast<T*>(out));
  });
}

void launch_quantize_blockwise_8bit(Elem t, const void* x, const float* map, int64_t n, int log2_bs,
                                    uint8_t* codes, float* absmax, cudaStream_t stream) {
  // one warp per quant block, grid-stride beyond 4096 CTAs
  const int64_t blocks = ((n - 1) >> log2_bs) + 1, ctas = ceil_div64(blocks, kWarps);
  with_elem(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_blockwise_8bit_kernel<T><<<dim3(ctas < 4096 ? ctas : 4096), kThreads, 0, stream>>>(
        static_cast<const T*>(x), map, n, log2_bs, codes, absmax);
  });
}

void launch_dequantize_blockwise_8bit(Elem t, const uint8_t* codes, const float* absmax, const float* map,
                                      int64_t n, int log2_bs, void* out, cudaStream_t stream) {
  // a grid-stride loop over at most 1024 CTAs (about 8 per multiprocessor); each CTA loads the map once
  const int64_t ctas = ceil_div64(n, kThreads);
  with_elem(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_blockwise_8bit_kernel<T><<<dim3(ctas < 1024 ? ctas : 1024), kThreads, 0, stream>>>(
        codes, absmax, map, n, log2_bs, static_cast<T*>(out));
  });
}

}  // namespace cuda
}  // namespace minqlora
