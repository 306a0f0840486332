// CUDA kernels of the permutation ops (docs/design.md, "Permutation").
#include <cassert>
#include <initializer_list>
#include <type_traits>
#include <cub/block/block_scan.cuh>

#include "permute/permute_kernels.cuh"

namespace mixlora {
namespace cuda {
namespace {

constexpr int kSortWarps = 4;       // chunks (one per warp) per block of the walks
constexpr int kScanThreads = 256;   // experts scanned at once by the single scan block
constexpr int kRowWarps = 4;        // rows (one per warp) per block of the row kernels

// ---------------------------------------------------------------------------------------------
// sort_pairs
// ---------------------------------------------------------------------------------------------

// One warp owns chunk c of pairs and visits them in order, 32 at a time. Lanes holding the same
// expert find each other with match_any; the lowest such lane (the leader) reads and advances
// the chunk's cursor for that expert, and each lane's slot is the cursor plus the number of
// equal-expert lanes below it. The cursors live in the chunk's own row of chunk_cursor, which
// no other warp touches. kScatter = false: count (cursors start at 0, end as the counts);
// kScatter = true: the cursors start at the chunk's first slot per expert (from the scan) and
// each pair's slot is written to order and position.
template <bool kScatter>
__global__ void __launch_bounds__(kSortWarps * kWarpSize)
    sort_pairs_walk_kernel(SortPairsParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t chunk = int64_t(blockIdx.x) * kSortWarps + threadIdx.x / kWarpSize;
  if (chunk >= sort_pairs_num_chunks(p.N)) return;  // the whole warp leaves together
  int32_t* cursor = p.chunk_cursor + chunk * p.E;   // [E]
  if (!kScatter) {
    for (int64_t e = lane; e < p.E; e += kWarpSize) cursor[e] = 0;
    __syncwarp();
  }
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t begin = chunk * kSortChunk;
  const int64_t end = min(p.N, begin + kSortChunk);
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int64_t q = base + lane;
    int32_t e = q < end ? p.ids[q] : -1;
    assert(q >= end || (e >= 0 && e < p.E));
    if (e >= p.E) e = -1;  // an id out of range (caller bug) is left out, never written through
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int leader = __ffs(peers) - 1;
    int32_t first = 0;
    if (e >= 0 && lane == leader) first = cursor[e];
    first = __shfl_sync(kFullMask, first, leader);
    if (e >= 0) {
      const int32_t slot = first + __popc(peers & lanes_below);
      if (kScatter) {
        p.order[slot] = static_cast<int32_t>(q);
        p.position[q] = slot;
      }
      if (lane == leader) cursor[e] = first + __popc(peers);
    }
    __syncwarp();  // the next leader of e may be another lane: order its read after this write
  }
}

// One block. Thread e (in tiles of kScanThreads experts) sums expert e's count over the chunks;
// a block scan over experts gives offsets; then thread e replaces chunk c's count of e by the
// first slot of e in chunk c (offsets[e] plus the counts of e in chunks before c).
__global__ void __launch_bounds__(kScanThreads) sort_pairs_scan_kernel(SortPairsParams p) {
  using BlockScan = cub::BlockScan<int64_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const int64_t num_chunks = sort_pairs_num_chunks(p.N);
  int64_t carry = 0;  // pairs of the experts of earlier tiles
  for (int64_t e0 = 0; e0 < p.E; e0 += kScanThreads) {
    const int64_t e = e0 + threadIdx.x;
    int64_t total = 0;
    if (e < p.E) {
      for (int64_t c = 0; c < num_chunks; ++c) total += p.chunk_cursor[c * p.E + e];
    }
    int64_t before, tile_total;
    BlockScan(scan_storage).ExclusiveSum(total, before, tile_total);
    __syncthreads();  // scan_storage is reused by the next tile
    if (e < p.E) {
      int64_t next = carry + before;
      p.offsets[e] = next;
      for (int64_t c = 0; c < num_chunks; ++c) {
        int32_t* slot = p.chunk_cursor + c * p.E + e;
        const int32_t count = *slot;
        *slot = static_cast<int32_t>(next);
        next += count;
      }
    }
    carry += tile_total;
  }
  if (threadIdx.x == 0) p.offsets[p.E] = carry;
}

// ---------------------------------------------------------------------------------------------
// gather_pairs / scatter_pairs / pair_dot: one warp per output row, V elements (16 bytes when
// the rows allow it) per lane and step.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ int64_t warp_row() {
  return int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
}

// Warp p owns out[p]. Without weights the row is copied bit for bit.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowWarps * kWarpSize) gather_pairs_kernel(GatherPairsParams p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t row = warp_row();
  if (row >= p.N) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t q = p.order[row];
  const scalar_t* src = static_cast<const scalar_t*>(p.src) + (q / p.k) * p.D;  // [D]
  scalar_t* out = static_cast<scalar_t*>(p.out) + row * p.D;                     // [D]
  const acc_t w = p.weights != nullptr ? static_cast<const acc_t*>(p.weights)[q] : acc_t(1);
  for (int64_t d = int64_t(lane) * V; d < p.D; d += kWarpSize * V) {
    acc_t x[V];
    load_acc<V>(src + d, x);
    if (p.weights != nullptr) {
#pragma unroll
      for (int v = 0; v < V; ++v) x[v] *= w;
    }
    store_acc<V>(out + d, x);  // exact for an unweighted copy: scalar -> acc -> scalar
  }
}

