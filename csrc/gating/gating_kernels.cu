// CUDA kernels of the gating ops (docs/design.md, "Gating").
#include <cassert>
#include <climits>
#include <cmath>

#include "gating/gating_kernels.cuh"

namespace mixlora {
namespace cuda {
namespace {

constexpr int kGatingWarps = 4;  // tokens (one per warp) per block

__device__ __forceinline__ int64_t warp_token() {
  return int64_t(blockIdx.x) * kGatingWarps + threadIdx.x / kWarpSize;
}

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

// One warp per token, softmax and top-k in acc. Lane l owns experts l, l + 32, ... With
// kCached > 0 (E <= 32 * kCached) a lane keeps its probabilities in registers; with
// kCached == 0 (any E) they live in the token's probs row, each lane rereading only what it
// wrote. The j-th pick is the first expert, in (prob desc, index asc) order, that comes after
// pick j - 1: no set of picked experts to keep.
template <typename scalar_t, int kCached>
__global__ void __launch_bounds__(kGatingWarps * kWarpSize) topk_gating_kernel(TopkGatingParams p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t t = warp_token();
  if (t >= p.T) return;
  const int lane = threadIdx.x % kWarpSize;
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits) + t * p.E;  // [E]
  acc_t* probs = static_cast<acc_t*>(p.probs) + t * p.E;                      // [E]
  acc_t cached[kCached > 0 ? kCached : 1];
  // f(prob slot, e) for each expert e this lane owns.
  auto for_own = [&](auto&& f) {
    if constexpr (kCached > 0) {
#pragma unroll
      for (int i = 0; i < kCached; ++i) {
        const int64_t e = lane + int64_t(i) * kWarpSize;
        if (e < p.E) f(cached[i], e);
      }
    } else {
      for (int64_t e = lane; e < p.E; e += kWarpSize) f(probs[e], e);
    }
  };

  acc_t max_logit = -INFINITY;
  for_own([&](acc_t&, int64_t e) { max_logit = max(max_logit, to_acc(logits[e])); });
  max_logit = warp_max(max_logit);
  acc_t sum = 0;
  for_own([&](acc_t& prob, int64_t e) {
    prob = exp(to_acc(logits[e]) - max_logit);
    sum += prob;
  });
  sum = warp_sum(sum);
  for_own([&](acc_t& prob, int64_t e) {
    prob /= sum;
    if constexpr (kCached > 0) probs[e] = prob;
  });

  int32_t* ids = p.ids + t * p.k;                                  // [k]
  acc_t* weights = static_cast<acc_t*>(p.weights) + t * p.k;       // [k]
  acc_t prev_p = INFINITY;
  int32_t prev_e = -1;
  acc_t top_sum = 0;
  for (int64_t j = 0; j < p.k; ++j) {
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
  for (int64_t j = lane; j < p.k; j += kWarpSize) weights[j] /= top_sum;
}

// One warp per token; lane l owns experts l, l + 32, ... The grad_logits row first holds gp
// (the gradient w.r.t. probs), then the softmax backward, each lane touching only its experts.
template <typename acc_t>
__global__ void __launch_bounds__(kGatingWarps * kWarpSize)
    topk_gating_backward_kernel(TopkGatingBackwardParams p) {
  const int64_t t = warp_token();
  if (t >= p.T) return;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t* probs = static_cast<const acc_t*>(p.probs) + t * p.E;                // [E]
  const acc_t* grad_w = static_cast<const acc_t*>(p.grad_weights) + t * p.k;        // [k]
  const acc_t* weights = static_cast<const acc_t*>(p.weights) + t * p.k;            // [k]
  const acc_t* grad_probs =
      p.grad_probs != nullptr ? static_cast<const acc_t*>(p.grad_probs) + t * p.E : nullptr;  // [E]
  const int32_t* ids = p.ids + t * p.k;                                              // [k]
  acc_t* out = static_cast<acc_t*>(p.grad_logits) + t * p.E;                          // [E]
  acc_t top_sum = 0, c = 0;
  for (int64_t j = 0; j < p.k; ++j) {
    assert(ids[j] >= 0 && ids[j] < p.E);
    top_sum += probs[ids[j]];
    c += grad_w[j] * weights[j];
  }
  acc_t dot = 0;
  for (int64_t e = lane; e < p.E; e += kWarpSize) {
    acc_t gp = grad_probs != nullptr ? grad_probs[e] : acc_t(0);
    for (int64_t j = 0; j < p.k; ++j) {
      if (ids[j] == e) gp += (grad_w[j] - c) / top_sum;
    }
    out[e] = gp;
    dot += probs[e] * gp;
  }
  dot = warp_sum(dot);
  for (int64_t e = lane; e < p.E; e += kWarpSize) out[e] = probs[e] * (out[e] - dot);
}

dim3 token_grid(int64_t T) { return dim3(static_cast<unsigned>((T + kGatingWarps - 1) / kGatingWarps)); }

}  // namespace

cudaError_t launch_topk_gating(const TopkGatingParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const dim3 block(kGatingWarps * kWarpSize);
    if (p.E <= kWarpSize) {
      topk_gating_kernel<scalar_t, 1><<<token_grid(p.T), block, 0, stream>>>(p);
    } else if (p.E <= 2 * kWarpSize) {
      topk_gating_kernel<scalar_t, 2><<<token_grid(p.T), block, 0, stream>>>(p);
    } else {
      topk_gating_kernel<scalar_t, 0><<<token_grid(p.T), block, 0, stream>>>(p);
    }
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
}

cudaError_t launch_topk_gating_backward(const TopkGatingBackwardParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const dim3 block(kGatingWarps * kWarpSize);
  if (p.acc_dtype == DType::kFloat64) {
    topk_gating_backward_kernel<double><<<token_grid(p.T), block, 0, stream>>>(p);
  } else {
    topk_gating_backward_kernel<float><<<token_grid(p.T), block, 0, stream>>>(p);
  }
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mixlora
