// The op surface of mixlora_ext: every schema lives here, in one TORCH_LIBRARY block.
// Each backend file ends with its own TORCH_LIBRARY_IMPL(mixlora, CPU|CUDA, m).
// Semantics, shapes and dtypes of each op: docs/design.md.
//
// Legend: T tokens, k experts per token, N = T*k (token, slot) pairs, pair id q = t*k + j,
// E experts, D a feature width (H or I), R LoRA rank. "acc" = float64 for float64 inputs,
// else float32.
#include <Python.h>
#include <torch/library.h>

// Importing mixlora_ext._C registers the ops; the module itself has no functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace mixlora {

// -1 in a CPU-only build, else the CUDA version the kernels were built with (e.g. 13000).
int64_t cuda_version() {
#ifdef MIXLORA_WITH_CUDA
  return MIXLORA_CUDA_VERSION;
#else
  return -1;
#endif
}

TORCH_LIBRARY(mixlora, m) {
  m.def("cuda_version() -> int", &cuda_version);

  // Gating (csrc/gating). logits [T, E] -> weights [T, k] acc, ids [T, k] int32, probs [T, E] acc.
  m.def("topk_gating(Tensor logits, int k) -> (Tensor weights, Tensor ids, Tensor probs)");
  // -> grad_logits [T, E] acc. grad_probs carries the aux-loss path and may be absent.
  m.def(
      "topk_gating_backward(Tensor grad_weights, Tensor? grad_probs, Tensor weights, Tensor ids, "
      "Tensor probs) -> Tensor");

  // x [T, H], weight [E, H] acc -> logits [T, E] acc: x @ weight^T, each sum in column order.
  m.def("router_logits(Tensor x, Tensor weight) -> Tensor");
  // grad [T, E] acc -> grad_x [T, H] (x's dtype) = grad @ weight, grad_weight [E, H] acc =
  // grad^T @ x, summed in token order.
  m.def("router_logits_backward(Tensor grad, Tensor x, Tensor weight) -> (Tensor grad_x, Tensor grad_weight)");

  // Permutation (csrc/permute). ids [T, k] int32 -> order [N] int32 (pair ids grouped by
  // expert, stable), offsets [E + 1] int64, position [N] int32 (inverse of order).
  m.def("sort_pairs(Tensor ids, int num_experts) -> (Tensor order, Tensor offsets, Tensor position)");
  // src [T, D] -> [N, D]: row p = weights.flat[order[p]] * src[order[p] / k].
  m.def("gather_pairs(Tensor src, Tensor order, int k, Tensor? weights) -> Tensor");
  // src [N, D] -> [T, D]: row t = sum_j weights[t, j] * src[position[t*k + j]].
  m.def("scatter_pairs(Tensor src, Tensor position, int k, Tensor? weights) -> Tensor");
  // dense [T, D], paired [N, D] -> [T, k] acc: <dense[t], paired[position[t*k + j]]>.
  m.def("pair_dot(Tensor dense, Tensor paired, Tensor position, int k) -> Tensor");

  // Low-rank expert GEMMs (csrc/lora). x [T, D], A [E, R, D] -> z [T, k, R] acc.
  m.def(
      "lora_shrink(Tensor x, Tensor A, Tensor ids, float dropout_p, int seed, int stream) -> Tensor");
  // z [T, k, R] acc, B [E, D, R] -> y [T, D] in B's dtype.
  m.def(
      "lora_expand(Tensor z, Tensor B, Tensor ids, Tensor? coef, float dropout_p, int seed, "
      "int stream) -> Tensor");
  // z [T, k, R] acc, x [T, D] -> [E, R, D] acc, summed over each expert's pairs in sorted order.
  m.def(
      "lora_weight_grad(Tensor z, Tensor x, Tensor order, Tensor offsets, Tensor? coef, "
      "float dropout_p, int seed, int stream) -> Tensor");
  // The LoRA-dropout keep mask [rows, cols] (bool) the kernels use, on like's device.
  m.def("dropout_mask(Tensor like, int seed, int stream, int rows, int cols, float p) -> Tensor");

  // Fused expert SwiGLU and combine (csrc/swiglu).
  // G, U [T, I]; z* [T, k, R] acc; Bg, Bu [E, I, R]; Ad [E, R, I]
  // -> hbar [T, I] (G's dtype), zd [T, k, R] acc (size 0 when Ad is absent).
  m.def(
      "moe_swiglu(Tensor G, Tensor U, Tensor ids, Tensor weights, Tensor? zg, Tensor? Bg, "
      "Tensor? zu, Tensor? Bu, Tensor? Ad, float scale, int activation, float dropout_p, int seed) "
      "-> (Tensor hbar, Tensor zd)");
  // -> dG, dU [T, I]; dweights [T, k] acc; dzg, dzu [T, k, R] acc; dBg, dBu [E, I, R]; dAd [E, R, I]
  // (weight grads in the weights' dtype; a gradient whose input is absent has size 0).
  m.def(
      "moe_swiglu_backward(Tensor grad_hbar, Tensor? grad_zd, Tensor G, Tensor U, Tensor ids, "
      "Tensor weights, Tensor? zg, Tensor? Bg, Tensor? zu, Tensor? Bu, Tensor? Ad, Tensor order, "
      "Tensor offsets, float scale, int activation, float dropout_p, int seed) -> (Tensor dG, "
      "Tensor dU, Tensor dweights, Tensor dzg, Tensor dzu, Tensor dBg, Tensor dBu, Tensor dAd)");

  // The layer's step, composed of the ops above (csrc/layer: one forward kernel for every
  // backend, and a C++ autograd kernel). x [T, H]; the frozen MLP's weights (gate, up [I, H],
  // down [H, I]) and biases; router [E, H]; LoRA weights A* [E, r, in], B* [E, out, r] in any
  // floating dtype (cast to x's) -> out [T, H], probs [T, E] acc, ids [T, k] int32.
  m.def(
      "expert_ffn(Tensor x, Tensor gate_weight, Tensor? gate_bias, Tensor up_weight, "
      "Tensor? up_bias, Tensor down_weight, Tensor? down_bias, Tensor router, Tensor? Ag, "
      "Tensor? Bg, Tensor? Au, Tensor? Bu, Tensor? Ad, Tensor? Bd, int top_k, float scale, "
      "int activation, float dropout_p, int seed) -> (Tensor out, Tensor probs, Tensor ids)");
}

}  // namespace mixlora
