// CUDA kernels of the gating ops (docs/design.md, "Gating").
#include <algorithm>
#include <cassert>
#include <type_traits>
#include <climits>
#include <cmath>

#include "gating/gating_kernels.cuh"
#include "gating/topk_warp.cuh"

namespace mixlora {
namespace cuda {
namespace {

constexpr int kGatingWarps = 4;  // tokens (one per warp) per block
constexpr int kRouterThreads = 256;
constexpr int kRouterWarps = kRouterThreads / kWarpSize;
constexpr int kRouterTokens = 4;         // tokens per router_logits block / grad_x thread
constexpr int kRouterExperts = 8;        // experts per block (router_logits, grad_weight)
constexpr int kRouterGradThreads = 128;  // threads of a grad_weight block
constexpr int64_t kRouterSplitTokens = 32;  // tokens per grad_weight split, at least
constexpr int64_t kRouterMaxSplits = 256;

// V consecutive acc values at p, as 16-byte loads where V fills them (p then 16-byte aligned).
template <int V, typename acc_t>
__device__ __forceinline__ void load_acc_row(const acc_t* p, acc_t (&out)[V]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(acc_t));
  if constexpr (V % kPer == 0) {
#pragma unroll
    for (int c = 0; c < V / kPer; ++c) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + c * kPer);
      const acc_t* e = reinterpret_cast<const acc_t*>(&raw);
#pragma unroll
      for (int v = 0; v < kPer; ++v) out[c * kPer + v] = e[v];
    }
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = p[v];
  }
}

// Block (group of kRouterTokens tokens, group of kRouterExperts experts): thread i takes the
// columns i V .. i V + V - 1, + kRouterThreads V, ...; each (token, expert) is summed per
// thread over its columns in order, over the warp (fixed butterfly), then over the warps in
// order (shared memory). Every block reads the weight group once for its tokens; T / 4 blocks
// spread even a decode step's few tokens over kRouterThreads-wide column slices.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRouterThreads) router_logits_kernel(RouterLogitsParams p) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kOut = kRouterTokens * kRouterExperts;
  __shared__ acc_t warp_sums[kRouterWarps][kOut];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t t0 = int64_t(blockIdx.x) * kRouterTokens;
  const int64_t e0 = int64_t(blockIdx.y) * kRouterExperts;
  const int tokens = static_cast<int>(min(int64_t(kRouterTokens), p.T - t0));
  const int experts = static_cast<int>(min(int64_t(kRouterExperts), p.E - e0));
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  acc_t sum[kRouterTokens][kRouterExperts] = {};
  for (int64_t h = int64_t(threadIdx.x) * V; h < p.H; h += kRouterThreads * V) {
    acc_t xv[kRouterTokens][V];
#pragma unroll
    for (int i = 0; i < kRouterTokens; ++i) {
      if (i < tokens) {
        load_acc<V>(x + (t0 + i) * p.H + h, xv[i]);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) xv[i][v] = 0;
      }
    }
#pragma unroll
    for (int e = 0; e < kRouterExperts; ++e) {
      if (e < experts) {
        acc_t w[V];
        load_acc_row<V>(weight + (e0 + e) * p.H + h, w);
#pragma unroll
        for (int v = 0; v < V; ++v) {
#pragma unroll
          for (int i = 0; i < kRouterTokens; ++i) sum[i][e] += xv[i][v] * w[v];
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRouterTokens; ++i) {
#pragma unroll
    for (int e = 0; e < kRouterExperts; ++e) {
      const acc_t s = warp_sum(sum[i][e]);
      if (lane == 0) warp_sums[warp][i * kRouterExperts + e] = s;
    }
  }
  __syncthreads();
  if (threadIdx.x < kOut) {
    const int i = threadIdx.x / kRouterExperts, e = threadIdx.x % kRouterExperts;
    if (i < tokens && e < experts) {
      acc_t total = 0;
      for (int w = 0; w < kRouterWarps; ++w) total += warp_sums[w][threadIdx.x];
      static_cast<acc_t*>(p.logits)[(t0 + i) * p.E + e0 + e] = total;
    }
  }
}

// grad_x: thread (kRouterTokens tokens, V columns); each element summed over e in order and
// rounded once.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRouterThreads) router_grad_x_kernel(RouterLogitsBackwardParams p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t h = (int64_t(blockIdx.x) * kRouterThreads + threadIdx.x) * V;
  const int64_t t0 = int64_t(blockIdx.y) * kRouterTokens;
  if (h >= p.H) return;
  const acc_t* grad = static_cast<const acc_t*>(p.grad);
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  acc_t sum[kRouterTokens][V] = {};
  for (int64_t e = 0; e < p.E; ++e) {
    acc_t w[V];
    load_acc_row<V>(weight + e * p.H + h, w);
#pragma unroll
    for (int i = 0; i < kRouterTokens; ++i) {
      const acc_t g = t0 + i < p.T ? grad[(t0 + i) * p.E + e] : acc_t(0);
#pragma unroll
      for (int v = 0; v < V; ++v) sum[i][v] += g * w[v];
    }
  }
  scalar_t* grad_x = static_cast<scalar_t*>(p.grad_x);
#pragma unroll
  for (int i = 0; i < kRouterTokens; ++i) {
    if (t0 + i < p.T) store_acc<V>(grad_x + (t0 + i) * p.H + h, sum[i]);
  }
}

