// Softmax and top-k of one token's router logits by one warp: the body of topk_gating_kernel,
// shared with the decode path's swiglu kernel (layer/decode_kernels.cu) so that both pick
// experts by the same rules. Device code (nvcc only).
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/cuda_utils.cuh"

namespace mixlora {
namespace cuda {

// (p, e) comes before (p2, e2) in the top-k order: larger prob first, then lower expert index.
template <typename acc_t>
__device__ __forceinline__ bool ranks_before(acc_t p, int32_t e, acc_t p2, int32_t e2) {
  return p > p2 || (p == p2 && e < e2);
}

// The first (p, e) of the warp in the top-k order; every lane ends with it (a total order, so
// the butterfly's pairing does not matter).
template <typename acc_t>
__device__ __forceinline__ void warp_first(acc_t& p, int32_t& e) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const acc_t other_p = __shfl_xor_sync(kFullMask, p, offset);
    const int32_t other_e = __shfl_xor_sync(kFullMask, e, offset);
    if (ranks_before(other_p, other_e, p, e)) {
      p = other_p;
      e = other_e;
    }
  }
}

// probs[e] = softmax(logit)[e] over the E experts, then ids[j], weights[j] (j < k): the top-k
// experts and their probabilities renormalized to sum 1. Every lane of the warp calls it; lane l
// owns experts l, l + 32, ... With kCached > 0 (E <= 32 * kCached) a lane keeps its
// probabilities in registers and probs may be null; with kCached == 0 (any E) they live in
// probs, each lane rereading only what it wrote. The j-th pick is the first expert, in
// (prob desc, index asc) order, that comes after pick j - 1: no set of picked experts to keep.
// ids and weights are written by lane 0, then rescaled by lanes j (a __syncwarp between).
template <int kCached, typename acc_t, typename Logit>
__device__ __forceinline__ void warp_softmax_topk(int64_t E, int64_t k, Logit logit, acc_t* probs,
                                                  int32_t* ids, acc_t* weights) {
  const int lane = threadIdx.x % kWarpSize;
  acc_t cached[kCached > 0 ? kCached : 1];
  // f(prob slot, e) for each expert e this lane owns.
  auto for_own = [&](auto&& f) {
    if constexpr (kCached > 0) {
#pragma unroll
      for (int i = 0; i < kCached; ++i) {
        const int64_t e = lane + int64_t(i) * kWarpSize;
        if (e < E) f(cached[i], e);
      }
    } else {
      for (int64_t e = lane; e < E; e += kWarpSize) f(probs[e], e);
    }
  };

  acc_t max_logit = -INFINITY;
  for_own([&](acc_t&, int64_t e) { max_logit = max(max_logit, logit(e)); });
  max_logit = warp_max(max_logit);
  acc_t sum = 0;
  for_own([&](acc_t& prob, int64_t e) {
    prob = exp(logit(e) - max_logit);
    sum += prob;
  });
  sum = warp_sum(sum);
  for_own([&](acc_t& prob, int64_t e) {
    prob /= sum;
    if constexpr (kCached > 0) {
      if (probs != nullptr) probs[e] = prob;
    }
  });

  acc_t prev_p = INFINITY;
  int32_t prev_e = -1;
  acc_t top_sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    acc_t best_p = -INFINITY;
    int32_t best_e = INT_MAX;
    for_own([&](acc_t& prob, int64_t e) {
      const int32_t e32 = static_cast<int32_t>(e);
      if (ranks_before(prev_p, prev_e, prob, e32) && ranks_before(prob, e32, best_p, best_e)) {
        best_p = prob;
        best_e = e32;
      }
    });
    warp_first(best_p, best_e);
    if (best_e == INT_MAX) best_e = 0;  // only NaN probabilities left: keep the id in range
    if (lane == 0) {
      ids[j] = best_e;
      weights[j] = best_p;
    }
    top_sum += best_p;
    prev_p = best_p;
    prev_e = best_e;
  }
  __syncwarp();  // lane 0's writes above, before the other lanes rescale them
  for (int64_t j = lane; j < k; j += kWarpSize) weights[j] /= top_sum;
}

}  // namespace cuda
}  // namespace mixlora
