// Launch helpers of the grid-stride elementwise kernels (layer_ops.cu, dropout.cu): the vector width a set of
// tensors allows, the grid size, and the switch from a runtime width to the kernel's template argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace minqlora {

// 16-byte packs when every row start and pointer allows them, else one element at a time.
inline int vec_width(int64_t elem_bytes, int64_t h, std::initializer_list<const at::Tensor*> ts) {
  const int64_t vec = 16 / elem_bytes;
  if (h % vec) return 1;
  for (const at::Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16) return 1;
  return static_cast<int>(vec);
}

// Grid of a grid-stride elementwise kernel: enough 256-thread CTAs for `work` items, at most 8 per SM resident.
inline int elementwise_ctas(int64_t work, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + 255) / 256, int64_t(sms) * 8)));
}

template <typename T, typename Launch>
void with_vec(int vec, Launch&& launch) {
  if (vec == 16 / static_cast<int>(sizeof(T))) {
    launch(std::integral_constant<int, 16 / sizeof(T)>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

}  // namespace minqlora
