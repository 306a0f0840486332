// CUDA kernels of the fused expert SwiGLU and combine (docs/design.md, "Fused expert SwiGLU"):
// Params structs and launchers. CUDA headers only, so `nvcc -c` checks them without torch (see
// common/cuda_utils.cuh).
//
// Legend: T tokens, I intermediate size, k slots, N = T*k pairs, q = t*k + j, E experts,
// Rg / Ru / Rd the ranks of Bg / Bu / Ad (0 when that weight is absent). "acc" = double for
// double activations, else float. key = dropout_key(seed, 2) (the down-LoRA input's stream).
// The CUDA-core kernels take Bg and Bu rank-major, as Bg_t = Bg^T [E, Rg, I] (a copy the glue
// makes, 2*E*I*R elements): a warp then reads consecutive columns, as it does for Ad. The
// tensor-core forward (bfloat16, swiglu_mma_kernels.cu) reads Bg and Bu as they are, [E, I, R]:
// that is the MMA's B-operand layout; the glue asks moe_swiglu_needs_rank_major first.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace mixlora {
namespace cuda {

// What the forward and the backward both read: the recompute's inputs and its settings.
struct SwigluInputs {
  const void* G;        // [T, I] dtype
  const void* U;        // [T, I] dtype
  const int32_t* ids;   // [T, k]
  const void* weights;  // [T, k] acc
  const void* zg;       // [T, k, Rg] acc, or null
  const void* Bg;       // [E, I, Rg] dtype, or null
  const void* Bg_t;     // [E, Rg, I] dtype (Bg rank-major), or null when not needed
  const void* zu;       // [T, k, Ru] acc, or null
  const void* Bu;       // [E, I, Ru] dtype, or null
  const void* Bu_t;     // [E, Ru, I] dtype (Bu rank-major), or null when not needed
  const void* Ad;       // [E, Rd, I] dtype, or null
  int64_t T, I, E, k, Rg, Ru, Rd;
  double scale;
  int activation;
  double dropout_p;
  uint64_t key;
  DType dtype;
};

struct MoeSwigluParams : SwigluInputs {
  void* hbar;       // [T, I] dtype
  void* zd;         // [T, k, Rd] acc (when Ad)
  void* workspace;  // moe_swiglu_workspace_elems(*this) acc elements
};
// acc elements of workspace the launch needs (0: none); call with every other field set.
int64_t moe_swiglu_workspace_elems(const MoeSwigluParams& p);
// Whether launch_moe_swiglu reads Bg_t / Bu_t (else only Bg / Bu); every other field set.
bool moe_swiglu_needs_rank_major(const MoeSwigluParams& p);
cudaError_t launch_moe_swiglu(const MoeSwigluParams& p, cudaStream_t stream);

struct MoeSwigluBackwardParams : SwigluInputs {
  const void* grad_hbar;  // [T, I] dtype
  const void* grad_zd;    // [T, k, Rd] acc, or null
  const int32_t* order;   // [N] pairs grouped by expert
  const int64_t* offsets; // [E + 1]
  void* dG;               // [T, I] dtype
  void* dU;               // [T, I] dtype
  void* dweights;         // [T, k] acc
  void* dzg;              // [T, k, Rg] acc (when Bg)
  void* dzu;              // [T, k, Ru] acc (when Bu)
  void* dBg;              // [E, I, Rg] dtype (when Bg)
  void* dBu;              // [E, I, Ru] dtype (when Bu)
  void* dAd;              // [E, Rd, I] dtype (when Ad)
  void* workspace;        // moe_swiglu_backward_workspace_elems(*this) acc elements
};
int64_t moe_swiglu_backward_workspace_elems(const MoeSwigluBackwardParams& p);
// Whether launch_moe_swiglu_backward reads Bg_t / Bu_t: not when both passes take the tensor
// cores (those read Bg / Bu as they are); every other field set.
bool moe_swiglu_backward_needs_rank_major(const MoeSwigluBackwardParams& p);
cudaError_t launch_moe_swiglu_backward(const MoeSwigluBackwardParams& p, cudaStream_t stream);

// The tensor-core forward (swiglu_mma_kernels.cu), used by launch_moe_swiglu where
// mma_forward_supported: hbar, and zd's per-column-tile partials in zd_tiles
// [mma_column_tiles(T, k, I), N, Rd] (acc; the caller adds the tiles in order; with one tile
// zd_tiles may be zd itself).
bool mma_forward_supported(const MoeSwigluParams& p);
int64_t mma_column_tiles(int64_t T, int64_t k, int64_t I);
cudaError_t launch_moe_swiglu_mma(const MoeSwigluParams& p, float* zd_tiles, cudaStream_t stream);
// Backward pass 1 on tensor cores (the same conditions, for dG / dU / grad_hbar as for
// hbar / G / U): dG, dU, and the per-pair sums (dweights, dzg / s, dzu / s) as partials
// [num_tiles, N, 1 + Rg + Ru] in sums, num_tiles = mma_column_tiles(T, k, I) (the caller
// adds them); with one tile, the outputs themselves (scaled).
bool mma_backward_supported(const MoeSwigluBackwardParams& p);
cudaError_t launch_moe_swiglu_bwd_mma(const MoeSwigluBackwardParams& p, float* sums,
                                      cudaStream_t stream);

// Backward pass 2 (dBg, dBu, dAd) on tensor cores (swiglu_wgrad_mma_kernels.cu), used by
// launch_moe_swiglu_backward where wgrad_mma_supported (bfloat16, sm_80+, I % 8 == 0, ranks
// <= 32, 16-byte aligned G / U / grad_hbar, its workspace within one [T, I] activation).
// wgrad_mma_splits pair splits (shapes only); with one the launch writes the outputs, with
// several fp32 partials [splits, E, Rg + Ru + Rd, I] at the start of p.workspace for the
// caller to add in split order (unscaled, as the CUDA-core kernel's). p.workspace holds
// wgrad_mma_workspace_elems(p) floats.
bool wgrad_mma_supported(const MoeSwigluBackwardParams& p);
int64_t wgrad_mma_splits(const MoeSwigluBackwardParams& p);
int64_t wgrad_mma_workspace_elems(const MoeSwigluBackwardParams& p);
cudaError_t launch_moe_swiglu_wgrad_mma(const MoeSwigluBackwardParams& p, int64_t splits,
                                        cudaStream_t stream);

}  // namespace cuda
}  // namespace mixlora
