// CUDA kernels of the low-rank expert GEMMs and the LoRA-dropout mask (docs/design.md,
// "Low-rank expert GEMMs").
#include <algorithm>
#include <cassert>

#include "lora/lora_kernels.cuh"

namespace mixlora {
namespace cuda {
namespace {

constexpr int kRankGroup = 8;         // ranks a thread accumulates per pass
constexpr int kShrinkThreads = 256;
constexpr int64_t kShrinkSpreadPairs = 1024;  // pairs below which lora_shrink splits rank groups
constexpr int kExpandThreads = 128;
constexpr int kGradRankGroups = 8;    // warps (rank groups) per lora_weight_grad block, at most
constexpr int kGradRanks = kRankGroup * kGradRankGroups;  // ranks per lora_weight_grad block
constexpr int kGradChunk = 16;        // pairs lora_weight_grad stages in shared memory at once
constexpr int kStageRows = kWarpSize / kRankGroup;     // pairs whose z a block copies per pass
constexpr int kStagePasses = kGradChunk / kStageRows;  // z values a thread copies per chunk
constexpr int kGradPairsPerSplit = 128;  // pairs per split of an expert, on average, at least
constexpr int kGradMaxSplits = 8;       // pair splits of an expert, at most
constexpr int64_t kGradWorkspaceBytes = int64_t(64) << 20;  // split partials, at most
constexpr int kMaskThreads = 256;

// Block (pair q, y): z[q, r0 .. r0 + kRankGroup) for the rank groups r0 = kRankGroup * (y,
// y + gridDim.y, ..). With dropout it first builds q's mask as bits in shared memory (one
// ballot per 32 columns); then, a rank group at a time, each thread sums A[e, r, d] *
// drop(x)[d] over its columns d (V consecutive ones per step, in order) and the block adds the
// threads' sums in a fixed tree (warp butterfly, then warps in order). Few pairs take one
// block per rank group (launch_lora_shrink): one block per token left all but T SMs idle at
// decode (32 us per call at T = 8, H = 4096; bench/NOTES.md v5); many pairs take one block per
// pair, which builds the mask once (per rank group, it cost 14% at T = 4096 with dropout). The
// sums, and so the bits, are the same whatever the grid.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_kernel(LoraShrinkParams p) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kWarps = kShrinkThreads / kWarpSize;
  extern __shared__ uint32_t keep_bits[];  // [ceil(D / 32)], only when dropout is active
  __shared__ acc_t warp_sums[kWarps][kRankGroup];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t q = blockIdx.x;
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + (q / p.k) * p.D;  // [D] of q's token
  acc_t* z = static_cast<acc_t*>(p.z);                                     // [N, R]
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  const int32_t e = p.ids[q];
  assert(e >= 0 && e < p.E);
  const scalar_t* A = static_cast<const scalar_t*>(p.A) + int64_t(e) * p.R * p.D;  // [R, D]
  if (drop.active) {
    for (int64_t word = warp; word * kWarpSize < p.D; word += kWarps) {
      const int64_t d = word * kWarpSize + lane;
      const unsigned bits = __ballot_sync(kFullMask, d < p.D && drop.keep(q * p.D + d));
      if (lane == 0) keep_bits[word] = bits;
    }
    __syncthreads();
  }
  for (int64_t r0 = int64_t(blockIdx.y) * kRankGroup; r0 < p.R; r0 += int64_t(gridDim.y) * kRankGroup) {
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
    __syncthreads();  // warp_sums is rewritten next
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

// V acc values at p, 16 bytes at a time (p 16-byte aligned, V * sizeof(acc_t) a multiple of 16).
template <int V, typename acc_t>
__device__ __forceinline__ void load_acc_words(const acc_t* p, acc_t (&out)[V]) {
  constexpr int kPerWord = 16 / static_cast<int>(sizeof(acc_t));
  static_assert(V % kPerWord == 0, "whole 16-byte words");
#pragma unroll
  for (int i = 0; i < V / kPerWord; ++i) {
    const uint4 raw = reinterpret_cast<const uint4*>(p)[i];
    const acc_t* w = reinterpret_cast<const acc_t*>(&raw);
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) out[i * kPerWord + j] = w[j];
  }
}

// Store V acc values at p: 16 bytes at a time when V of them fill whole 16-byte words (p then
// 16-byte aligned), else one at a time.
template <int V, typename acc_t>
__device__ __forceinline__ void store_acc_row(acc_t* p, const acc_t (&in)[V]) {
  constexpr int kPerWord = 16 / static_cast<int>(sizeof(acc_t));
  if constexpr (V % kPerWord == 0) {
#pragma unroll
    for (int i = 0; i < V / kPerWord; ++i) {
      uint4 raw;
      acc_t* w = reinterpret_cast<acc_t*>(&raw);
#pragma unroll
      for (int j = 0; j < kPerWord; ++j) w[j] = in[i * kPerWord + j];
      reinterpret_cast<uint4*>(p)[i] = raw;
    }
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) p[v] = in[v];
  }
}

// Block (column tile, expert e, rank tile * S + split s): lane l owns the V consecutive columns
// d0 = (tile * 32 + l) * V and warp w the ranks r0 = rank_tile * 64 + 8 w ... r0 + 7, a [8, V]
// accumulator in registers. Split s of the S = `splits` takes e's pairs
// [b + n * s / S, b + n * (s + 1) / S) (b = offsets[e], n the expert's pair count) and adds
// them in ascending order, so every output element is S sequential sums added in split order.
// The pairs go kGradChunk at a time through two shared-memory stages, cp.async copying chunk
// c + 1 while chunk c is added. A stage holds per pair the offsets of its z and x rows, its
// dropout index base q * D, coef, the z values of the block's RT = 8 * warps ranks (zeros past
// R; times coef once they land) and, with V > 1, the tile's 32 * V columns of its x row (V == 1
// reads x from global memory). With S == 1 the block writes out[e, r, d]; else
// workspace[s, e, r, d] for launch_sum_splits.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kWarpSize * kGradRankGroups)
    lora_weight_grad_kernel(LoraWeightGradParams p, int64_t splits) {
  using acc_t = acc_of<scalar_t>;
  constexpr bool kStageX = V > 1;
  constexpr int kTileCols = kWarpSize * V;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int64_t z_rows_s[2][kGradChunk];  // q * R
  __shared__ int64_t rows_s[2][kGradChunk];    // (q / k) * D
  __shared__ int64_t masks_s[2][kGradChunk];   // q * D
  __shared__ acc_t coef_s[2][kGradChunk];
  const int ranks = int(blockDim.x) / kWarpSize * kRankGroup;  // RT
  acc_t* z_s = reinterpret_cast<acc_t*>(smem);  // [2][kGradChunk][RT]
  scalar_t* x_s = reinterpret_cast<scalar_t*>(z_s + 2 * kGradChunk * ranks);  // [2][kGradChunk][32V]
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = int(blockDim.x) / kWarpSize;
  const int64_t e = blockIdx.y, split = blockIdx.z % splits;
  const int64_t rank_base = int64_t(blockIdx.z / splits) * kGradRanks;
  const int64_t d0 = (int64_t(blockIdx.x) * kWarpSize + lane) * V;
  const int64_t r0 = rank_base + warp * kRankGroup;
  const bool active = d0 < p.D;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);  // [T, D]
  const acc_t* z = static_cast<const acc_t*>(p.z);        // [N, R]
  const acc_t* coef = static_cast<const acc_t*>(p.coef);  // [N] or null
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  const int64_t first = p.offsets[e], count = p.offsets[e + 1] - first;
  const int64_t begin = first + count * split / splits;
  const int64_t end = first + count * (split + 1) / splits;

