// Row-major GEMM on raw pointers with leading dimensions:
//   C[M, N] = op(A)[M, K] * op(B)[K, N] + beta * C,   op(X) = X or X^T.
//
// It calls the BLAS that libtorch_cpu already links and exports (MKL's Fortran sgemm_ /
// dgemm_, LP64, the interface at::mm uses), so a GEMM costs no tensor objects and can read a
// weight prefix in place (a strided matrix: its leading dimension is the full row length) and
// write any block of an output. Should a torch build not export them (weak symbols resolve to
// null), the same product goes through at::addmm_ on strided views of the same memory.
// Called outside an OpenMP region, BLAS uses the thread team for a product of at least
// kParallelWork multiply-adds (parallel.h's rule 1), and the calling thread below that; inside
// a region (from a task of parallel.h's run_tasks), it runs on the calling thread.
#pragma once

#include "cpu/parallel.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
// MKL_Set_Num_Threads_Local: declared in parallel.h.
}

namespace slimops {
namespace cpu {

template <typename scalar_t>
inline void gemm_fallback(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                          const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb,
                          scalar_t beta, scalar_t* C, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    // A stored [rows, cols] matrix, transposed when op() transposes it.
    const at::Tensor t = trans ? at::from_blob(const_cast<scalar_t*>(p), {cols, rows}, {ld, 1},
                                               options).t()
                               : at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1},
                                               options);
    return t;
  };
  const at::Tensor a = view(A, M, K, lda, trans_a), b = view(B, K, N, ldb, trans_b);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  if (beta == scalar_t(0)) {
    at::mm_out(c, a, b);
  } else {
    c.mul_(beta).addmm_(a, b);
  }
}

// BLAS takes 32-bit sizes (LP64): a dimension that does not fit is an error, never a wrap.
inline int blas_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "slimops: GEMM ", what, " = ", v,
              " exceeds the BLAS 32-bit limit (", INT_MAX, ")");
  return static_cast<int>(v);
}

// Runs a BLAS call of `macs` multiply-adds on the calling thread alone when it is below
// kParallelWork. Why: outside an OpenMP region MKL opened its thread team even for an 8x4x8
// product (a 1x1 conv on a 2x2 plane): 8.8 us idle against 6.6 us on one thread, and 8 ms
// (a scheduler slice, waiting for a worker) with both cores of a 2-core Intel Xeon busy;
// torch's F.conv2d took 8 us there. A build without MKL's symbol keeps BLAS's own choice.
template <typename Call>
inline void blas_call(int64_t macs, const Call& call) {
  // Inside a region MKL already runs on the calling thread; with one torch thread MKL's own
  // count is 1 too (torch sets both).
  if (MKL_Set_Num_Threads_Local == nullptr || macs >= kParallelWork ||
      at::get_num_threads() == 1 || at::in_parallel_region()) {
    call();
    return;
  }
  const int previous = MKL_Set_Num_Threads_Local(1);
  call();
  MKL_Set_Num_Threads_Local(previous);
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the Fortran call swaps the
// operands, and a row-major operand read as column-major is already transposed, so each
// operand's flag carries over unchanged.
template <typename scalar_t>
inline void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A,
                 int64_t lda, const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C,
                 int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == scalar_t(0) ? 0 : beta * C[i * ldc + j];
    return;
  }
  const int m = blas_int(N, "N"), n = blas_int(M, "M"), k = blas_int(K, "K");
  const int la = blas_int(ldb, "ldb"), lb = blas_int(lda, "lda"), lc = blas_int(ldc, "ldc");
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const scalar_t one = 1;
  // M * N * K, saturated at kParallelWork (each factor is at least 1 here, so any one at
  // kParallelWork puts the product there; below, the product fits easily in 64 bits).
  const int64_t macs = std::max({M, N, K}) >= kParallelWork ? kParallelWork : M * N * K;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (sgemm_ != nullptr) {
      blas_call(macs, [&] { sgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc); });
      return;
    }
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    if (dgemm_ != nullptr) {
      blas_call(macs, [&] { dgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc); });
      return;
    }
  }
  gemm_fallback(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// The common case: C = A * B.
template <typename scalar_t>
inline void gemm(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                 const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc) {
  gemm<scalar_t>(false, false, M, N, K, A, lda, B, ldb, scalar_t(0), C, ldc);
}

inline bool has_blas_symbols() { return sgemm_ != nullptr && dgemm_ != nullptr; }

}  // namespace cpu
}  // namespace slimops
