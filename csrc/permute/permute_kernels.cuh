// CUDA kernels of the permutation ops (docs/design.md, "Permutation"): their Params structs
// and launchers.
//
// CUDA headers only (no torch), so `nvcc -c` checks the kernels without a CUDA build of
// PyTorch; the glue (permute_cuda.cpp) includes this file with the host compiler, which sees
// only the declarations outside `__CUDACC__`.
//
// Legend: T tokens, k slots per token, N = T*k pairs, pair id q = t*k + j, E experts,
// D a feature width, R LoRA rank. "acc" = double for double inputs, else float.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace mixlora {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// sort_pairs: a stable counting sort of the N pairs by expert, in three launches whose grids
// follow from N and E only. The pairs are cut into chunks of kSortChunk; one warp owns a chunk
// and walks it in pair order, 32 pairs at a time, ranking equal experts within the 32 by lane
// (match_any + popc). Pass 1 counts each chunk's pairs per expert, pass 2 (one block) turns the
// counts into offsets and into each chunk's first slot per expert, pass 3 repeats the walk and
// writes order/position. Every slot follows from (expert, chunk, pair order): no atomics.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kSortChunk = 512;

MIXLORA_HD int64_t sort_pairs_num_chunks(int64_t N) { return (N + kSortChunk - 1) / kSortChunk; }

struct SortPairsParams {
  const int32_t* ids;      // [N] the expert of each pair
  int32_t* order;          // [N] pair ids grouped by expert, stable
  int64_t* offsets;        // [E + 1]
  int32_t* position;       // [N] inverse of order
  int32_t* chunk_cursor;   // [sort_pairs_num_chunks(N), E] workspace
  int64_t N;
  int64_t E;
};

// Writes offsets even when N == 0.
cudaError_t launch_sort_pairs(const SortPairsParams& p, cudaStream_t stream);

// out[p] = (weights.flat[order[p]] or 1) * src[order[p] / k]
struct GatherPairsParams {
  const void* src;       // [T, D] dtype
  const int32_t* order;  // [N]
  const void* weights;   // [T, k] acc, or null
  void* out;             // [N, D] dtype
  int64_t N, D, k;
  DType dtype;
};
cudaError_t launch_gather_pairs(const GatherPairsParams& p, cudaStream_t stream);

// out[t] = sum_j (weights[t, j] or 1) * src[position[t*k + j]], j in order
struct ScatterPairsParams {
  const void* src;          // [N, D] dtype
  const int32_t* position;  // [N]
  const void* weights;      // [T, k] acc, or null
  void* out;                // [T, D] dtype
  int64_t T, D, k;
  DType dtype;
};
cudaError_t launch_scatter_pairs(const ScatterPairsParams& p, cudaStream_t stream);

// out[t, j] = <dense[t], paired[position[t*k + j]]>
struct PairDotParams {
  const void* dense;        // [T, D] dtype
  const void* paired;       // [N, D] dtype
  const int32_t* position;  // [N]
  void* out;                // [T, k] acc
  int64_t T, D, k;
  DType dtype;
};
cudaError_t launch_pair_dot(const PairDotParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mixlora
