// The op table: every schema of minqlora's ops, in one place. Kernels register per backend in csrc/cpu and
// csrc/cuda (TORCH_LIBRARY_IMPL); Python wrappers, fake (meta) kernels and autograd live in minqlora/ops.py.
// The reference for each op is the function of minqlora/quant.py named beside it.
//
// This file also defines the Python module `minqlora._C`, which is empty: importing it loads this library so
// the static registrations below run. (Pattern of pytorch/extension-cpp.)

#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(minqlora, m) {
  // quant.quantize_4bit_ref: x (any shape, f32/f16/bf16) -> packed ((n+1)/2, 1) uint8, absmax (ceil(n/bs),) f32
  m.def("quantize_4bit(Tensor x, int blocksize, str quant_type) -> (Tensor, Tensor)");
  // quant.dequantize_ref: decodes packed nibbles with a float32 absmax, or, when nested_absmax is given, with an
  // absmax of uint8 codes decoded inside the kernel as map[code] * nested_absmax[i / nested_blocksize] + offset.
  m.def("dequantize_4bit(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, "
        "float nested_offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape, "
        "ScalarType dtype) -> Tensor");
  // quant.quantize_blockwise_8bit_ref / dequantize_blockwise_8bit_ref: 8-bit codes in a sorted 256-entry map.
  m.def("quantize_blockwise_8bit(Tensor x, Tensor code_map, int blocksize) -> (Tensor, Tensor)");
  m.def("dequantize_blockwise_8bit(Tensor codes, Tensor absmax, Tensor code_map, int blocksize, "
        "ScalarType dtype) -> Tensor");
  // y = x @ dequant(W)^T, W of shape (N, K) = shape; x (..., K) -> y (..., N) in x's dtype. (Linear4bit forward)
  m.def("gemm_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, "
        "float nested_offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape) -> Tensor");
  // gemm_4bit through the fused few-row kernel alone (CUDA; x bf16/fp16, K a multiple of 32 and of blocksize):
  // what gemm_4bit dispatches to for few rows, exposed for tests and benchmarks. rows_per_cta (16, 32, 64, 128; 0 =
  // automatic) is the kernel's CTA shape, kernel (0 = automatic, 1 = the register ring, 2 = the one-token streaming
  // kernel; csrc/cuda/gemv_launch.h) which kernel, both for testing and benchmarking the launcher's choices.
  m.def("gemv_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, "
        "float nested_offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape, "
        "int rows_per_cta=0, int kernel=0) -> Tensor");
  // gemm_4bit of one x against several weights (up to 3 on CUDA's fused path: q/k/v, gate/up), weight i of shape
  // (out_features[i], K): one list entry per weight, blocksize / nested_blocksize / quant_type shared. Returns
  // [gemm_4bit(x, W_i)]. On CUDA few rows run as one launch, each output bit for bit gemm_4bit's; elsewhere, and for
  // many rows, one gemm_4bit per weight. Not differentiable (decoding and eval; proj_group.py calls it without grad).
  m.def("gemm_4bit_group(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor?[] nested_absmax, Tensor?[] nested_map, "
        "float[] nested_offset, int blocksize, int nested_blocksize, str quant_type, int[] out_features) -> Tensor[]");
  // grad_x = grad_y @ dequant(W): grad_y (..., N) -> (..., K). (Linear4bit backward; W gets no gradient)
  m.def("gemm_4bit_grad_input(Tensor grad_y, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
        "Tensor? nested_map, float nested_offset, int blocksize, int nested_blocksize, str quant_type, "
        "SymInt[] shape) -> Tensor");

  // ---- a Llama layer's elementwise work (fused.py; CUDA only, csrc/cuda/layer_ops.cu) ----
  // fused.rms_norm: x (..., h), weight (h,) of x's dtype -> w * (x * rsqrt(mean(x^2) + eps)) rounded to x's dtype.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // fused._rms_norm_backward: d x of rms_norm (the weight gets none: it is frozen in QLoRA).
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, float eps) -> Tensor");
  // fused.apply_rope: x (B, heads, S, D), cos / sin (B or 1, S, D); transpose: fused._rope_backward's adjoint.
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool transpose=False) -> Tensor");
  // static_cache.rope_kv_cache_ref: rope of q and k, then k and v written into the caches at slots; returns q.
  m.def("rope_kv_cache(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots) -> Tensor");
  // fused.swiglu: silu(gate) * up, and fused._swiglu_backward: (d gate, d up).
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // dropout.dropout_copies_ref: (copies, *x.shape), copy c = x * keep_c, the counter-based mask of (seed, c*numel + i)
  // with P(drop) = p[c] (p of length 1 or copies); dropout.dropout_sum_ref: sum_c g[c] * keep_c, its gradient.
  m.def("dropout_copies(Tensor x, int seed, float[] p, int copies) -> Tensor");
  m.def("dropout_sum(Tensor g, int seed, float[] p) -> Tensor");
  // ---- LoRA at decode (lora_fused.py with autograd off; csrc/lora_decode.cpp, csrc/cuda/lora_decode_ops.cpp) ----
  // lora_fused.LoRAGroup._down's h = x2 @ a.t(): x (..., K), a (R, K) of x's dtype -> h (..., R) in x's dtype.
  m.def("lora_down(Tensor x, Tensor a) -> Tensor");
  // LoRAGroup.forward's y2.addmm_(h_i, b_i.t(), alpha=s_i) for every member i, in place: ys[i] (M, N_i) +=
  // scales[i] * h[:, offsets[i] : offsets[i] + r_i] @ bs[i].t(), h (M, R), bs[i] (N_i, r_i). Not differentiable.
  m.def("lora_up_add_(Tensor(a!)[] ys, Tensor h, Tensor[] bs, float[] scales, int[] offsets) -> ()");

  // ---- optimizer and paging (optim.py) ----
  // optim.adamw_step_ref: one fused AdamW step with float32 m, v; p (f32/f16/bf16), m, v updated in place.
  m.def("adamw_step_32bit(Tensor(a!) p, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
  // adamw_step_32bit over lists of parameters sharing the hyperparameters and the step count: one call for a whole
  // param group. Per parameter the Python wrapper cost ~40 µs: 448 LoRA tensors of the Llama-3-8B shape made
  // PagedAdamW.step 32 ms of a 330 ms step on the H200 (benchmarks/README.md, bench_step --profile).
  m.def("adamw_step_32bit_list(Tensor(a!)[] p, Tensor[] grad, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
  // optim.adamw_step_8bit_ref: the same step with m, v as uint8 codes (signed / unsigned dynamic map) and one
  // float32 absmax per 256 elements; decode -> update -> re-encode in one pass.
  m.def("adamw_step_8bit(Tensor(a!) p, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!) exp_avg_absmax, Tensor(e!) exp_avg_sq_absmax, Tensor map_signed, Tensor map_unsigned, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
  // CUDA unified memory (cudaMallocManaged) for paged optimizer state; refuses to allocate more than the GPU has
  // free. CUDA builds only.
  m.def("managed_empty(int[] size, ScalarType dtype, Device device) -> Tensor");
  // Bytes handed out by managed_empty and not yet freed (a host query, no tensors).
  m.def("managed_bytes_in_use() -> int");
  // cudaMemPrefetchAsync of a managed tensor to `device` (a GPU, or the CPU) on the current stream.
  m.def("prefetch_managed(Tensor t, Device device) -> ()");
}
