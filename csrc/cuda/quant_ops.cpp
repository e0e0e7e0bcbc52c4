// CUDA backend of the quantization ops (schemas in ../minqlora.cpp; CPU twins in ../cpu/quant.cpp):
//   quantize_4bit, dequantize_4bit, quantize_blockwise_8bit, dequantize_blockwise_8bit.
// The torch side only: argument checks (../common.h, shared with the CPU kernels), output allocation, the device
// guard, the current stream, the launch check. The launchers and kernels are in quant.cu / quant_kernels.cuh.
// It is compiled by the host compiler, like the CPU kernels, so no torch code is compiled by nvcc. (On the GPU
// machine, H200 with torch 2.11, 2026-11-29, a failing TORCH_CHECK here still kills the process with SIGSEGV, as it
// did from the nvcc-compiled glue this file replaced and from the optimizer ops: the cause lies outside these
// files; tests/cuda/test_quant_cuda.py keeps a test for it.) gemm_4bit is in gemv_ops.cpp (the fused kernel for
// few rows) and ../gemm.cpp (dequantize_4bit + matmul).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "cuda_glue.h"
#include "quant_launch.h"

namespace minqlora {
namespace {

void check_out_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "dtype must be float32, float16 or bfloat16, got ", dtype);
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& x_in, int64_t blocksize,
                                                      c10::string_view quant_type) {
  check_float(x_in, "x");
  check_cuda(x_in, "x");
  check_blocksize(blocksize, "blocksize");
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned(x_in, 16);
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_quantize_4bit(elem_of(x.scalar_type()), x.data_ptr(), n, log2_int(blocksize), qt,
                                            packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  check_out_dtype(dtype);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = aligned(packed_in, 4);  // rows or tiles: the kernel reads both
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const bool nested = nested_absmax.has_value();
  cuda::launch_dequantize_4bit(elem_of(dtype), packed.data_ptr<uint8_t>(),
                               nested ? nullptr : absmax.data_ptr<float>(),
                               nested ? absmax.data_ptr<uint8_t>() : nullptr,
                               nested ? nested_absmax->data_ptr<float>() : nullptr,
                               nested ? nested_map->data_ptr<float>() : nullptr, static_cast<float>(nested_offset),
                               n, log2_int(blocksize), nested ? log2_int(nested_blocksize) : 0, qt,
                               is_tiles(packed) ? shape[1] : 0, out.data_ptr(),
                               c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const int64_t n = x.numel();
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  cuda::launch_quantize_blockwise_8bit(elem_of(x.scalar_type()), x.data_ptr(), map.data_ptr<float>(), n,
                                       log2_int(blocksize), codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                       c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  check_out_dtype(dtype);
  const int64_t n = codes_in.numel();
  TORCH_CHECK(absmax_in.numel() == ceil_div(n, blocksize), "absmax has ", absmax_in.numel(), " values, expected ",
              ceil_div(n, blocksize));
  check_same_device(codes_in, absmax_in, "codes", "absmax");
  check_same_device(codes_in, code_map, "codes", "code_map");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous(), absmax = absmax_in.contiguous(), map = code_map.contiguous();
  at::Tensor out = at::empty({n}, codes.options().dtype(dtype));
  if (n == 0) return out;
  cuda::launch_dequantize_blockwise_8bit(elem_of(dtype), codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                         map.data_ptr<float>(), n, log2_int(blocksize), out.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