  // Thread i copies rank i % RT of the chunk's z rows i / RT + 4 j (blockDim = 4 RT).
  const int stage_rank = threadIdx.x % ranks, stage_pair = threadIdx.x / ranks;
  const bool stage_valid = rank_base + stage_rank < p.R;
  // Stage st <- the chunk at base: its pair list first (thread c: pair c), then the copies,
  // committed as one group. The caller has made the stage's previous readers wait.
  auto stage_chunk = [&](int st, int64_t base) {
    const int n = static_cast<int>(min(int64_t(kGradChunk), end - base));
    if (threadIdx.x < n) {
      const int64_t q = p.order[base + threadIdx.x];
      z_rows_s[st][threadIdx.x] = q * p.R;
      rows_s[st][threadIdx.x] = (q / p.k) * p.D;
      masks_s[st][threadIdx.x] = q * p.D;
      if (coef != nullptr) cp_async<sizeof(acc_t)>(&coef_s[st][threadIdx.x], coef + q);
    }
    __syncthreads();
    acc_t* zst = z_s + st * kGradChunk * ranks;
    const acc_t* z_cols = z + rank_base + stage_rank;
#pragma unroll
    for (int j = 0; j < kStagePasses; ++j) {
      const int c = stage_pair + j * kStageRows;
      if (c < n && stage_valid) {
        cp_async<sizeof(acc_t)>(zst + c * ranks + stage_rank, z_cols + z_rows_s[st][c]);
      } else {
        zst[c * ranks + stage_rank] = acc_t(0);
      }
    }
    if (kStageX && active) {  // lane l copies its own 16 bytes of each pair's row
      scalar_t* xst = x_s + st * kGradChunk * kTileCols + lane * V;
      for (int c = warp; c < n; c += warps) {
        cp_async<16>(xst + c * kTileCols, x + rows_s[st][c] + d0);
      }
    }
    cp_async_commit();
  };

