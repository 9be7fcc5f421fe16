// Device-side helpers shared by the .cu files: dtype dispatch, grid sizing, a deterministic
// block reduction. nvcc only (no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/epilogue_math.cuh"
#include "cuda/launch.h"

namespace slimops {
namespace cuda {

constexpr int kThreads = 256;  // power of two: block_reduce halves it

// Runs `body` with `T` the storage type of `dtype`.
#define SLIMOPS_CUDA_DISPATCH(dtype, ...)                         \
  switch (dtype) {                                                \
    case DType::kFloat32: { using T = float; __VA_ARGS__ } break;          \
    case DType::kFloat64: { using T = double; __VA_ARGS__ } break;         \
    case DType::kFloat16: { using T = __half; __VA_ARGS__ } break;         \
    case DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__ } break; \
    default: return cudaErrorInvalidValue;                        \
  }

// Blocks for a grid-stride loop over `total` elements (the loop covers any excess).
inline unsigned grid_for(int64_t total, int threads = kThreads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

// Reduces one value per thread of a kThreads-wide block with `op` in a fixed tree order (the
// result does not depend on timing: deterministic). The result is valid in thread 0.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op) {
  __shared__ V smem[kThreads];
  const int tid = threadIdx.x;
  smem[tid] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) smem[tid] = op(smem[tid], smem[tid + s]);
    __syncthreads();
  }
  return smem[0];
}

template <typename T>
__host__ __device__ __forceinline__ const T* typed(const void* p) { return static_cast<const T*>(p); }
template <typename T>
__host__ __device__ __forceinline__ T* typed(void* p) { return static_cast<T*>(p); }

}  // namespace cuda
}  // namespace slimops
