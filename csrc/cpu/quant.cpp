// CPU kernels for 4-bit and 8-bit blockwise quantization. Implements, byte for byte:
//   quantize_4bit             -> quant.quantize_4bit_ref
//   dequantize_4bit           -> quant.dequantize_ref (absmax plain or double-quantized, decoded per block)
//   quantize_blockwise_8bit   -> quant.quantize_blockwise_8bit_ref
//   dequantize_blockwise_8bit -> quant.dequantize_blockwise_8bit_ref
// Blocks are independent, so each op is one at::parallel_for over blocks (OpenMP underneath). Arithmetic is float32
// with no fused multiply-add (setup.py passes -ffp-contract=off), which is what makes the bytes equal to the
// reference's.
//
// Two paths with the same bytes: on CPUs with AVX-512 (F, BW, VL; checked once at run time) whole blocks go to the
// kernels in quant_avx512.h; the portable loops below handle every other CPU and the partial last block.
// MINQLORA_DISABLE_AVX512=1 in the environment forces the portable loops (to test them on an AVX-512 machine).

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common.h"
#include "absmax.h"
#include "quant_avx512.h"

namespace minqlora {
namespace {

constexpr float kNF4Table[16] = MQ_NF4_TABLE;
constexpr float kFP4Table[16] = MQ_FP4_TABLE;
constexpr float kNF4Thresholds[15] = {kNF4T0, kNF4T1, kNF4T2,  kNF4T3,  kNF4T4,  kNF4T5,  kNF4T6, kNF4T7,
                                      kNF4T8, kNF4T9, kNF4T10, kNF4T11, kNF4T12, kNF4T13, kNF4T14};

// at::parallel_for gives each thread at least this many elements' worth of blocks: 2^18 elements are ~0.1 ms of
// quantizing on one core. Below that a second thread saves less than its wake-up costs, and on the shared 2-core
// machine of DESIGN.md §9 a busy second core made the double-quant step (262,144 absmax values) take a median
// 7.8 ms on two threads against 0.25 ms on one.
constexpr int64_t kGrainElements = int64_t{1} << 18;
inline int64_t grain(int64_t blocksize) { return std::max<int64_t>(1, kGrainElements / blocksize); }

// Calls f with the blocksize as a std::integral_constant for the small blocksizes, where fixed trip counts let the
// compiler unroll a kernel's per-block loops, and with 0 (read the runtime value) for the others.
template <typename F>
void with_static_blocksize(int64_t blocksize, F&& f) {
  switch (blocksize) {
    case 32: return f(std::integral_constant<int64_t, 32>{});
    case 64: return f(std::integral_constant<int64_t, 64>{});
    case 128: return f(std::integral_constant<int64_t, 128>{});
    default: return f(std::integral_constant<int64_t, 0>{});
  }
}

#ifdef MQ_HAVE_AVX512
// Whether whole blocks go to the AVX-512 kernels: decided once per process.
bool use_avx512() {
  static const bool ok = [] {
    const char* off = std::getenv("MINQLORA_DISABLE_AVX512");
    return avx512::supported() && !(off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0);
  }();
  return ok;
}
#endif

template <typename T>
float block_absmax(const T* x, int64_t len) {
  float m = 0.0f;
  for (int64_t i = 0; i < len; ++i) m = absmax_step(m, static_cast<float>(x[i]));
  return m;
}

// 4-bit codes of one block into `codes` (len values, len <= blocksize). NF4 counts thresholds below s; the count
// loop over a constant array vectorizes across i.
template <typename T>
void encode_block(const T* x, int64_t len, float absmax, QuantType qt, uint8_t* codes) {
  const float inv = 1.0f / absmax;
  if (qt == kNF4) {
    for (int64_t i = 0; i < len; ++i) {
      const float s = scale_value(static_cast<float>(x[i]), absmax, inv);
      uint8_t c = 0;
      for (int k = 0; k < 15; ++k) c += s > kNF4Thresholds[k];
      codes[i] = c;
    }
  } else {
    for (int64_t i = 0; i < len; ++i) codes[i] = encode_fp4(scale_value(static_cast<float>(x[i]), absmax, inv));
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& x_in, int64_t blocksize,
                                                     c10::string_view quant_type) {
  check_float(x_in, "x");
  check_blocksize(blocksize, "blocksize");
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel(), nb = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nb}, x.options().dtype(at::kFloat));
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  const uint8_t zero_code = qt == kNF4 ? 7 : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_4bit_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, nb, grain(blocksize), [&](int64_t b0, int64_t b1) {
#ifdef MQ_HAVE_AVX512
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (use_avx512()) {
          const int64_t full = std::min(b1, n / blocksize);  // whole blocks; the partial last one stays below
          with_static_blocksize(blocksize, [&](auto kBlock) {
            if (qt == kNF4)
              avx512::quantize_4bit_blocks<scalar_t, avx512::EncodeNF4, kBlock>(xp, b0, full, blocksize, zero_code,
                                                                                 am, out);
            else
              avx512::quantize_4bit_blocks<scalar_t, avx512::EncodeFP4, kBlock>(xp, b0, full, blocksize, zero_code,
                                                                                 am, out);
          });
          b0 = std::max(b0, full);
        }
      }
#endif
      std::vector<uint8_t> codes(blocksize + 1);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
        am[b] = block_absmax(xp + start, len);
        encode_block(xp + start, len, am[b], qt, codes.data());
        codes[len] = zero_code;  // pad nibble when the last block has odd length
        // blocksize is even, so every block starts on a byte boundary: element 2j -> high nibble.
        for (int64_t j = 0; j < (len + 1) / 2; ++j)
          out[start / 2 + j] = static_cast<uint8_t>(codes[2 * j] << 4 | codes[2 * j + 1]);
      }
    });
  });
  return {packed, absmax};
}