  acc_t sum[kRankGroup][V] = {};
  // The chunk's n pairs of stage st into sum, in order.
  auto add_chunk = [&](int st, int n) {
    const acc_t* zc = z_s + st * kGradChunk * ranks + warp * kRankGroup;  // pair c's ranks
    const scalar_t* xc = x_s + st * kGradChunk * kTileCols + lane * V;   // pair c's columns
    for (int c = 0; c < n; ++c, zc += ranks, xc += kTileCols) {
      acc_t xv[V], cz[kRankGroup];
      load_acc<V>(kStageX ? xc : x + rows_s[st][c] + d0, xv);
      load_acc_words<kRankGroup>(zc, cz);
      if (drop.active) {
#pragma unroll
        for (int v = 0; v < V; ++v) xv[v] *= drop.factor(masks_s[st][c] + d0 + v);
      }
#pragma unroll
      for (int rr = 0; rr < kRankGroup; ++rr) {
#pragma unroll
        for (int v = 0; v < V; ++v) sum[rr][v] += cz[rr] * xv[v];
      }
    }
  };

  if (begin < end) stage_chunk(0, begin);
  int st = 0;
  for (int64_t base = begin; base < end; base += kGradChunk, st ^= 1) {
    const int n = static_cast<int>(min(int64_t(kGradChunk), end - base));
    const bool more = base + kGradChunk < end;
    __syncthreads();  // the other stage's readers (the previous chunk) are done
    if (more) stage_chunk(st ^ 1, base + kGradChunk);
    if (more) {
      cp_async_wait<1>();  // this chunk's group has landed (the next one may still fly)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // ... for every thread's copies
    if (coef != nullptr) {  // z <- coef * z, each value by the thread that copied it
      acc_t* zst = z_s + st * kGradChunk * ranks;
#pragma unroll
      for (int j = 0; j < kStagePasses; ++j) {
        const int c = stage_pair + j * kStageRows;
        if (c < n) zst[c * ranks + stage_rank] *= coef_s[st][c];
      }
      __syncthreads();
    }
    if (active) add_chunk(st, n);
  }
  if (!active) return;
  acc_t* dst = splits == 1 ? static_cast<acc_t*>(p.out) + e * p.R * p.D  // [R, D]
                           : static_cast<acc_t*>(p.workspace) + (split * p.E + e) * p.R * p.D;
#pragma unroll
  for (int rr = 0; rr < kRankGroup; ++rr) {
    if (r0 + rr < p.R) store_acc_row<V>(dst + (r0 + rr) * p.D + d0, sum[rr]);
  }
}

// Grid-stride: each element is an independent hash of its index.
__global__ void __launch_bounds__(kMaskThreads) dropout_mask_kernel(DropoutMaskParams p) {
  const int64_t stride = int64_t(gridDim.x) * kMaskThreads;
  for (int64_t i = int64_t(blockIdx.x) * kMaskThreads + threadIdx.x; i < p.numel; i += stride) {
    p.mask[i] = dropout_keep(p.key, i, p.p);
  }
}

// Pair splits per expert of lora_weight_grad: about kGradPairsPerSplit pairs or more each, at
// most kGradMaxSplits, partials within kGradWorkspaceBytes. The shapes alone decide, never the
// device, so the summation order is the same everywhere; few pairs take one split and skip
// the partials' round trip through the workspace.
int64_t weight_grad_splits(const LoraWeightGradParams& p, int64_t acc_bytes) {
  const int64_t outputs = p.E * p.R * p.D;
  if (outputs == 0) return 1;
  const int64_t by_pairs = p.T * p.k / (p.E * kGradPairsPerSplit);
  const int64_t by_budget = kGradWorkspaceBytes / (outputs * acc_bytes);
  return std::max<int64_t>(1, std::min({int64_t(kGradMaxSplits), by_pairs, by_budget}));
}

}  // namespace

cudaError_t launch_lora_shrink(const LoraShrinkParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  if (mma_shrink_supported(p)) return launch_lora_shrink_mma(p, stream);
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const size_t smem = p.dropout_p > 0 ? sizeof(uint32_t) * ((p.D + kWarpSize - 1) / kWarpSize) : 0;
    // One block per pair and rank group while the pairs alone would leave SMs idle.
    const int64_t rank_groups = (p.R + kRankGroup - 1) / kRankGroup;
    const dim3 grid(static_cast<unsigned>(p.T * p.k),
                    static_cast<unsigned>(p.T * p.k < kShrinkSpreadPairs ? rank_groups : 1));
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

namespace {

constexpr int kSplitThreads = 256;

// One thread per (t, e, r): the slots of token t that picked e, summed in j order, split.
__global__ void __launch_bounds__(kSplitThreads) lora_expand_split_kernel(LoraExpandSplitParams p) {
  const int64_t i = int64_t(blockIdx.x) * kSplitThreads + threadIdx.x;
  const int64_t ER = p.E * p.R;
  if (i >= p.T * ER) return;
  const int64_t t = i / ER, er = i % ER, e = er / p.R, r = er % p.R;
  float v = 0.f;
  for (int64_t j = 0; j < p.k; ++j) {
    const int64_t q = t * p.k + j;
    if (p.ids[q] == e) v += (p.coef != nullptr ? p.coef[q] : 1.f) * p.z[q * p.R + r];
  }
  const __nv_bfloat16 hi = __float2bfloat16_rn(v);
  __nv_bfloat16* zm = static_cast<__nv_bfloat16*>(p.zm) + t * 2 * ER + er;
  zm[0] = hi;
  zm[ER] = __float2bfloat16_rn(v - __bfloat162float(hi));
}

// One thread per (t, j, r).
__global__ void __launch_bounds__(kSplitThreads) lora_shrink_gather_kernel(LoraShrinkGatherParams p) {
  const int64_t i = int64_t(blockIdx.x) * kSplitThreads + threadIdx.x;
  if (i >= p.T * p.k * p.R) return;
  const int64_t q = i / p.R, r = i % p.R, t = q / p.k;
  const int32_t e = p.ids[q];
  assert(e >= 0 && e < p.E);
  p.z[i] = p.scale * p.z_all[(t * p.E + e) * p.R + r];
}

// One thread per sorted position p: its expert by binary search over offsets (E + 1 values).
__global__ void __launch_bounds__(kSplitThreads) lora_pair_ids_kernel(LoraPairIdsParams p) {
  const int64_t i = int64_t(blockIdx.x) * kSplitThreads + threadIdx.x;
  if (i >= p.N) return;
  int64_t lo = 0, hi = p.E;  // the expert e with offsets[e] <= i < offsets[e + 1]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (p.offsets[mid] <= i) lo = mid; else hi = mid;
  }
  p.ids[p.order[i]] = static_cast<int32_t>(lo);
}

// Thread: 8 consecutive columns of one pair row (16-byte accesses where D % 8 == 0 and x is
// 16-byte aligned; xm is a fresh allocation).
__global__ void __launch_bounds__(kSplitThreads) lora_mask_rows_kernel(LoraMaskRowsParams p) {
  const int64_t groups = (p.D + 7) / 8;
  const int64_t i = int64_t(blockIdx.x) * kSplitThreads + threadIdx.x;
  if (i >= p.T * p.k * groups) return;
  const int64_t q = i / groups, d0 = (i % groups) * 8;
  const DropoutScale<float> drop(p.dropout_p, p.key);
  const uint16_t* src = static_cast<const uint16_t*>(p.x) + (q / p.k) * p.D;
  uint16_t* dst = static_cast<uint16_t*>(p.xm) + q * p.D;
  if (p.D % 8 == 0 && aligned16(p.x)) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src + d0);
    const uint16_t* in = reinterpret_cast<const uint16_t*>(&raw);
    uint4 out_raw;
    uint16_t* out = reinterpret_cast<uint16_t*>(&out_raw);
#pragma unroll
    for (int v = 0; v < 8; ++v) out[v] = drop.keep(q * p.D + d0 + v) ? in[v] : uint16_t(0);
    *reinterpret_cast<uint4*>(dst + d0) = out_raw;
  } else {
    for (int64_t d = d0; d < min(d0 + 8, p.D); ++d) dst[d] = drop.keep(q * p.D + d) ? src[d] : uint16_t(0);
  }
}

}  // namespace

