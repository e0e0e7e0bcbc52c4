// CPU backend of gemm_4bit for few rows of x (decoding on a CPU): y = x · dequant(W)ᵀ without writing dequant(W).
// Implements F.linear(x, quant.dequantize_ref(packed, state).to(x.dtype)) (minqlora/quant.py) for float32, float16
// and bfloat16 x, NF4 / FP4, plain or double-quantized absmax, any K that is a multiple of the blocksize; anything
// else (and more rows than kFusedMaxRows) goes to dequantize + matmul (../gemm.cpp), as before.
//
// Why: at one row the composite path's dequantize is the whole cost. On the 2-core AVX2 workstation (one thread,
// float32 x), a 1536×576 weight took 1.66 ms through dequantize + matmul, of which the dequantize was 1.05 ms, where
// float32 F.linear on the same weight takes 0.10 ms: each token of a CPU decode paid for writing every weight in
// float32. Here each output row's blocks are decoded one at a time into a buffer that stays in L1: the block's 16
// possible values (table · absmax, rounded to x's dtype exactly as the dequantized weight is), one lookup per
// nibble, then the block's dot with each row of x in float32 with 8 independent partial sums (so the compiler can
// vectorize without reassociating a reduction: -ffp-contract=off, no fast-math). Output rows are split over the
// intra-op threads (at::parallel_for). The sums run in a different order than a BLAS matmul's, so results agree
// with the composite path to float32 rounding, not bit for bit; the same call always gives the same bits.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include <cstdlib>
#include <cstring>

#include "../common.h"
#include "../gemm.h"
#include "absmax.h"
#include "gemv_avx2.h"

namespace minqlora {
namespace {

// Rows of x up to which the fused loop runs: past them the weight's decode, paid once per call either way, is no
// longer most of the cost. 2-core AVX2 workstation, one thread, NF4 + DQ, 1536x576 float32 x, against dequantize +
// matmul: the AVX2 loop 4.6x at 1 row, 3.0x at 8; the portable loop 1.2x at 1, 1.1x at 4, 0.9x at 8.
constexpr int64_t kFusedMaxRows = 8, kPortableMaxRows = 4;
constexpr int kLanes = 8;  // independent partial sums per row of x: one AVX2 register of float32
constexpr float kTables[2][16] = {MQ_NF4_TABLE, MQ_FP4_TABLE};  // indexed by QuantType

// Whether the AVX2 + FMA loop runs (gemv_avx2.h): decided once per process. MINQLORA_DISABLE_AVX2=1 in the
// environment forces the portable loop (to test it on an AVX2 machine).
bool use_avx2() {
#ifdef MQ_HAVE_AVX2
  static const bool ok = [] {
    const char* off = std::getenv("MINQLORA_DISABLE_AVX2");
    return avx2::supported() && !(off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0);
  }();
  return ok;
#else
  return false;
#endif
}

// The block's 16 possible weights, rounded to x's dtype as F.linear on the dequantized weight sees them.
template <typename scalar_t>
void block_lut(const float* table, float a, float* lut) {
  for (int k = 0; k < 16; ++k) lut[k] = static_cast<float>(static_cast<scalar_t>(table[k] * a));
}

#ifdef MQ_HAVE_AVX2
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void gemv_rows_avx2(const float* x, const uint8_t* w, scalar_t* y, int64_t M,
                                                        int64_t N, int64_t K, int64_t blocksize, const float* table,
                                                        const AbsmaxDecoder& block_scale, int64_t n0, int64_t n1) {
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[kFusedMaxRows];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m256 lut_lo, lut_hi;
      avx2::block_lut<scalar_t>(table, block_scale(n * blocks_per_row + b), lut_lo, lut_hi);
      avx2::block_dot(lut_lo, lut_hi, w + (n * K + b * blocksize) / 2, x, K, b * blocksize, blocksize, M, acc);
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = static_cast<scalar_t>(avx2::reduce8(acc[m]));
  }
}
#endif

// y[m, n] for the output rows [n0, n1) of one thread. x: M rows of K float32; w: packed rows of K/2 bytes.
template <typename scalar_t>
void gemv_rows(const float* x, const uint8_t* w, scalar_t* y, int64_t M, int64_t N, int64_t K, int64_t blocksize,
               const float* table, const AbsmaxDecoder& block_scale, int64_t n0, int64_t n1) {
  std::vector<float> buf(blocksize);  // one decoded block, in L1
  std::array<float, kFusedMaxRows * kLanes> acc;
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    acc.fill(0.0f);
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      std::array<float, 16> lut;
      block_lut<scalar_t>(table, block_scale(n * blocks_per_row + b), lut.data());
      const uint8_t* src = w + (n * K + b * blocksize) / 2;
      for (int64_t j = 0; j < blocksize / 2; ++j) {  // element 2j in the high nibble (bnb-format.md)
        buf[2 * j] = lut[src[j] >> 4];
        buf[2 * j + 1] = lut[src[j] & 0xF];
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xb = x + m * K + b * blocksize;
        float* am = acc.data() + m * kLanes;
        for (int64_t j = 0; j < blocksize; j += kLanes)  // blocksize >= 32: whole groups of kLanes
          for (int l = 0; l < kLanes; ++l) am[l] += buf[j + l] * xb[j + l];
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const float* am = acc.data() + m * kLanes;
      const float sum = ((am[0] + am[1]) + (am[2] + am[3])) + ((am[4] + am[5]) + (am[6] + am[7]));
      y[m * N + n] = static_cast<scalar_t>(sum);
    }
  }
}

