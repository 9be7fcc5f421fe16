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

// One thread per element of a grid of grid_for(total) blocks: thread i takes elements i,
// i + (all threads), ... (consecutive threads on consecutive elements: coalesced).
#define SLIMOPS_GRID_STRIDE_LOOP(idx, total)                                         \
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < (total); \
       idx += int64_t(gridDim.x) * blockDim.x)

// The coordinates of element `idx` of a contiguous [N, C, H, W] tensor.
struct Nchw {
  int64_t n, c, h, w;
};
__device__ __forceinline__ Nchw nchw_of(int64_t idx, int64_t C, int64_t H, int64_t W) {
  const int64_t w = idx % W;
  int64_t t = idx / W;
  const int64_t h = t % H;
  t /= H;
  return Nchw{t / C, t % C, h, w};
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