cudaError_t launch_lora_shrink_gather(const LoraShrinkGatherParams& p, cudaStream_t stream) {
  const int64_t n = p.T * p.k * p.R;
  if (n == 0) return cudaSuccess;
  lora_shrink_gather_kernel<<<static_cast<unsigned>((n + kSplitThreads - 1) / kSplitThreads),
                              kSplitThreads, 0, stream>>>(p);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

cudaError_t launch_lora_mask_rows(const LoraMaskRowsParams& p, cudaStream_t stream) {
  const int64_t n = p.T * p.k * ((p.D + 7) / 8);
  if (n == 0) return cudaSuccess;
  lora_mask_rows_kernel<<<static_cast<unsigned>((n + kSplitThreads - 1) / kSplitThreads),
                          kSplitThreads, 0, stream>>>(p);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

cudaError_t launch_lora_expand_split(const LoraExpandSplitParams& p, cudaStream_t stream) {
  const int64_t n = p.T * p.E * p.R;
  if (n == 0) return cudaSuccess;
  lora_expand_split_kernel<<<static_cast<unsigned>((n + kSplitThreads - 1) / kSplitThreads),
                             kSplitThreads, 0, stream>>>(p);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

cudaError_t launch_lora_pair_ids(const LoraPairIdsParams& p, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  lora_pair_ids_kernel<<<static_cast<unsigned>((p.N + kSplitThreads - 1) / kSplitThreads),
                         kSplitThreads, 0, stream>>>(p);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

int64_t lora_weight_grad_workspace_elems(const LoraWeightGradParams& p) {
  int64_t elems = 0;
  dispatch_dtype(p.dtype, [&](auto zero) {
    using acc_t = acc_of<decltype(zero)>;
    const int64_t splits = weight_grad_splits(p, sizeof(acc_t));
    elems = splits > 1 ? splits * p.E * p.R * p.D : 0;
    return cudaSuccess;
  });
  return elems;
}

cudaError_t launch_lora_weight_grad(const LoraWeightGradParams& p, cudaStream_t stream) {
  if (p.E == 0 || p.R == 0 || p.D == 0) return cudaSuccess;  // nothing to write
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_of<scalar_t>;
    const int64_t splits = weight_grad_splits(p, sizeof(acc_t));
    const int64_t rank_groups = std::min<int64_t>(kGradRankGroups, (p.R + kRankGroup - 1) / kRankGroup);
    auto launch = [&](auto kernel, int V) {
      // Two stages of z [kGradChunk, RT] acc and, with V > 1, x [kGradChunk, 32 V].
      const size_t smem = 2 * kGradChunk *
                          (sizeof(acc_t) * rank_groups * kRankGroup + (V > 1 ? 16 * kWarpSize : 0));
      const cudaError_t err = allow_dynamic_smem(kernel, smem);
      if (err != cudaSuccess) return err;
      const int64_t cols_per_block = int64_t(kWarpSize) * V;
      const int64_t rank_tiles = (p.R + kGradRanks - 1) / kGradRanks;
      const dim3 grid(static_cast<unsigned>((p.D + cols_per_block - 1) / cols_per_block),
                      static_cast<unsigned>(p.E), static_cast<unsigned>(rank_tiles * splits));
      kernel<<<grid, static_cast<unsigned>(rank_groups * kWarpSize), smem, stream>>>(p, splits);
      MIXLORA_RETURN_IF_LAUNCH_FAILED();
      return cudaSuccess;
    };
    constexpr int kV = kVec<scalar_t>;
    const cudaError_t err = rows_vectorizable<scalar_t>(p.D, {p.x, p.out, p.workspace})
                                ? launch(lora_weight_grad_kernel<scalar_t, kV>, kV)
                                : launch(lora_weight_grad_kernel<scalar_t, 1>, 1);
    if (err != cudaSuccess || splits == 1) return err;
    // (The workspace is [S, E, R, D].)
    return launch_sum_splits(static_cast<acc_t*>(p.out), static_cast<const acc_t*>(p.workspace),
                             p.E * p.R * p.D, splits, stream);
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
