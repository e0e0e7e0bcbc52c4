// Shared by the CPU and CUDA kernels: argument checks that name the argument, the 4-bit code tables and
// thresholds, and the encode rules. Everything numeric here mirrors minqlora/quant.py (the specification).
#pragma once

#include <cstdint>
#include <string>

#include <torch/library.h>

#if defined(__CUDACC__)
#define MQ_HD __host__ __device__ __forceinline__
#else
#define MQ_HD inline
#endif

namespace minqlora {

// quant_type as an int inside kernels: 0 = nf4, 1 = fp4.
enum QuantType : int { kNF4 = 0, kFP4 = 1 };

inline QuantType parse_quant_type(const std::string& s) {
  TORCH_CHECK(s == "nf4" || s == "fp4", "quant_type must be 'nf4' or 'fp4', got '", s, "'");
  return s == "nf4" ? kNF4 : kFP4;
}

inline void check_blocksize(int64_t bs, const char* name) {
  TORCH_CHECK(bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0, name,
              " must be a power of two in [32, 4096], got ", bs);
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.numel() > 0, name, " is empty");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " is on ", a.device(), " but ", bn, " is on ", b.device());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The decode layout (minqlora/layout.py, to_tiles): packed (N/16, K/128, 16, 64) uint8, each 1 KB one chunk of
// 16 rows × 128 values, read by the fused GEMV with contiguous loads. Every other op takes bitsandbytes' row order,
// which rows_order gives back (a copy, for tiles only).
inline bool is_tiles(const at::Tensor& packed) {
  return packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 64;
}
inline at::Tensor rows_order(const at::Tensor& packed) {
  return is_tiles(packed) ? packed.permute({0, 2, 1, 3}).reshape({-1, 1}) : packed;
}

// Checks shared by every dequantize-like op (dequantize_4bit, gemm_4bit, gemm_4bit_grad_input); returns n.
inline int64_t check_4bit_args(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_map, int64_t blocksize,
                               int64_t nested_blocksize, c10::IntArrayRef shape) {
  check_blocksize(blocksize, "blocksize");
  check_dtype(packed, at::kByte, "packed");
  int64_t n = 1;
  for (auto d : shape) {
    TORCH_CHECK(d > 0, "shape must have positive sizes, got ", shape);
    n *= d;
  }
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "packed has ", packed.numel(), " bytes but shape ", shape, " needs ",
              (n + 1) / 2);
  TORCH_CHECK(!is_tiles(packed) || (shape.size() == 2 && shape[0] == 16 * packed.size(0) &&
                                    shape[1] == 128 * packed.size(1)),
              "packed in tiles ", packed.sizes(), " does not match the weight shape ", shape,
              " (tiles are (N/16, K/128, 16, 64))");
  int64_t nb = ceil_div(n, blocksize);
  TORCH_CHECK(absmax.numel() == nb, "absmax has ", absmax.numel(), " values but ", nb, " blocks of ", blocksize,
              " are needed");
  TORCH_CHECK(packed.is_contiguous() && absmax.is_contiguous(), "packed and absmax must be contiguous");
  check_same_device(packed, absmax, "packed", "absmax");
  TORCH_CHECK(nested_absmax.has_value() == nested_map.has_value(),
              "nested_absmax and nested_map must be given together");
  if (nested_absmax.has_value()) {
    check_blocksize(nested_blocksize, "nested_blocksize");
    check_dtype(absmax, at::kByte, "absmax (nested codes)");
    check_dtype(*nested_absmax, at::kFloat, "nested_absmax");
    check_dtype(*nested_map, at::kFloat, "nested_map");
    TORCH_CHECK(nested_map->numel() == 256, "nested_map must have 256 entries, got ", nested_map->numel());
    TORCH_CHECK(nested_absmax->numel() == ceil_div(nb, nested_blocksize), "nested_absmax has ",
                nested_absmax->numel(), " values, expected ", ceil_div(nb, nested_blocksize));
    TORCH_CHECK(nested_absmax->is_contiguous() && nested_map->is_contiguous(),
                "nested_absmax and nested_map must be contiguous");
    check_same_device(packed, *nested_absmax, "packed", "nested_absmax");
    check_same_device(packed, *nested_map, "packed", "nested_map");
  } else {
    check_dtype(absmax, at::kFloat, "absmax");
  }
  return n;
}

