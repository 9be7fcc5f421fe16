// The narrow GEMM (gemm_narrow.h): its loop per instruction set and the rule for when it runs.
#include "cpu/gemm_narrow.h"

#include "cpu/isa.h"
#include "cpu/parallel.h"

#include <cstdint>

namespace slimops {
namespace cpu {

#define SLIMOPS_ISA_INC "cpu/gemm_narrow_tiles.inc"
#define SLIMOPS_ISA_NO_BASE
#include "cpu/isa_variants.h"

namespace {

// Below this many elements of A (rows x depth) the kernel's fixed costs (B's packing, the
// padded rows' copy) outweigh what it saves: 256 -> 256 1x1 and 64 -> 64 3x3 convs on 2x2 to
// 8x8 planes ran 1.05-1.2x BLAS's time, 1024 -> 256 1x1 and 512 -> 512 3x3 ones 0.5-0.98x
// (2-core Intel Xeon, AVX-512, batch 1, 2 threads: each thread's product is half the rows).
constexpr int64_t kNarrowMinWeight = int64_t{1} << 17;
// Below this depth nothing was gained. A's rows are short streams that the tiles start and
// leave every few hundred cycles; without the next tile's prefetch (gemm_narrow_tiles.inc)
// BLAS's packed panels streamed better below 512 (256 -> 1024 1x1 convs on 3x3 and 4x4 planes
// ran 1.4x BLAS's time under AVX2). With it, the weights cycled through a 120 MB pool as in a
// model (2-core Intel Xeon, batch 1, partial input width; the narrow GEMM against BLAS):
// depths 256-384 ran 0.62-0.79x under AVX-512 (256 -> 1024 and 384 -> 1536 on 5x5 to 8x8,
// 256 -> 1024 stride 2 to 7x7, 288 -> 1152 and 384 -> 768 on 7x7) and 0.66-0.78x under AVX2
// (3x3 and 4x4 planes); depths 128-192 0.99-1.02x.
constexpr int64_t kNarrowMinDepth = 256;

struct NarrowGemm {
  void (*run)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*,
              int64_t, float*);
  int64_t (*scratch_floats)(int64_t, int64_t, int64_t);
  bool (*fits)(int64_t, int64_t);
};

// Null `run` on a CPU without AVX2 + FMA (the baseline has no copy: BLAS serves it).
NarrowGemm narrow_for_cpu() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return {&isa_avx512::narrow_gemm, &isa_avx512::narrow_scratch_floats,
              &isa_avx512::narrow_fits};
    case Isa::kAvx2:
      return {&isa_avx2::narrow_gemm, &isa_avx2::narrow_scratch_floats, &isa_avx2::narrow_fits};
    default:
      return {nullptr, nullptr, nullptr};
  }
}

const NarrowGemm& narrow() {
  static const NarrowGemm n = narrow_for_cpu();
  return n;
}

}  // namespace

bool narrow_gemm_suits(int64_t M, int64_t N, int64_t K) {
  const NarrowGemm& n = narrow();
  if (n.run == nullptr) return false;
  return K >= kNarrowMinDepth && M >= kNarrowMinWeight / K && n.fits(N, K);
}

void narrow_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc) {
  const NarrowGemm& n = narrow();
  float* scratch = cpu::scratch<float>(ScratchSlot::kNarrowGemm, n.scratch_floats(M, N, K));
  n.run(M, N, K, A, lda, B, ldb, C, ldc, scratch);
}

}  // namespace cpu
}  // namespace slimops
