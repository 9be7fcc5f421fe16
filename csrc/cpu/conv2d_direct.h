// Direct (im2col-free) float32 convolution kernels for the dense conv2d family: the forward
// with its epilogue, the stride-1 input gradient (the same correlation on the transposed,
// flipped weight prefix) and the weight gradient.
//
// Why they exist: at a partial input width the weight prefix W[:o, :i] is strided, so oneDNN
// (which the full-width path uses, conv2d.cpp) would need it copied, and the im2col + BLAS
// path ran 1.5-2x behind the reference style's copy + oneDNN (sgemm on the AMD CPUs here runs
// at ~0.55x of oneDNN's kernels, plus im2col's 9x expansion of the input). These kernels read
// the weight prefix in place through four strides, vectorise over output columns and keep a
// register tile of 4 output channels x 4 (AVX-512) or 3 (AVX2) vectors of positions.
#pragma once

#include <cstdint>

namespace slimops {
namespace cpu {

// One correlation problem, y[n, o] = sum_c W(o, c) (*) x[n, c], on raw pointers and strides, so
// that one kernel serves the forward (W(o, c, i, j) = weight[o, c, i, j]) and the stride-1
// input gradient (W(o, c, i, j) = weight[c, o, kh-1-i, kw-1-j]: negative strides).
struct DirectConv {
  int64_t N, C, H, W;  // images, input channels, input plane
  int64_t O, Ho, Wo;   // output channels, output plane
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;  // padding >= 0
  const float* x;      // image n, channel c: x + n * x_n + c * H * W (each plane contiguous)
  int64_t x_n;
  const float* w;      // W(o, c, i, j) at w + o * w_o + c * w_c + i * w_i + j * w_j
  int64_t w_o, w_c, w_i, w_j;
  float* y;            // output plane (n, o) at y + n * y_n + o * Ho * Wo
  int64_t y_n;
};

// The fused epilogue, applied to each finished band of output rows while it is in cache:
// fn(out, ld, rows, cols, scale, shift, residual, activation) as conv2d.cpp's epilogue_rows.
struct DirectEpilogue {
  void (*fn)(float*, int64_t, int64_t, int64_t, const float*, const float*, const float*,
             int64_t);
  const float* scale;     // [O] (already offset to the problem's first output channel)
  const float* shift;     // [O]
  const float* residual;  // like y (null: none)
  int64_t residual_n;
  int64_t activation;
};

// Whether the direct kernels should run this problem: a vector ISA (AVX2 + FMA or AVX-512,
// see isa.h), a kernel larger than 1x1, and output rows that fill most of a vector.
bool direct_conv_suits(const DirectConv& d);

// y = W (*) x, then the epilogue when `epilogue` is non-null. Every element of y is written.
void direct_conv_forward(const DirectConv& d, const DirectEpilogue* epilogue);

// gw(o, c, i, j) += sum_{n, oy, ox} gz[n, o, oy, ox] * x_padded[n, c, oy*sh + i*dh, ox*sw + j*dw]
// with gw laid out by the strides of d.w (d.w itself is not read). gz planes: gz + n * gz_n +
// o * Ho * Wo. Deterministic: the reduction order depends on the shapes only.
void direct_conv_weight_grad(const DirectConv& d, const float* gz, int64_t gz_n, float* gw);

}  // namespace cpu
}  // namespace slimops
