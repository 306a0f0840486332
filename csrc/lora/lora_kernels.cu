// CUDA kernels of the low-rank expert GEMMs and the LoRA-dropout mask (docs/design.md,
// "Low-rank expert GEMMs").
#include <algorithm>
#include <cassert>
#include <initializer_list>

#include "lora/lora_kernels.cuh"

namespace mixlora {
namespace cuda {
namespace {

constexpr int kRankGroup = 8;         // ranks a thread accumulates per pass
constexpr int kShrinkThreads = 256;
constexpr int kExpandThreads = 128;
constexpr int kGradRankGroups = 8;    // warps (rank groups) per lora_weight_grad block, at most
constexpr int kGradRanks = kRankGroup * kGradRankGroups;  // ranks per lora_weight_grad block
constexpr int kPairUnroll = 4;        // pairs whose loads lora_weight_grad issues together
constexpr int kMaskThreads = 256;

// One block per token t; it owns z[t, :, :]. For each slot j (pair q) it builds q's dropout
// mask as bits in shared memory (one ballot per 32 columns), then, kRankGroup ranks at a time,
// each thread sums A[e, r, d] * drop(x)[d] over its columns d (V consecutive ones per step, in
// order) and the block adds the threads' sums in a fixed tree (warp butterfly, then warps in
// order).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_kernel(LoraShrinkParams p) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kWarps = kShrinkThreads / kWarpSize;
  extern __shared__ uint32_t keep_bits[];  // [ceil(D / 32)], only when dropout is active
  __shared__ acc_t warp_sums[kWarps][kRankGroup];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t t = blockIdx.x;
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + t * p.D;  // [D]
  acc_t* z = static_cast<acc_t*>(p.z);                               // [N, R]
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  for (int64_t q = t * p.k; q < (t + 1) * p.k; ++q) {
    const int32_t e = p.ids[q];
    assert(e >= 0 && e < p.E);
    const scalar_t* A = static_cast<const scalar_t*>(p.A) + int64_t(e) * p.R * p.D;  // [R, D]
    if (drop.active) {
      // The previous pair's readers of keep_bits passed the barriers of its last block sum.
      for (int64_t word = warp; word * kWarpSize < p.D; word += kWarps) {
        const int64_t d = word * kWarpSize + lane;
        const unsigned bits = __ballot_sync(kFullMask, d < p.D && drop.keep(q * p.D + d));
        if (lane == 0) keep_bits[word] = bits;
      }
      __syncthreads();
    }
    for (int64_t r0 = 0; r0 < p.R; r0 += kRankGroup) {
      acc_t sum[kRankGroup] = {};
      for (int64_t d = int64_t(threadIdx.x) * V; d < p.D; d += kShrinkThreads * V) {
        acc_t xv[V];
        load_acc<V>(x + d, xv);
        if (drop.active) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const bool kept = (keep_bits[(d + v) / kWarpSize] >> ((d + v) % kWarpSize)) & 1u;
            xv[v] *= kept ? drop.inv_keep : acc_t(0);
          }
        }
#pragma unroll
        for (int rr = 0; rr < kRankGroup; ++rr) {
          if (r0 + rr < p.R) {
            acc_t a[V];
            load_acc<V>(A + (r0 + rr) * p.D + d, a);
#pragma unroll
            for (int v = 0; v < V; ++v) sum[rr] += a[v] * xv[v];
          }
        }
      }
#pragma unroll
      for (int rr = 0; rr < kRankGroup; ++rr) {
        const acc_t s = warp_sum(sum[rr]);
        if (lane == 0) warp_sums[warp][rr] = s;
      }
      __syncthreads();
      if (threadIdx.x < kRankGroup && r0 + threadIdx.x < p.R) {
        acc_t total = 0;
        for (int w = 0; w < kWarps; ++w) total += warp_sums[w][threadIdx.x];
        z[q * p.R + r0 + threadIdx.x] = total;
      }
      __syncthreads();  // warp_sums and keep_bits are rewritten next
    }
  }
}

