// SASS instructions of one LoRA-dropout mask element (bench/NOTES.md, eleventh session): the
// library's dropout_keep (csrc/common/dropout_rng.h) beside two alternatives, each in a test
// kernel that masks kPerThread consecutive elements a thread (8; 16 too, for the count per
// element: the difference over 8). Not part of the library; compile and count:
//   nvcc -std=c++17 -I csrc -gencode=arch=compute_90a,code=sm_90a -O3 -cubin -o /tmp/m.cubin bench/mask_sass.cu
//   cuobjdump -sass /tmp/m.cubin | awk '/Function :/{f=$3} /\/\*[0-9a-f]+\*\/ +[A-Z@]/{n[f]++} END{for(k in n) print k, n[k]}'
#include <cstdint>

#include "common/dropout_rng.h"

namespace {

constexpr int kPerThread = 8;

// A 32-bit bijective mixer (two multiply / xor-shift rounds).
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

}  // namespace

// The library's mask: 64-bit splitmix64 of key + index, its top 24 bits as a float against p.
extern "C" __global__ void mask_library(uint64_t key, float p, float inv_keep, const float* in,
                                        float* out, int64_t base) {
  const int64_t i = base + int64_t(threadIdx.x) * kPerThread;
  float acc = 0.f;
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) {
    acc += (mixlora::dropout_keep(key, i + v, p) ? inv_keep : 0.f) * in[v];
  }
  out[threadIdx.x] = acc;
}

// The same masks, the 24 bits compared as an integer against ceil(p * 2^24).
extern "C" __global__ void mask_integer_compare(uint64_t key, uint64_t threshold, float inv_keep,
                                                const float* in, float* out, int64_t base) {
  const int64_t i = base + int64_t(threadIdx.x) * kPerThread;
  float acc = 0.f;
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) {
    const uint64_t h = mixlora::splitmix64(key + static_cast<uint64_t>(i + v));
    acc += ((h >> 40) >= threshold ? inv_keep : 0.f) * in[v];
  }
  out[threadIdx.x] = acc;
}

// Other masks: a 32-bit keyed hash (two mix32 rounds, the index's high word in the second).
extern "C" __global__ void mask_hash32(uint32_t k0, uint32_t k1, uint32_t threshold,
                                       float inv_keep, const float* in, float* out, int64_t base) {
  const int64_t i = base + int64_t(threadIdx.x) * kPerThread;
  float acc = 0.f;
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) {
    const uint64_t index = static_cast<uint64_t>(i + v);
    const uint32_t h = mix32(mix32(uint32_t(index) ^ k0) + (uint32_t(index >> 32) ^ k1));
    acc += ((h >> 8) >= threshold ? inv_keep : 0.f) * in[v];
  }
  out[threadIdx.x] = acc;
}
