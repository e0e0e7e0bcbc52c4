// CUDA backend of the quantization ops (schemas in ../minqlora.cpp, kernels in quant_kernels.cuh):
//   quantize_4bit, dequantize_4bit, quantize_blockwise_8bit, dequantize_blockwise_8bit.
// Argument checks (shared with the CPU kernels in ../cpu/quant.cpp), device guard, launch on the current stream,
// launch check. The current stream is c10::cuda::getCurrentCUDAStream (at::cuda::getCurrentCUDAStream is the same
// function; its header also pulls in cuBLAS/cuSPARSE, which this file does not need). gemm_4bit and
// gemm_4bit_grad_input are not here: ../gemm.cpp composes them from dequantize_4bit and a matmul for every backend.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "quant_kernels.cuh"

namespace minqlora {
namespace {

// torch scalar types -> CUDA's
template <typename S> struct CudaT { using type = S; };
template <> struct CudaT<at::Half> { using type = __half; };
template <> struct CudaT<at::BFloat16> { using type = __nv_bfloat16; };

// float32, float16, bfloat16 only (the CPU kernels' AT_DISPATCH_FLOATING_TYPES_AND2 also admits double, which the
// Python wrappers and check_float reject before it gets here)
#define MQ_DISPATCH_FLOATS(TYPE, NAME, ...)                                                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                          \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                       \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

int log2_int(int64_t v) {  // v is a power of two (check_blocksize)
  int r = 0;
  while ((int64_t(1) << r) < v) ++r;
  return r;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// The kernels read the 16-bit or packed side with vector loads: a tensor viewed at an odd offset into its storage
// is copied to fresh (512-byte aligned) memory first.
at::Tensor aligned(const at::Tensor& t, int bytes) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % bytes ? c.clone() : c;
}

constexpr int kDequantK = 4;  // packed units per thread in dequantize_4bit

// CTAs of `Kernel` that fit on the current device at once: the size of a persistent grid. Occupancy is per kernel
// (one static per instantiation); the multiprocessor count is asked each time (cheap, and per device).
template <auto Kernel>
int64_t resident_ctas() {
  static const int per_sm = [] {
    int b = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, Kernel, cuda::kThreads, 0));
    return b > 0 ? b : 1;
  }();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return int64_t(per_sm) * sms;
}