// Block (t, column tile) with z[t] (all k slots) in shared memory; each thread owns V
// consecutive columns of y[t] and adds its k slots in j order. B is read rank-major (B^T), so
// a warp's loads are coalesced.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kExpandThreads) lora_expand_kernel(LoraExpandParams p) {
  using acc_t = acc_of<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* z = reinterpret_cast<acc_t*>(smem);  // [k, R] of token t
  const int64_t t = blockIdx.x;
  const acc_t* z_t = static_cast<const acc_t*>(p.z) + t * p.k * p.R;
  for (int64_t i = threadIdx.x; i < p.k * p.R; i += kExpandThreads) z[i] = z_t[i];
  __syncthreads();
  const int64_t d0 = (int64_t(blockIdx.y) * kExpandThreads + threadIdx.x) * V;
  if (d0 >= p.D) return;
  const acc_t* coef = static_cast<const acc_t*>(p.coef);  // [N] or null
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  acc_t y[V] = {};
  for (int64_t j = 0; j < p.k; ++j) {
    const int64_t q = t * p.k + j;
    const int32_t e = p.ids[q];
    assert(e >= 0 && e < p.E);
    const scalar_t* B_t = static_cast<const scalar_t*>(p.B_t) + int64_t(e) * p.R * p.D;  // [R, D]
    const acc_t c = coef != nullptr ? coef[q] : acc_t(1);
    acc_t bz[V];
    rank_columns<V>(B_t, p.R, p.D, d0, z + j * p.R, bz);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const acc_t m = drop.active ? drop.factor(q * p.D + d0 + v) : acc_t(1);
      y[v] += c * m * bz[v];
    }
  }
  store_acc<V>(static_cast<scalar_t*>(p.y) + t * p.D + d0, y);
}

// Block (column tile, expert e, rank tile): lane l owns the V consecutive columns
// d0 = (tile * 32 + l) * V and warp w the ranks r0 = rank_tile * 64 + 8 w ... r0 + 7, a
// [8, V] accumulator in registers. The block walks e's pairs [offsets[e], offsets[e+1]) in
// ascending order, so every output element is one sequential sum in the contract's order.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kWarpSize * kGradRankGroups)
    lora_weight_grad_kernel(LoraWeightGradParams p) {
  using acc_t = acc_of<scalar_t>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t e = blockIdx.y;
  const int64_t d0 = (int64_t(blockIdx.x) * kWarpSize + lane) * V;
  const int64_t r0 = int64_t(blockIdx.z) * kGradRanks + warp * kRankGroup;
  if (d0 >= p.D || r0 >= p.R) return;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);  // [T, D]
  const acc_t* z = static_cast<const acc_t*>(p.z);        // [N, R]
  const acc_t* coef = static_cast<const acc_t*>(p.coef);  // [N] or null
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  acc_t sum[kRankGroup][V] = {};
  const int64_t end = p.offsets[e + 1];
  for (int64_t pos = p.offsets[e]; pos < end; pos += kPairUnroll) {
    // The loads of kPairUnroll pairs go out before any of them is added (still in order).
    int64_t q[kPairUnroll];
    acc_t c[kPairUnroll], xv[kPairUnroll][V];
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) q[u] = pos + u < end ? p.order[pos + u] : 0;
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) {
      if (pos + u < end) {
        c[u] = coef != nullptr ? coef[q[u]] : acc_t(1);
        load_acc<V>(x + (q[u] / p.k) * p.D + d0, xv[u]);
        if (drop.active) {
#pragma unroll
          for (int v = 0; v < V; ++v) xv[u][v] *= drop.factor(q[u] * p.D + d0 + v);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) {
      if (pos + u >= end) break;
#pragma unroll
      for (int rr = 0; rr < kRankGroup; ++rr) {
        if (r0 + rr < p.R) {
          const acc_t cz = c[u] * z[q[u] * p.R + r0 + rr];
#pragma unroll
          for (int v = 0; v < V; ++v) sum[rr][v] += cz * xv[u][v];
        }
      }
    }
  }
  acc_t* out = static_cast<acc_t*>(p.out);  // [E, R, D]
#pragma unroll
  for (int rr = 0; rr < kRankGroup; ++rr) {
    if (r0 + rr < p.R) {
#pragma unroll
      for (int v = 0; v < V; ++v) out[(e * p.R + r0 + rr) * p.D + d0 + v] = sum[rr][v];
    }
  }
}

