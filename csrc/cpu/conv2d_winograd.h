// Winograd F(4x4, 3x3) float32 convolution for stride-1 3x3 dense convs: the forward with its
// epilogue, the input gradient (the same correlation on the transposed, flipped weight prefix)
// and the weight gradient, on the DirectConv problem description (conv2d_direct.h), so the
// weight prefix is read in place through its strides.
//
// Why: a 3x3 conv is 9 multiply-adds per output, input channel and output channel; F(4x4,
// 3x3) computes a 4x4 output tile from a 6x6 input tile with 36 products, 2.25 instead of 9,
// as 36 independent GEMMs (one per point of the 6x6 Winograd domain) between transformed
// input tiles and transformed filters. On a 2-core AMD EPYC Zen 3 (AVX2) those GEMMs took
// 0.27-0.6x of oneDNN's direct 3x3 conv at the S-ResNet-50 shapes (batch 8); the transforms
// add the rest. conv2d.cpp offers it as the kernels' side of its measured route, so it runs
// only where it measured faster than oneDNN on the machine itself.
//
// Numerics: the transforms multiply by up to 8 and divide by up to 24, so rounding error is
// larger than a direct sum's (float32 max error 0.55-1.4e-5 of the output's scale at 64-256
// channels, 0.03-0.2e-5 on the direct kernels; tests/test_ops_conv2d_winograd.py).
// Non-finite or huge values would also mix across a tile (an Inf becomes NaN on outputs that
// never read it), so every transform checks its values: any NaN, Inf or magnitude above 2^40
// in the input, weight or output gradient makes the call return false before it has written
// a result the caller keeps, and the caller runs its other kernels, whose results such values
// then are (as with SLIMOPS_CONV_WINOGRAD=0).
#pragma once

#include "cpu/conv2d_direct.h"

#include <cstdint>

namespace slimops {
namespace cpu {

// Whether `d` is a problem for these kernels: a 3x3 kernel at stride 1 and dilation 1, enough
// channels and tiles for the GEMMs to pay for the transforms, an output plane of at least 4x4,
// and transformed filters of bounded size.
bool winograd_suits(const DirectConv& d);

// y = W (*) x, then the epilogue when `epilogue` is non-null; returns false (y partly written,
// to be overwritten by the caller) when a value is out of the checked range.
bool winograd_forward(const DirectConv& d, const DirectEpilogue* epilogue);

// gw(o, c, i, j) += the weight gradient (layout: the strides of d.w; d.w itself is not read),
// gz planes at gz + n * gz_n + o * Ho * Wo. Returns false, gw untouched, when a value is out
// of the checked range. Deterministic: the reduction order depends on the shapes only.
bool winograd_weight_grad(const DirectConv& d, const float* gz, int64_t gz_n, float* gw);

}  // namespace cpu
}  // namespace slimops
