// SLIMOPS_HD marks the per-element math of the CUDA kernels __host__ __device__ under nvcc and
// plain inline under a host compiler, so the exact functions the kernels run can be compiled by
// g++ and checked on a machine without a GPU (csrc/cuda/host_harness.cpp).
#pragma once

#if defined(__CUDACC__)
#define SLIMOPS_HD __host__ __device__ __forceinline__
#else
#define SLIMOPS_HD inline
#endif

// `#pragma unroll` for the loop that follows, in device code only (a host compiler would warn
// about the unknown pragma). The operator form lets one line stand for the three of an #if.
#if defined(__CUDA_ARCH__)
#define SLIMOPS_UNROLL _Pragma("unroll")
#else
#define SLIMOPS_UNROLL
#endif
