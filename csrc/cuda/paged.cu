// CUDA unified ("managed") memory for paged optimizer state, the way the QLoRA paper's paged optimizers work
// (QLoRA §3, "Paged Optimizers"; bitsandbytes: cudaMallocManaged + cudaMemPrefetchAsync, bnb-format.md §5):
//   managed_empty        -> a tensor in cudaMallocManaged memory, freed by its deleter
//   managed_bytes_in_use -> what managed_empty has handed out and not yet freed
//   prefetch_managed     -> cudaMemPrefetchAsync of such a tensor to a GPU (before its update) or to the CPU; a
//                           no-op for ordinary device memory
// The driver pages state between host and GPU under memory pressure. This file never lets the managed memory it
// has handed out exceed what the GPU has free at allocation time (cudaMemGetInfo): oversubscribing unified memory
// can hang a shared GPU, so such a request fails with an error naming the sizes instead (ops.managed_empty makes
// the same check in Python first, so the usual refusal is a Python exception). It leaves out the
// pinned-host streaming mode (paging="host", in minqlora/optim.py) and the update kernels (optim.cu).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>

namespace minqlora {
namespace {

// Bytes of managed memory handed out by managed_empty and not yet freed, process-wide; guarded by g_mutex so the
// free-memory check and the allocation are one step.
std::mutex g_mutex;
int64_t g_live_bytes = 0;

int cuda_index(const c10::Device& device) {
  TORCH_CHECK(device.is_cuda(), "device must be a CUDA device, got ", device);
  return device.has_index() ? device.index() : c10::cuda::current_device();
}

at::Tensor managed_empty(c10::IntArrayRef size, at::ScalarType dtype, c10::Device device) {
  const int index = cuda_index(device);
  const c10::cuda::CUDAGuard guard(index);
  int64_t numel = 1;
  for (auto d : size) {
    TORCH_CHECK(d >= 0, "size must be non-negative, got ", size);
    numel *= d;
  }
  const auto options = at::TensorOptions().dtype(dtype).device(c10::Device(c10::kCUDA, index));
  if (numel == 0) return at::empty(size, options);
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));

  size_t free_bytes = 0, total_bytes = 0;
  int64_t live = 0;
  void* ptr = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    live = g_live_bytes;
    // Conservative: pages of earlier managed tensors that already sit on the GPU count twice (in g_live_bytes and
    // as used memory). PagedAdamW allocates all state before its first prefetch, so this rarely bites.
    if (live + nbytes <= static_cast<int64_t>(free_bytes)) {
      C10_CUDA_CHECK(cudaMallocManaged(&ptr, static_cast<size_t>(nbytes), cudaMemAttachGlobal));
      g_live_bytes += nbytes;
    }
  }
  TORCH_CHECK(ptr != nullptr, "refusing to allocate ", nbytes, " bytes of CUDA managed memory on cuda:", index,
              ": ", live, " bytes are already allocated as managed memory and the GPU has only ", free_bytes,
              " of ", total_bytes, " bytes free. Oversubscribing unified memory can hang a shared GPU; use "
              "paging='host' (optimizer state in pinned host memory) instead.");
  auto deleter = [nbytes](void* q) {
    C10_CUDA_CHECK_WARN(cudaFree(q));  // cudaFree synchronizes the device: no kernel still uses q
    std::lock_guard<std::mutex> l(g_mutex);
    g_live_bytes -= nbytes;
  };
  return at::from_blob(ptr, size, deleter, options);
}

int64_t managed_bytes_in_use() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_live_bytes;
}

void prefetch_managed(const at::Tensor& t, c10::Device device) {
  TORCH_CHECK(t.is_cuda(), "t must be a CUDA managed tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.is_contiguous(), "t must be contiguous");
  if (t.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  cudaPointerAttributes attr;
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, t.data_ptr()));
  // Ordinary device memory has nowhere to migrate: nothing to do (this also lets opcheck's clones through).
  if (attr.type != cudaMemoryTypeManaged) return;
  // Without concurrent managed access (some virtualized or Windows setups) prefetching is not supported and the
  // driver migrates pages on touch instead: the prefetch is then a no-op.
  int concurrent = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, t.device().index()));
  if (!concurrent) return;
  const bool to_host = device.is_cpu();
  TORCH_CHECK(to_host || device.is_cuda(), "device must be a CUDA device or the CPU, got ", device);
  const int index = to_host ? 0 : cuda_index(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
#if CUDART_VERSION >= 13000
  cudaMemLocation loc{};
  loc.type = to_host ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = index;
  C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), nbytes, loc, 0, stream));
#else
  C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), nbytes, to_host ? cudaCpuDeviceId : index, stream));
#endif
}

}  // namespace

// managed_empty and managed_bytes_in_use have no tensor argument to dispatch on, so they register for every
// backend (managed_empty checks its device).
TORCH_LIBRARY_IMPL(minqlora, CompositeExplicitAutograd, m) {
  m.impl("managed_empty", &managed_empty);
  m.impl("managed_bytes_in_use", &managed_bytes_in_use);
}

TORCH_LIBRARY_IMPL(minqlora, CUDA, m) { m.impl("prefetch_managed", &prefetch_managed); }

}  // namespace minqlora