// Grid-stride: each element is an independent hash of its index.
__global__ void __launch_bounds__(kMaskThreads) dropout_mask_kernel(DropoutMaskParams p) {
  const int64_t stride = int64_t(gridDim.x) * kMaskThreads;
  for (int64_t i = int64_t(blockIdx.x) * kMaskThreads + threadIdx.x; i < p.numel; i += stride) {
    p.mask[i] = dropout_keep(p.key, i, p.p);
  }
}

template <typename scalar_t>
bool rows_vectorizable(int64_t D, std::initializer_list<const void*> bases) {
  bool vec = D % kVec<scalar_t> == 0;
  for (const void* base : bases) vec = vec && aligned16(base);
  return vec;
}

}  // namespace

cudaError_t launch_lora_shrink(const LoraShrinkParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const size_t smem = p.dropout_p > 0 ? sizeof(uint32_t) * ((p.D + kWarpSize - 1) / kWarpSize) : 0;
    const dim3 grid(static_cast<unsigned>(p.T));
    auto launch = [&](auto kernel) {
      const cudaError_t err = allow_dynamic_smem(kernel, smem);
      if (err != cudaSuccess) return err;
      kernel<<<grid, kShrinkThreads, smem, stream>>>(p);
      MIXLORA_RETURN_IF_LAUNCH_FAILED();
      return cudaSuccess;
    };
    if (rows_vectorizable<scalar_t>(p.D, {p.x, p.A})) {
      return launch(lora_shrink_kernel<scalar_t, kVec<scalar_t>>);
    }
    return launch(lora_shrink_kernel<scalar_t, 1>);
  });
}

cudaError_t launch_lora_expand(const LoraExpandParams& p, cudaStream_t stream) {
  if (p.T == 0 || p.D == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_of<scalar_t>;
    const size_t smem = sizeof(acc_t) * p.k * p.R;
    auto launch = [&](auto kernel, int V) {
      const cudaError_t err = allow_dynamic_smem(kernel, smem);
      if (err != cudaSuccess) return err;
      const int64_t cols_per_block = int64_t(kExpandThreads) * V;
      const dim3 grid(static_cast<unsigned>(p.T),
                      static_cast<unsigned>((p.D + cols_per_block - 1) / cols_per_block));
      kernel<<<grid, kExpandThreads, smem, stream>>>(p);
      MIXLORA_RETURN_IF_LAUNCH_FAILED();
      return cudaSuccess;
    };
    if (rows_vectorizable<scalar_t>(p.D, {p.y, p.B_t})) {
      return launch(lora_expand_kernel<scalar_t, kVec<scalar_t>>, kVec<scalar_t>);
    }
    return launch(lora_expand_kernel<scalar_t, 1>, 1);
  });
}

cudaError_t launch_lora_weight_grad(const LoraWeightGradParams& p, cudaStream_t stream) {
  if (p.E == 0 || p.R == 0 || p.D == 0) return cudaSuccess;  // nothing to write
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const int64_t rank_groups = std::min<int64_t>(kGradRankGroups, (p.R + kRankGroup - 1) / kRankGroup);
    auto launch = [&](auto kernel, int V) {
      const int64_t cols_per_block = int64_t(kWarpSize) * V;
      const dim3 grid(static_cast<unsigned>((p.D + cols_per_block - 1) / cols_per_block),
                      static_cast<unsigned>(p.E),
                      static_cast<unsigned>((p.R + kGradRanks - 1) / kGradRanks));
      kernel<<<grid, static_cast<unsigned>(rank_groups * kWarpSize), 0, stream>>>(p);
      MIXLORA_RETURN_IF_LAUNCH_FAILED();
      return cudaSuccess;
    };
    if (rows_vectorizable<scalar_t>(p.D, {p.x})) {
      return launch(lora_weight_grad_kernel<scalar_t, kVec<scalar_t>>, kVec<scalar_t>);
    }
    return launch(lora_weight_grad_kernel<scalar_t, 1>, 1);
  });
}

cudaError_t launch_dropout_mask(const DropoutMaskParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((p.numel + kMaskThreads - 1) / kMaskThreads, 65536);
  dropout_mask_kernel<<<static_cast<unsigned>(blocks), kMaskThreads, 0, stream>>>(p);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mixlora
