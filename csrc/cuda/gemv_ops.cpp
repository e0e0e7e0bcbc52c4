// CUDA backend of gemm_4bit (schema in ../minqlora.cpp) and of gemv_4bit, the fused kernel alone. gemm_4bit sends
// few rows of x (M <= kFusedMaxRows, bf16/fp16, K a multiple of 32 and of the blocksize) to the fused kernel
// (gemv.cu, gemv_kernels.cuh) and everything else to dequantize + matmul (../gemm.cpp). Host-compiled torch glue:
// checks, allocation, the device guard, the current stream, the launch check.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>

#include "../common.h"
#include "../gemm.h"
#include "cuda_glue.h"
#include "gemv_launch.h"

namespace minqlora {
namespace {

// Rows of x up to which gemm_4bit takes the fused kernel: where it stops beating dequantize + cuBLAS on the H200
// (benchmarks/bench_gemv.py; benchmarks/README.md records the crossover). MINQLORA_GEMV_MAX_ROWS overrides it, for
// benchmarking the crossover itself.
constexpr int64_t kFusedMaxRows = 32;

int64_t fused_max_rows() {
  static const int64_t v = [] {
    const char* s = std::getenv("MINQLORA_GEMV_MAX_ROWS");
    return s ? std::atoll(s) : kFusedMaxRows;
  }();
  return v;
}

bool fused_applies(const at::Tensor& x, int64_t blocksize, c10::IntArrayRef shape) {
  return (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) && shape.size() == 2 &&
         shape[1] % 32 == 0 && shape[1] % blocksize == 0 && shape[0] < (int64_t(1) << 31) &&
         shape[1] < (int64_t(1) << 30) &&
         shape[0] * (shape[1] / blocksize) < (int64_t(1) << 31);  // the kernel indexes absmax with int32
}

at::Tensor gemv_4bit_cuda(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
                          double nested_offset, int64_t blocksize, int64_t nested_blocksize,
                          c10::string_view quant_type, c10::IntArrayRef shape, int64_t rows_per_cta,
                          int64_t kernel) {
  check_4bit_args(packed_in, absmax, nested_absmax, nested_map, blocksize, nested_blocksize, shape);
  TORCH_CHECK(shape.size() == 2, "gemv_4bit needs a 2-D weight shape (N, K), got ", shape);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == shape[1], "x has last dimension ",
              x_in.dim() ? x_in.size(-1) : 0, " but the weight shape is ", shape);
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kHalf,
              "gemv_4bit: x must be bfloat16 or float16, got ", x_in.scalar_type());
  TORCH_CHECK(fused_applies(x_in, blocksize, shape), "gemv_4bit: in_features ", shape[1],
              " must be a multiple of 32 and of the blocksize ", blocksize);
  TORCH_CHECK(rows_per_cta >= 0 && rows_per_cta <= 128 && rows_per_cta % 16 == 0,
              "gemv_4bit: rows_per_cta must be 0 (automatic) or a multiple of 16 up to 128, got ", rows_per_cta);
  TORCH_CHECK(kernel >= cuda::kGemvAuto && kernel <= cuda::kGemvStreamWindow,
              "gemv_4bit: kernel must be 0 (automatic), 1 (register ring), 2 (one-token streaming, codes per chunk) "
              "or 3 (one-token streaming, scale windows), got ", kernel);
  check_cuda(x_in, "x");
  check_cuda(packed_in, "packed");
  check_same_device(x_in, packed_in, "x", "packed");
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const c10::cuda::CUDAGuard guard(x_in.device());