// Warp t owns out[t] and adds its k source rows in j order.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowWarps * kWarpSize)
    scatter_pairs_kernel(ScatterPairsParams p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t t = warp_row();
  if (t >= p.T) return;
  const int lane = threadIdx.x % kWarpSize;
  const scalar_t* src = static_cast<const scalar_t*>(p.src);  // [N, D]
  const acc_t* weights = static_cast<const acc_t*>(p.weights);  // [T, k] or null
  scalar_t* out = static_cast<scalar_t*>(p.out) + t * p.D;    // [D]
  for (int64_t d = int64_t(lane) * V; d < p.D; d += kWarpSize * V) {
    acc_t sum[V] = {};
    for (int64_t q = t * p.k; q < (t + 1) * p.k; ++q) {
      const acc_t w = weights != nullptr ? weights[q] : acc_t(1);
      acc_t x[V];
      load_acc<V>(src + int64_t(p.position[q]) * p.D + d, x);
#pragma unroll
      for (int v = 0; v < V; ++v) sum[v] += w * x[v];
    }
    store_acc<V>(out + d, sum);
  }
}

// Warp t owns out[t, :]: each lane sums its columns in order, then a warp butterfly.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowWarps * kWarpSize) pair_dot_kernel(PairDotParams p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t t = warp_row();
  if (t >= p.T) return;
  const int lane = threadIdx.x % kWarpSize;
  const scalar_t* dense = static_cast<const scalar_t*>(p.dense) + t * p.D;  // [D]
  for (int64_t q = t * p.k; q < (t + 1) * p.k; ++q) {
    const scalar_t* paired = static_cast<const scalar_t*>(p.paired) + int64_t(p.position[q]) * p.D;
    acc_t sum = 0;
    for (int64_t d = int64_t(lane) * V; d < p.D; d += kWarpSize * V) {
      acc_t a[V], b[V];
      load_acc<V>(dense + d, a);
      load_acc<V>(paired + d, b);
#pragma unroll
      for (int v = 0; v < V; ++v) sum += a[v] * b[v];
    }
    sum = warp_sum(sum);
    if (lane == 0) static_cast<acc_t*>(p.out)[q] = sum;
  }
}

// Calls launch(V, grid, block) with V = kVec (as an integral_constant) when every row pointer
// allows 16-byte access, else with V = 1; one warp per row.
template <typename scalar_t, typename Launch>
cudaError_t launch_rows(int64_t rows, int64_t D, std::initializer_list<const void*> row_bases,
                        Launch&& launch) {
  bool vec = D % kVec<scalar_t> == 0;
  for (const void* base : row_bases) vec = vec && aligned16(base);
  const dim3 grid(static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps));
  const dim3 block(kRowWarps * kWarpSize);
  if (vec) {
    launch(std::integral_constant<int, kVec<scalar_t>>{}, grid, block);
  } else {
    launch(std::integral_constant<int, 1>{}, grid, block);
  }
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_sort_pairs(const SortPairsParams& p, cudaStream_t stream) {
  const int64_t num_chunks = sort_pairs_num_chunks(p.N);
  const dim3 walk_grid(static_cast<unsigned>((num_chunks + kSortWarps - 1) / kSortWarps));
  const dim3 walk_block(kSortWarps * kWarpSize);
  if (num_chunks > 0) {
    sort_pairs_walk_kernel<false><<<walk_grid, walk_block, 0, stream>>>(p);
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
  }
  sort_pairs_scan_kernel<<<1, kScanThreads, 0, stream>>>(p);  // also writes offsets when N == 0
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  if (num_chunks > 0) {
    sort_pairs_walk_kernel<true><<<walk_grid, walk_block, 0, stream>>>(p);
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
  }
  return cudaSuccess;
}

cudaError_t launch_gather_pairs(const GatherPairsParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.D == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    return launch_rows<scalar_t>(p.N, p.D, {p.src, p.out}, [&](auto V, dim3 grid, dim3 block) {
      gather_pairs_kernel<scalar_t, V()><<<grid, block, 0, stream>>>(p);
    });
  });
}

cudaError_t launch_scatter_pairs(const ScatterPairsParams& p, cudaStream_t stream) {
  if (p.T == 0 || p.D == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    return launch_rows<scalar_t>(p.T, p.D, {p.src, p.out}, [&](auto V, dim3 grid, dim3 block) {
      scatter_pairs_kernel<scalar_t, V()><<<grid, block, 0, stream>>>(p);
    });
  });
}

cudaError_t launch_pair_dot(const PairDotParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;  // D == 0 still writes the (zero) dot products
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    return launch_rows<scalar_t>(p.T, p.D, {p.dense, p.paired}, [&](auto V, dim3 grid, dim3 block) {
      pair_dot_kernel<scalar_t, V()><<<grid, block, 0, stream>>>(p);
    });
  });
}

}  // namespace cuda
}  // namespace mixlora