// at::empty for a large dequantized output. A fresh allocation of many MiB is mmap-ed, and the kernel is its first
// toucher: with 4 KiB pages a 4096x4096 bf16 output takes 8192 page faults, which on the 2-core VM of DESIGN.md §9
// cost more than the dequantization itself (fresh 4 KiB pages ~15 ms, huge pages ~7.5 ms, already-faulted memory
// ~4.3 ms, 2 threads). Advising transparent huge pages on it (as PyTorch's allocator does under
// THP_MEM_ALLOC_ENABLE=1) turns that into 16 faults. Only the 2 MiB-aligned interior is advised; it is a no-op where
// THP is off or the pages already exist, and the madvise result is ignored because it is only a hint.
at::Tensor empty_output(c10::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (out.nbytes() >= 8 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + out.nbytes()) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// quant.dequantize_ref; the block scales as quant.decode_absmax_ref (absmax.h).
at::Tensor dequantize_4bit_cpu(const at::Tensor& packed_in, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_map, double nested_offset, int64_t blocksize,
                               int64_t nested_blocksize, c10::string_view quant_type, c10::IntArrayRef shape,
                               at::ScalarType dtype) {
  const int64_t n = check_4bit_args(packed_in, absmax, nested_absmax, nested_map, blocksize, nested_blocksize, shape);
  const at::Tensor packed = rows_order(packed_in).contiguous();
  const QuantType qt = parse_quant_type(std::string(quant_type));
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "dtype must be float32, float16 or bfloat16, got ", dtype);
  at::Tensor out = empty_output(shape, packed.options().dtype(dtype));
  const float* table = qt == kNF4 ? kNF4Table : kFP4Table;
  const uint8_t* in = packed.data_ptr<uint8_t>();
  const AbsmaxDecoder block_scale =
      make_absmax_decoder(absmax, nested_absmax, nested_map, nested_offset, nested_blocksize);
  const int64_t nb = ceil_div(n, blocksize);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_4bit_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, nb, grain(blocksize), [&](int64_t b0, int64_t b1) {
#ifdef MQ_HAVE_AVX512
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (use_avx512()) {
          const int64_t full = std::min(b1, n / blocksize);
          with_static_blocksize(blocksize, [&](auto kBlock) {
            avx512::dequantize_4bit_blocks<kBlock>(in, o, b0, full, blocksize, table, block_scale);
          });
          b0 = std::max(b0, full);
        }
      }
#endif
      for (int64_t b = b0; b < b1; ++b) {
        const float a = block_scale(b);
        // The 16 possible outputs of this block, then a table lookup per nibble.
        std::array<scalar_t, 16> lut;
        for (int k = 0; k < 16; ++k) lut[k] = static_cast<scalar_t>(table[k] * a);
        const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
        const uint8_t* src = in + start / 2;
        scalar_t* dst = o + start;
        for (int64_t j = 0; j < len / 2; ++j) {
          dst[2 * j] = lut[src[j] >> 4];
          dst[2 * j + 1] = lut[src[j] & 0xF];
        }
        if (len % 2) dst[len - 1] = lut[src[len / 2] >> 4];
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cpu(const at::Tensor& x_in, const at::Tensor& code_map,
                                                               int64_t blocksize) {
  check_float(x_in, "x");
  check_blocksize(blocksize, "blocksize");
  check_dtype(code_map, at::kFloat, "code_map");
  TORCH_CHECK(code_map.numel() == 256, "code_map must have 256 entries, got ", code_map.numel());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor map = code_map.contiguous();
  const int64_t n = x.numel(), nb = ceil_div(n, blocksize);
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nb}, x.options().dtype(at::kFloat));
  // quant.map_thresholds: float32 midpoints; nearest code = number of midpoints strictly below s.
  std::array<float, 255> mid;
  const float* m = map.data_ptr<float>();
  for (int k = 0; k < 255; ++k) mid[k] = (m[k] + m[k + 1]) * 0.5f;
  uint8_t* c = codes.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  // The AVX-512 search assumes sorted midpoints (so does lower_bound; a NaN or unsorted map keeps the scalar path).
  bool sorted = true;
  for (int k = 0; k < 254; ++k) sorted = sorted && mid[k] <= mid[k + 1];

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_blockwise_8bit_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, nb, grain(blocksize), [&](int64_t b0, int64_t b1) {
#ifdef MQ_HAVE_AVX512
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (sorted && use_avx512()) {
          const int64_t full = std::min(b1, n / blocksize);
          avx512::quantize_8bit_blocks(xp, b0, full, blocksize, mid.data(), am, c);
          b0 = std::max(b0, full);
        }
      }
#endif
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
        const float a = block_absmax(xp + start, len);
        const float inv = 1.0f / a;
        am[b] = a;
        for (int64_t i = 0; i < len; ++i) {
          const float s = scale_value(static_cast<float>(xp[start + i]), a, inv);
          c[start + i] = static_cast<uint8_t>(std::lower_bound(mid.begin(), mid.end(), s) - mid.begin());
        }
      }
    });
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_8bit_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                                         const at::Tensor& code_map, int64_t blocksize, at::ScalarType dtype) {
  check_blocksize(blocksize, "blocksize");
  check_dtype(codes, at::kByte, "codes");
  check_dtype(absmax, at::kFloat, "absmax");
  check_dtype(code_map, at::kFloat, "code_map");
  TORCH_CHECK(code_map.numel() == 256, "code_map must have 256 entries, got ", code_map.numel());
  const int64_t n = codes.numel(), nb = ceil_div(n, blocksize);
  TORCH_CHECK(absmax.numel() == nb, "absmax has ", absmax.numel(), " values, expected ", nb);
  const at::Tensor cc = codes.contiguous(), ac = absmax.contiguous(), mc = code_map.contiguous();
  at::Tensor out = empty_output({n}, codes.options().dtype(dtype));
  const uint8_t* c = cc.data_ptr<uint8_t>();
  const float* am = ac.data_ptr<float>();
  const float* m = mc.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_blockwise_8bit_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, nb, grain(blocksize), [&](int64_t b0, int64_t b1) {
#ifdef MQ_HAVE_AVX512
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (use_avx512()) {
          const int64_t full = std::min(b1, n / blocksize);
          avx512::dequantize_8bit_blocks(c, am, m, o, b0, full, blocksize);
          b0 = std::max(b0, full);
        }
      }
#endif
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
        for (int64_t i = start; i < start + len; ++i) o[i] = static_cast<scalar_t>(m[c[i]] * am[b]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(minqlora, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cpu);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cpu);
}

}  // namespace minqlora
