// The block scale of a 4-bit weight on the CPU, as quant.dequantize_ref decodes it: the float32 absmax, or with
// double quantization map[code] · absmax2 + offset (two roundings: setup.py passes -ffp-contract=off). Shared by the
// dequantize kernel (quant.cpp) and the fused few-row matmul (gemv.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace minqlora {

struct AbsmaxDecoder {
  const float* am;       // plain absmax, or nullptr when double-quantized
  const uint8_t* codes;  // double quantization: 8-bit codes, absmax2 per 2^nested_shift blocks, map and offset
  const float* am2;
  const float* map;
  float offset;
  int nested_shift;  // log2(nested_blocksize): a shift, not a 64-bit division per block (~25 cycles each)
  float operator()(int64_t b) const {
    if (codes == nullptr) return am[b];
    return map[codes[b]] * am2[b >> nested_shift] + offset;  // two roundings: -ffp-contract=off
  }
};

// The decoder of checked arguments (check_4bit_args): absmax float32, or uint8 codes with nested_absmax and map.
inline AbsmaxDecoder make_absmax_decoder(const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                                         const c10::optional<at::Tensor>& nested_map, double nested_offset,
                                         int64_t nested_blocksize) {
  const bool nested = nested_absmax.has_value();
  int nested_shift = 0;  // nested_blocksize is a checked power of two when nested
  while (nested && (int64_t{1} << nested_shift) < nested_blocksize) ++nested_shift;
  return AbsmaxDecoder{nested ? nullptr : absmax.data_ptr<float>(), nested ? absmax.data_ptr<uint8_t>() : nullptr,
                       nested ? nested_absmax->data_ptr<float>() : nullptr,
                       nested ? nested_map->data_ptr<float>() : nullptr, static_cast<float>(nested_offset),
                       nested_shift};
}

}  // namespace minqlora
