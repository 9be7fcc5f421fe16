// A float32 GEMM for products with few columns: C[M, N] = A[M, K] B[K, N], N of two to four
// vectors (17 to 64 floats under AVX-512: a 5x5 to 8x8 output plane at batch 1; 9 to 24 under
// AVX2), A a weight prefix read in place.
//
// Why: such products are where BLAS and oneDNN are weakest. MKL packs all of A (the weight,
// megabytes) into its panel layout on every call and then reuses each packed element for only
// N columns; oneDNN reorders the weight likewise. A 512 -> 512 3x3 conv on a 7x7 plane (an
// [512 x 4608] x [4608 x 49] product) ran at 95-120 G multiply-adds/s through either, against
// 150-170 for the same work at N = 196 (2-core Intel Xeon, AVX-512, 2 threads). This kernel
// never packs A: a tile of its rows is read once, front to back, each element broadcast and
// multiplied into the whole row of N columns held in registers; only B (small) is packed,
// zero-padded to whole vectors. Its cost is that padding, except one column past two or three
// whole AVX-512 vectors (49 columns: a 7x7 plane), which is summed as a dot product along the
// depth (gemm_narrow_tiles.inc, narrow_tile) instead of a fourth vector with one lane in
// sixteen used. Inside S-ResNet-50's eval forward at batch 1 its 7x7-plane layers ran
// 0.72-0.85x their BLAS time (gemm_narrow.cpp has the limits of its range).
#pragma once

#include <cstdint>

namespace slimops {
namespace cpu {

// Whether narrow_gemm runs on this CPU (AVX2 + FMA or AVX-512, isa.h) and is worth it for
// these sizes: few columns, enough rows and depth to amortise its per-call setup.
bool narrow_gemm_suits(int64_t M, int64_t N, int64_t K);

// C = A B on the calling thread, every element of C written (no beta): A row-major with row
// stride lda, B [K, N] with row stride ldb, C with row stride ldc. Scratch: the calling
// thread's own (parallel.h's ScratchSlot::kNarrowGemm). Deterministic: each output element
// sums over K in order (a tail column: in one vector's lanes of interleaved partial sums,
// added lane by lane at the end), whatever the thread or the call.
void narrow_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc);

}  // namespace cpu
}  // namespace slimops
