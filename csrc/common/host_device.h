// Lets the small math helpers below compile for both the CPU kernels (g++) and CUDA (nvcc).
#pragma once
#if defined(__CUDACC__)
#define MIXLORA_HD __host__ __device__ __forceinline__
#else
#define MIXLORA_HD inline
#endif