template <typename T, int QT>
void launch_quantize_4bit(const T* x, int64_t n, int lbs, uint8_t* packed, float* absmax, cudaStream_t stream) {
  constexpr auto kernel = cuda::quantize_4bit_kernel<T, QT>;
  const int64_t ctas = std::min(ceil_div(n, cuda::kQuantTile), resident_ctas<kernel>());
  kernel<<<dim3(ctas), cuda::kThreads, 0, stream>>>(x, n, lbs, packed, absmax);
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& x_in, int64_t blocksize,
                                                      c10::string_view quant_type) {
  check_float(x_in, "x");
  check_cuda(x_in, "x");
  check_blocksize(blocksize, "blocksize");
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned(x_in, 16);
  const int64_t n = x.numel(), nb = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nb}, x.options().dtype(at::kFloat));
  const int lbs = log2_int(blocksize);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MQ_DISPATCH_FLOATS(x.scalar_type(), "quantize_4bit_cuda", [&] {
    using T = typename CudaT<scalar_t>::type;
    const T* xp = reinterpret_cast<const T*>(x.data_ptr<scalar_t>());
    if (qt == kNF4) {
      launch_quantize_4bit<T, kNF4>(xp, n, lbs, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), stream);
    } else {
      launch_quantize_4bit<T, kFP4>(xp, n, lbs, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed_in, const at::Tensor& absmax,
                                const c10::optional<at::Tensor>& nested_absmax,
                                const c10::optional<at::Tensor>& nested_map, double nested_offset,
                                int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                                c10::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = check_4bit_args(packed_in, absmax, nested_absmax, nested_map, blocksize, nested_blocksize,
                                    shape);
  check_cuda(packed_in, "packed");
  const QuantType qt = parse_quant_type(std::string(quant_type));
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "dtype must be float32, float16 or bfloat16, got ", dtype);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = aligned(packed_in, 4);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const bool nested = nested_absmax.has_value();
  const float* am = nested ? nullptr : absmax.data_ptr<float>();
  const uint8_t* codes = nested ? absmax.data_ptr<uint8_t>() : nullptr;
  const float* am2 = nested ? nested_absmax->data_ptr<float>() : nullptr;
  const float* map = nested ? nested_map->data_ptr<float>() : nullptr;
  const int lnbs = nested ? log2_int(nested_blocksize) : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MQ_DISPATCH_FLOATS(dtype, "dequantize_4bit_cuda", [&] {
    using T = typename CudaT<scalar_t>::type;
    const int64_t tile = int64_t(cuda::kThreads) * kDequantK * (16 / sizeof(T));
    cuda::dequantize_4bit_kernel<T, kDequantK><<<dim3(ceil_div(n, tile)), cuda::kThreads, 0, stream>>>(
        packed.data_ptr<uint8_t>(), am, codes, am2, map, static_cast<float>(nested_offset), n,
        log2_int(blocksize), lnbs, int(qt), reinterpret_cast<T*>(out.data_ptr<scalar_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& x_in, const at::Tensor& code_map,
                                                                int64_t blocksize) {
  check_float(x_in, "x");
  check_cuda(x_in, "x");
  check_blocksize(blocksize, "blocksize");
  check_dtype(code_map, at::kFloat, "code_map");
  TORCH_CHECK(code_map.numel() == 256, "code_map must have 256 entries, got ", code_map.numel());
  check_same_device(x_in, code_map, "x", "code_map");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), map = code_map.contiguous();
  const int64_t n = x.numel(), nb = ceil_div(n, blocksize);
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nb}, x.options().dtype(at::kFloat));
  // one warp per quant block, grid-stride beyond 4096 CTAs
  const int64_t ctas = std::min<int64_t>(ceil_div(nb, cuda::kWarps), 4096);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MQ_DISPATCH_FLOATS(x.scalar_type(), "quantize_blockwise_8bit_cuda", [&] {
    using T = typename CudaT<scalar_t>::type;
    cuda::quantize_blockwise_8bit_kernel<T><<<dim3(ctas), cuda::kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), map.data_ptr<float>(), n, log2_int(blocksize),
        codes.data_ptr<uint8_t>(), absmax.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_8bit_cuda(const at::Tensor& codes_in, const at::Tensor& absmax_in,
                                          const at::Tensor& code_map, int64_t blocksize, at::ScalarType dtype) {
  check_blocksize(blocksize, "blocksize");
  check_dtype(codes_in, at::kByte, "codes");
  check_dtype(absmax_in, at::kFloat, "absmax");
  check_dtype(code_map, at::kFloat, "code_map");
  check_cuda(codes_in, "codes");
  TORCH_CHECK(code_map.numel() == 256, "code_map must have 256 entries, got ", code_map.numel());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "dtype must be float32, float16 or bfloat16, got ", dtype);
  const int64_t n = codes_in.numel(), nb = ceil_div(n, blocksize);
  TORCH_CHECK(absmax_in.numel() == nb, "absmax has ", absmax_in.numel(), " values, expected ", nb);
  check_same_device(codes_in, absmax_in, "codes", "absmax");
  check_same_device(codes_in, code_map, "codes", "code_map");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous(), absmax = absmax_in.contiguous(), map = code_map.contiguous();
  at::Tensor out = at::empty({n}, codes.options().dtype(dtype));
  if (n == 0) return out;
  // a grid-stride loop over at most 1024 CTAs (about 8 per multiprocessor); each CTA loads the map once
  const int64_t ctas = std::min<int64_t>(ceil_div(n, cuda::kThreads), 1024);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MQ_DISPATCH_FLOATS(dtype, "dequantize_blockwise_8bit_cuda", [&] {
    using T = typename CudaT<scalar_t>::type;
    cuda::dequantize_blockwise_8bit_kernel<T><<<dim3(ctas), cuda::kThreads, 0, stream>>>(
        codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), map.data_ptr<float>(), n, log2_int(blocksize),
        reinterpret_cast<T*>(out.data_ptr<scalar_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cuda);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cuda);
}

}  // namespace minqlora