  const int64_t N = shape[0], K = shape[1];
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x_in.options());
  const int64_t M = x_in.numel() / K;
  if (M == 0 || shape[0] == 0) return y;  // the kernel clamps rows to N - 1 and tokens to M - 1
  TORCH_CHECK(M < (int64_t(1) << 31), "gemv_4bit: too many rows in x (", M, ")");
  const at::Tensor x = aligned(x_in.reshape({M, K}), 16);  // a copy only if x is strided or misaligned
  const at::Tensor packed = aligned(packed_in, 16);
  const bool nested = nested_absmax.has_value();

  cuda::GemvArgs a{};
  a.packed = packed.data_ptr<uint8_t>();
  a.absmax = nested ? nullptr : absmax.data_ptr<float>();
  a.codes = nested ? absmax.data_ptr<uint8_t>() : nullptr;
  a.absmax2 = nested ? nested_absmax->data_ptr<float>() : nullptr;
  a.map = nested ? nested_map->data_ptr<float>() : nullptr;
  a.offset = static_cast<float>(nested_offset);
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.log2_bs = log2_int(blocksize);
  a.log2_nested_bs = nested ? log2_int(nested_blocksize) : 0;
  a.quant_type = qt;
  a.tiles = is_tiles(packed);
  C10_CUDA_CHECK(cuda::launch_gemv_4bit(elem_of(x.scalar_type()), a, static_cast<int>(rows_per_cta),
                                        static_cast<int>(kernel), c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor gemm_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
                          double nested_offset, int64_t blocksize, int64_t nested_blocksize,
                          c10::string_view quant_type, c10::IntArrayRef shape) {
  const bool few_rows = shape.size() == 2 && x.dim() >= 1 && x.size(-1) == shape[1] &&
                        x.numel() / std::max<int64_t>(shape[1], 1) <= fused_max_rows();
  if (few_rows && fused_applies(x, blocksize, shape)) {
    return gemv_4bit_cuda(x, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize,
                          quant_type, shape, 0, cuda::kGemvAuto);
  }
  return gemm_4bit_composite(x, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize,
                             nested_blocksize, quant_type, shape);
}

// Few rows against up to kMaxGroup weights that all take the fused kernel: one launch, each y what gemm_4bit_cuda
// would write (the kernel gives each member the CTA shape of its own launch). Anything else: one gemm_4bit each.
std::vector<at::Tensor> gemm_4bit_group_cuda(const at::Tensor& x_in, at::TensorList packed, at::TensorList absmax,
                                             const c10::List<c10::optional<at::Tensor>>& nested_absmax,
                                             const c10::List<c10::optional<at::Tensor>>& nested_map,
                                             c10::ArrayRef<double> nested_offset, int64_t blocksize,
                                             int64_t nested_blocksize, c10::string_view quant_type,
                                             c10::IntArrayRef out_features) {
  const size_t n = check_group_lists(packed, absmax, nested_absmax, nested_map, nested_offset, out_features);
  const int64_t K = x_in.dim() >= 1 ? x_in.size(-1) : 0;
  bool fused = n >= 2 && n <= static_cast<size_t>(cuda::kMaxGroup) && K > 0 && x_in.numel() / K <= 16 &&
               x_in.numel() / K <= fused_max_rows();
  for (size_t i = 0; fused && i < n; ++i) {
    const std::vector<int64_t> shape{out_features[i], K};
    fused = fused_applies(x_in, blocksize, shape) && packed[i].device() == x_in.device();
  }
  if (!fused) {
    return gemm_4bit_group_each(x_in, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize,
                                nested_blocksize, quant_type, out_features);
  }
  check_cuda(x_in, "x");
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.numel() / K;
  const at::Tensor x = aligned(x_in.reshape({M, K}), 16);
  cuda::GemvGroup group{};
  group.count = static_cast<int>(n);
  std::vector<at::Tensor> ys, keep;  // keep: aligned copies of packed, alive until the launch is queued
  for (size_t i = 0; i < n; ++i) {
    const std::vector<int64_t> shape{out_features[i], K};
    const c10::optional<at::Tensor> nested = nested_absmax.get(i), map = nested_map.get(i);
    check_4bit_args(packed[i], absmax[i], nested, map, blocksize, nested_blocksize, shape);
    check_same_device(x_in, absmax[i], "x", "absmax");
    std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
    out_shape.back() = out_features[i];
    ys.push_back(at::empty(out_shape, x_in.options()));
    keep.push_back(aligned(packed[i], 16));
    cuda::GemvArgs& a = group.w[i];
    a.packed = keep.back().data_ptr<uint8_t>();
    a.absmax = nested ? nullptr : absmax[i].data_ptr<float>();
    a.codes = nested ? absmax[i].data_ptr<uint8_t>() : nullptr;
    a.absmax2 = nested ? nested->data_ptr<float>() : nullptr;
    a.map = nested ? map->data_ptr<float>() : nullptr;
    a.offset = static_cast<float>(nested_offset[i]);
    a.x = x.data_ptr();
    a.y = ys.back().data_ptr();
    a.M = static_cast<int>(M);
    a.N = static_cast<int>(out_features[i]);
    a.K = static_cast<int>(K);
    a.log2_bs = log2_int(blocksize);
    a.log2_nested_bs = nested ? log2_int(nested_blocksize) : 0;
    a.quant_type = qt;
    a.tiles = is_tiles(keep.back());
  }
  if (M == 0) return ys;
  C10_CUDA_CHECK(cuda::launch_gemv_4bit_group(elem_of(x.scalar_type()), group, cuda::kGemvAuto,
                                              c10::cuda::getCurrentCUDAStream()));
  return ys;
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CUDA, m) {
  m.impl("gemm_4bit_group", &gemm_4bit_group_cuda);
  m.impl("gemm_4bit", &gemm_4bit_cuda);
  m.impl("gemv_4bit", &gemv_4bit_cuda);
}

}  // namespace minqlora