// The row limit in use; MINQLORA_CPU_GEMV_MAX_ROWS overrides it (0: always dequantize + matmul), for measuring.
int64_t fused_max_rows() {
  static const int64_t v = [] {
    const char* s = std::getenv("MINQLORA_CPU_GEMV_MAX_ROWS");
    return s ? std::atoll(s) : (use_avx2() ? kFusedMaxRows : kPortableMaxRows);
  }();
  return std::min(v, kFusedMaxRows);  // the accumulators hold kFusedMaxRows rows
}

bool fused_applies(const at::Tensor& x, int64_t blocksize, c10::IntArrayRef shape) {
  return shape.size() == 2 && x.dim() >= 1 && x.size(-1) == shape[1] && shape[1] > 0 &&
         shape[1] % blocksize == 0 && blocksize % 16 == 0 &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
         x.numel() / shape[1] <= fused_max_rows();
}

at::Tensor gemm_4bit_cpu(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
                         double nested_offset, int64_t blocksize, int64_t nested_blocksize,
                         c10::string_view quant_type, c10::IntArrayRef shape) {
  if (!fused_applies(x_in, blocksize, shape)) {
    return gemm_4bit_composite(x_in, packed_in, absmax, nested_absmax, nested_map, nested_offset, blocksize,
                               nested_blocksize, quant_type, shape);
  }
  check_4bit_args(packed_in, absmax, nested_absmax, nested_map, blocksize, nested_blocksize, shape);
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const int64_t N = shape[0], K = shape[1], M = x_in.numel() / K;
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x_in.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor packed = rows_order(packed_in).contiguous();
  const at::Tensor x = x_in.reshape({M, K}).to(at::kFloat).contiguous();  // a copy unless float32 and contiguous
  const AbsmaxDecoder block_scale =
      make_absmax_decoder(absmax, nested_absmax, nested_map, nested_offset, nested_blocksize);
  const float* table = kTables[qt];
  // ~1 ns a weight row element on one core: 2^16 elements of work per task before a second thread pays
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gemm_4bit_cpu", [&] {
    const float* xp = x.data_ptr<float>();
    const uint8_t* wp = packed.data_ptr<uint8_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#ifdef MQ_HAVE_AVX2
      if (use_avx2()) return gemv_rows_avx2<scalar_t>(xp, wp, yp, M, N, K, blocksize, table, block_scale, n0, n1);
#endif
      gemv_rows<scalar_t>(xp, wp, yp, M, N, K, blocksize, table, block_scale, n0, n1);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CPU, m) {
  m.impl("gemm_4bit", &gemm_4bit_cpu);
}

}  // namespace minqlora