// grad_weight: block (column tile, expert group of 8, token split); thread V columns, summing
// grad[t, e] * x[t, h] over the split's tokens in order, into grad_weight (one split) or the
// split's partial.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRouterGradThreads)
    router_grad_weight_kernel(RouterLogitsBackwardParams p, int64_t split_tokens) {
  using acc_t = acc_of<scalar_t>;
  const int64_t h = (int64_t(blockIdx.x) * kRouterGradThreads + threadIdx.x) * V;
  const int64_t e0 = int64_t(blockIdx.y) * kRouterExperts;
  const int64_t t_begin = int64_t(blockIdx.z) * split_tokens;
  const int64_t t_end = min(p.T, t_begin + split_tokens);
  if (h >= p.H) return;
  const int experts = static_cast<int>(min(int64_t(kRouterExperts), p.E - e0));
  const acc_t* grad = static_cast<const acc_t*>(p.grad);
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  acc_t sum[kRouterExperts][V] = {};
  for (int64_t t = t_begin; t < t_end; ++t) {
    acc_t xv[V];
    load_acc<V>(x + t * p.H + h, xv);
#pragma unroll
    for (int e = 0; e < kRouterExperts; ++e) {
      if (e < experts) {
        const acc_t g = grad[t * p.E + e0 + e];
#pragma unroll
        for (int v = 0; v < V; ++v) sum[e][v] += g * xv[v];
      }
    }
  }
  acc_t* out = gridDim.z == 1 ? static_cast<acc_t*>(p.grad_weight)
                              : static_cast<acc_t*>(p.workspace) + int64_t(blockIdx.z) * p.E * p.H;
#pragma unroll
  for (int e = 0; e < kRouterExperts; ++e) {
    if (e < experts) {
#pragma unroll
      for (int v = 0; v < V; ++v) out[(e0 + e) * p.H + h + v] = sum[e][v];
    }
  }
}

// Token splits of grad_weight: the shape alone decides (the same bits on every device).
int64_t router_splits(int64_t T) {
  return std::max<int64_t>(1, std::min(kRouterMaxSplits, T / kRouterSplitTokens));
}


__device__ __forceinline__ int64_t warp_token() {
  return int64_t(blockIdx.x) * kGatingWarps + threadIdx.x / kWarpSize;
}

// One warp per token: softmax and top-k in acc (warp_softmax_topk, topk_warp.cuh).
template <typename scalar_t, int kCached>
__global__ void __launch_bounds__(kGatingWarps * kWarpSize) topk_gating_kernel(TopkGatingParams p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t t = warp_token();
  if (t >= p.T) return;
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits) + t * p.E;  // [E]
  warp_softmax_topk<kCached>(
      p.E, p.k, [&](int64_t e) { return to_acc(logits[e]); },
      static_cast<acc_t*>(p.probs) + t * p.E, p.ids + t * p.k,
      static_cast<acc_t*>(p.weights) + t * p.k);
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

int64_t router_backward_workspace_elems(int64_t T, int64_t H, int64_t E) {
  const int64_t splits = router_splits(T);
  return splits > 1 ? splits * E * H : 0;
}

cudaError_t launch_router_logits(const RouterLogitsParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const dim3 grid(static_cast<unsigned>((p.T + kRouterTokens - 1) / kRouterTokens),
                    static_cast<unsigned>((p.E + kRouterExperts - 1) / kRouterExperts));
    // Columns per thread: a 16-byte vector of x where every row allows it, else 1 (the weight
    // rows are then read V at a time, 16-byte aligned too: H % V == 0).
    if (rows_vectorizable<scalar_t>(p.H, {p.x, p.weight})) {
      router_logits_kernel<scalar_t, kVec<scalar_t>><<<grid, kRouterThreads, 0, stream>>>(p);
    } else {
      router_logits_kernel<scalar_t, 1><<<grid, kRouterThreads, 0, stream>>>(p);
    }
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
}

cudaError_t launch_router_logits_backward(const RouterLogitsBackwardParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_of<scalar_t>;
    const int64_t splits = router_splits(p.T);
    const int64_t split_tokens = (p.T + splits - 1) / splits;
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      if (p.T > 0) {
        const dim3 grid_x(static_cast<unsigned>((p.H + kRouterThreads * V - 1) / (kRouterThreads * V)),
                          static_cast<unsigned>((p.T + kRouterTokens - 1) / kRouterTokens));
        router_grad_x_kernel<scalar_t, V><<<grid_x, kRouterThreads, 0, stream>>>(p);
        MIXLORA_RETURN_IF_LAUNCH_FAILED();
      }
      const dim3 grid_w(static_cast<unsigned>((p.H + kRouterGradThreads * V - 1) / (kRouterGradThreads * V)),
                        static_cast<unsigned>((p.E + kRouterExperts - 1) / kRouterExperts),
                        static_cast<unsigned>(splits));
      router_grad_weight_kernel<scalar_t, V><<<grid_w, kRouterGradThreads, 0, stream>>>(p, split_tokens);
      MIXLORA_RETURN_IF_LAUNCH_FAILED();
      if (splits == 1) return cudaSuccess;
      return launch_sum_splits(static_cast<acc_t*>(p.grad_weight),
                               static_cast<const acc_t*>(p.workspace), p.E * p.H, splits, stream);
    };
    // (grad_x and grad_weight share V: both need H % V == 0 and 16-byte rows of x / grad_x.)
    if (rows_vectorizable<scalar_t>(p.H, {p.x, p.weight, p.grad_x})) {
      return launch(std::integral_constant<int, kVec<scalar_t>>{});
    }
    return launch(std::integral_constant<int, 1>{});
  });
}

}  // namespace cuda
}  // namespace mixlora
