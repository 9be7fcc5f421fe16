// The fused epilogue's row loop for this CPU's instruction set: epilogue_rows.inc, compiled
// once per instruction set in epilogue.cpp (isa_variants.h) and shared by the conv ops'
// GEMM and oneDNN paths and the depthwise op's oneDNN path.
#pragma once

#include <cstdint>

namespace slimops {
namespace cpu {

// out[c * ld + q] = act(out[c * ld + q] * scale[c] + shift[c] + residual[c * ld + q]) for rows
// c in [0, rows) and columns q in [0, cols), in place; `residual` may be null. Arguments:
// (out, ld, rows, cols, scale, shift, residual, activation).
template <typename scalar_t>
using EpilogueRows = void (*)(scalar_t*, int64_t, int64_t, int64_t, const scalar_t*,
                              const scalar_t*, const scalar_t*, int64_t);

// The loop for the instruction set cpu_isa() selects (float and double).
template <typename scalar_t>
EpilogueRows<scalar_t> epilogue_rows_for_cpu();

// The epilogue in place on an NCHW output of n images x c channels x p positions: channel k of
// every image by scale[k] and shift[k], `residual` (null or the output's shape) added, rows
// split across threads by parallel.h's policy. What a conv computed by oneDNN gets after it.
template <typename scalar_t>
void epilogue_planes(scalar_t* out, int64_t n, int64_t c, int64_t p, const scalar_t* scale,
                     const scalar_t* shift, const scalar_t* residual, int64_t activation);

}  // namespace cpu
}  // namespace slimops
