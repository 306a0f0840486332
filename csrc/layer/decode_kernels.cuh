// CUDA kernels of expert_ffn's decode path: a forward of a few tokens with nothing kept for a
// backward (no grad mode: generate(), inference) and no LoRA dropout. Params struct and
// launchers. CUDA headers only, so `nvcc -c` checks them without torch (common/cuda_utils.cuh).
//
// At a few tokens the composed forward is ~16 launches of ~10 us host time each and a few
// microseconds of GPU time each, beside three frozen GEMMs of ~35 us each at 4096 x 11008
// (bench/NOTES.md v6, v7). This path does the step's expert-specific work in three kernels:
//   shrink  block (8 rows, a split of H): for every token, the router logits and the gate / up
//           LoRA activations of every expert (not only the chosen ones: no kernel between the
//           routing and the shrinks), one warp per row, partial sums over the split; at
//           E = 8, r = 16 that is 264 rows, 4 MiB of float32 weights read once for all tokens;
//           it needs only x, so the glue may run it on a side stream beside the G / U GEMMs;
//   swiglu  block (column tile, token t): the logits of t from the splits' partials (in split
//           order), softmax and top-k (topk_warp.cuh; tile 0 writes probs, ids, weights), z of
//           t's chosen experts likewise; then g, u, h of t's k pairs on the tile's columns, hbar
//           [t, i] = sum_j w_j h_j, and the tile's partial sums of zd[t, j, r] = Ad[e, r, :] . h;
//   expand  block (column tile of H, token t): zd from the tiles' partials (in a fixed order),
//           then y[t, h] = sum_j (w_j s) Bd[e_j, h, :] . zd[t, j, :]; the glue adds hbar Wd^T
//           to y with one GEMM (beta = 1).
// The LoRA weights are read in their own layout ([E, r, in] and [E, out, r]) and dtype: the
// parameters' float32, or x's dtype; nothing is cast or transposed first. Every sum runs in a
// fixed order (no atomics): two runs agree bit for bit.
//
// Legend: T tokens, H hidden, I intermediate, E experts, k slots, q = t k + j a pair,
// Rg / Ru / Rd the ranks of the gate / up / down LoRA (0 when absent), Rz = Rg + Ru.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace mixlora {
namespace cuda {

constexpr int64_t kDecodeMaxExperts = 64;  // the router's E (two experts per lane, top-k)
constexpr int64_t kDecodeMaxSlots = 8;     // k
constexpr int64_t kDecodeMaxRank = 64;     // Rg, Ru, Rd
// T: the shrink keeps a sum per token in registers; 16 is the decode targets' largest T
// (bench/NOTES.md v7), and above it the path has not been measured against the composed one.
constexpr int64_t kDecodeMaxTokens = 16;

struct DecodeParams {
  const void* x;       // [T, H] dtype
  const void* G;       // [T, I] dtype: x Wg^T (+ bias)
  const void* U;       // [T, I] dtype: x Wu^T (+ bias)
  const float* router; // [E, H] float32
  const void* Ag;      // [E, Rg, H] wdtype, or null
  const void* Bg;      // [E, I, Rg] wdtype, or null
  const void* Au;      // [E, Ru, H] wdtype, or null
  const void* Bu;      // [E, I, Ru] wdtype, or null
  const void* Ad;      // [E, Rd, I] wdtype, or null (then Bd too)
  const void* Bd;      // [E, H, Rd] wdtype, or null
  int64_t T, H, I, E, k, Rg, Ru, Rd;
  float scale;
  int activation;
  DType dtype;   // x, G, U, hbar, y
  DType wdtype;  // the LoRA weights: kFloat32 or dtype
  // Outputs.
  int32_t* ids;       // [T, k]
  float* probs;       // [T, E]
  void* hbar;         // [T, I] dtype
  void* y;            // [T, H] dtype: the down LoRA's term (when Bd)
  float* workspace;   // decode_workspace_floats(*this) floats
};

// Whether the kernels take these sizes and dtypes (the glue checks shapes and devices).
bool decode_supported(const DecodeParams& p);
// Float32 values of the workspace: the routing weights, the shrink's and swiglu's partial sums.
int64_t decode_workspace_floats(const DecodeParams& p);
// The shrink (it needs x only: it may run beside the frozen G and U GEMMs), then swiglu and
// expand (after the shrink, G and U), each on `stream`.
cudaError_t launch_decode_shrink(const DecodeParams& p, cudaStream_t stream);
cudaError_t launch_decode_swiglu_expand(const DecodeParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mixlora
