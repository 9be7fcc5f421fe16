// Row-major GEMM on raw pointers with leading dimensions: C[M, N] = A[M, K] * B[K, N].
//
// It calls the BLAS that libtorch_cpu already links and exports (MKL's Fortran sgemm_ /
// dgemm_, LP64, the interface at::mm uses), so a GEMM costs no tensor objects and can write
// any block of an output: this is what lets conv2d fuse its epilogue block by block. Should
// a torch build not export them (weak symbols resolve to null), the same product goes
// through at::mm_out on strided views of the same memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
}

namespace slimops {
namespace cpu {

template <typename scalar_t>
inline void gemm_fallback(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                          const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const at::Tensor a = at::from_blob(const_cast<scalar_t*>(A), {M, K}, {lda, 1}, options);
  const at::Tensor b = at::from_blob(const_cast<scalar_t*>(B), {K, N}, {ldb, 1}, options);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  at::mm_out(c, a, b);
}

// Row-major C = A * B is column-major C^T = B^T * A^T: the Fortran call swaps the operands.
template <typename scalar_t>
inline void gemm(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                 const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const char no = 'N';
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (sgemm_ != nullptr) {
      const float one = 1.f, zero = 0.f;
      sgemm_(&no, &no, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
      return;
    }
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    if (dgemm_ != nullptr) {
      const double one = 1.0, zero = 0.0;
      dgemm_(&no, &no, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
      return;
    }
  }
  gemm_fallback(M, N, K, A, lda, B, ldb, C, ldc);
}

inline bool has_blas_symbols() { return sgemm_ != nullptr && dgemm_ != nullptr; }

}  // namespace cpu
}  // namespace slimops