// ---- tables (quant.NF4_TABLE, quant.FP4_TABLE) ----

#define MQ_NF4_TABLE                                                                                     \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,      \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,       \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                \
   0.7229568362236023f, 1.0f}

#define MQ_FP4_TABLE                                                                                     \
  {0.0f, 1.0f / 192, 2.0f / 3, 1.0f, 1.0f / 3, 0.5f, 1.0f / 6, 0.25f,                                    \
   -0.0f, -1.0f / 192, -2.0f / 3, -1.0f, -1.0f / 3, -0.5f, -1.0f / 6, -0.25f}

// quant.NF4_THRESHOLDS: float32 midpoints of adjacent NF4 values, printed exactly (9 digits).
constexpr float kNF4T0 = -0.848096371f;
constexpr float kNF4T1 = -0.610632896f;
constexpr float kNF4T2 = -0.45999527f;
constexpr float kNF4T3 = -0.33967942f;
constexpr float kNF4T4 = -0.234607399f;
constexpr float kNF4T5 = -0.137911737f;
constexpr float kNF4T6 = -0.0455250181f;
constexpr float kNF4T7 = 0.0397901498f;
constexpr float kNF4T8 = 0.120255247f;
constexpr float kNF4T9 = 0.203521252f;
constexpr float kNF4T10 = 0.292013764f;
constexpr float kNF4T11 = 0.389312536f;
constexpr float kNF4T12 = 0.501663446f;
constexpr float kNF4T13 = 0.64278692f;
constexpr float kNF4T14 = 0.861478448f;

// quant.FP4_THRESHOLDS (bitsandbytes' CUDA literals) and quant.FP4_RANK_TO_BITS.
#define MQ_FP4_THRESHOLDS {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f}
#define MQ_FP4_RANK_TO_BITS {0, 1, 6, 7, 4, 5, 2, 3}

// quant.encode_4bit for NF4: number of thresholds strictly below s. A balanced compare tree (4 compares)
// gives the same answer as counting all 15 and is cheaper on a GPU; on the CPU the counting loop vectorizes.
MQ_HD uint8_t encode_nf4_tree(float s) {
  // thresholds t_k, k = 0..14, in the tree order of binary search
  if (s > kNF4T7) {
    if (s > kNF4T11) {
      if (s > kNF4T13) return s > kNF4T14 ? 15 : 14;
      return s > kNF4T12 ? 13 : 12;
    }
    if (s > kNF4T9) return s > kNF4T10 ? 11 : 10;
    return s > kNF4T8 ? 9 : 8;
  }
  if (s > kNF4T3) {
    if (s > kNF4T5) return s > kNF4T6 ? 7 : 6;
    return s > kNF4T4 ? 5 : 4;
  }
  if (s > kNF4T1) return s > kNF4T2 ? 3 : 2;
  return s > kNF4T0 ? 1 : 0;
}

MQ_HD uint8_t encode_fp4(float s) {
  const float a = s < 0.0f ? -s : s;
  uint8_t bits;
  if (a > 0.29166667f) {
    if (a > 0.583333f) bits = a > 0.8333333f ? 0b011 : 0b010;
    else bits = a > 0.4166667f ? 0b101 : 0b100;
  } else if (a > 0.0859375f) {
    bits = a > 0.20833333f ? 0b111 : 0b110;
  } else {
    bits = a > 0.00260417f ? 0b001 : 0b000;
  }
  return bits | (s < 0.0f ? 0b1000 : 0);
}

// quant._scale: s = x * (1/absmax) as bitsandbytes computes it (reciprocal, then multiply), with the two edge cases
// pinned down: an all-zero block scales to 0 (not 0*inf = NaN) and a block whose 1/absmax overflows (denormal
// absmax) divides instead. `inv` is 1.0f/absmax, computed once per block with an IEEE division.
MQ_HD float scale_value(float x, float absmax, float inv) {
  if (absmax == 0.0f) return 0.0f;
  if (inv > 3.402823466e38f) return x / absmax;
  return x * inv;
}

// max(|a|, b) that propagates NaN (fmaxf drops it), so a block holding NaN gets a NaN absmax that the Python
// wrapper can detect and refuse.
MQ_HD float absmax_step(float acc, float x) {
  const float a = x < 0.0f ? -x : x;
  return (a > acc || a != a) ? a : acc;
}

}  // namespace minqlora
