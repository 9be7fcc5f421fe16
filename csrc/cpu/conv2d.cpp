// Slimmable (grouped) conv2d on per-group channel prefixes of a shared weight: the forward
// with fused epilogue, and the input and weight gradients of the pre-epilogue output z.
//
// Every GEMM reads group g's weight prefix as a strided [og, ig*kh*kw] view of the full
// weight (row stride Ig*kh*kw, unit column stride), which BLAS takes through its leading
// dimension: the weight is never copied, only activations are (im2col, .contiguous()).
#include "checked_size.h"
#include "cpu/common.h"
#include "cpu/conv2d_direct.h"
#include "cpu/conv2d_winograd.h"
#include "cpu/epilogue_rows.h"
#include "cpu/gemm.h"
#include "cpu/gemm_narrow.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"
#include "cpu/route.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace slimops {
namespace cpu {
namespace {

struct ConvGeometry {
  int64_t N, C, H, W;      // input
  int64_t O, Ho, Wo;       // output
  int64_t G, Og, Ig;       // full weight: [G * Og, Ig, kh, kw]
  int64_t og, ig;          // active per-group prefix
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;

  int64_t kernel_area() const { return kh * kw; }
  int64_t P() const { return Ho * Wo; }
  // Rows of one group's im2col matrix, i.e. the inner dimension of its GEMM.
  int64_t K() const { return ig * kernel_area(); }
  // Rows of the im2col matrix of all groups (C*kh*kw), and the full weight's row length, the
  // leading dimension its prefixes are read with in place.
  int64_t col_rows() const { return C * kernel_area(); }
  int64_t weight_ld() const { return Ig * kernel_area(); }
  int64_t HW() const { return H * W; }
  // A 1x1 kernel with unit stride and no padding sees each input pixel once, in order, so
  // the image [C, H*W] is already the im2col matrix (dilation has no effect on 1x1).
  bool pointwise() const { return kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0; }
};

ConvGeometry make_geometry(const char* op, at::IntArrayRef input_size, const at::Tensor& weight,
                           int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input_size.size() == 4, "slimops::", op, ": expected a 4-D NCHW input, got size ",
              input_size);
  for (int64_t v : input_size)
    TORCH_CHECK(v >= 0, "slimops::", op, ": input size must be non-negative, got ", input_size);
  TORCH_CHECK(input_size[2] >= 1 && input_size[3] >= 1, "slimops::", op,
              ": input height and width must be >= 1, got size ", input_size);
  TORCH_CHECK(weight.dim() == 4, "slimops::", op, ": weight must be 4-D [G*Og, Ig, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "slimops::", op,
              ": weight must be contiguous (its channel prefixes are read in place, never "
              "copied); got strides ",
              weight.strides(), " for sizes ", weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "slimops::", op,
              ": stride, padding and dilation must be pairs");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "slimops::", op, ": stride must be >= 1, got ",
              stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, "slimops::", op,
              ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "slimops::", op,
              ": padding must be >= 0, got ", padding);
  TORCH_CHECK(groups >= 1, "slimops::", op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(weight.size(0) >= groups && weight.size(0) % groups == 0, "slimops::", op,
              ": groups=", groups, " must divide the weight's ", weight.size(0), " rows");
  TORCH_CHECK(weight.size(1) >= 1 && weight.size(2) >= 1 && weight.size(3) >= 1, "slimops::", op,
              ": weight has an empty dimension: ", weight.sizes());

  ConvGeometry s;
  s.N = input_size[0];
  s.C = input_size[1];
  s.H = input_size[2];
  s.W = input_size[3];
  s.G = groups;
  s.Og = weight.size(0) / groups;
  s.Ig = weight.size(1);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  s.sh = stride[0];
  s.sw = stride[1];
  s.ph = padding[0];
  s.pw = padding[1];
  s.dh = dilation[0];
  s.dw = dilation[1];
  s.O = out_channels;

  TORCH_CHECK(s.O >= groups && s.O % groups == 0, "slimops::", op, ": out_channels=", s.O,
              " must be a positive multiple of groups=", groups);
  TORCH_CHECK(s.C >= groups && s.C % groups == 0, "slimops::", op, ": in_channels=", s.C,
              " must be a positive multiple of groups=", groups);
  s.og = s.O / groups;
  s.ig = s.C / groups;
  TORCH_CHECK(s.og <= s.Og, "slimops::", op, ": out_channels=", s.O, " needs ", s.og,
              " rows per group but the weight ", weight.sizes(), " has ", s.Og, " (groups=",
              groups, ")");
  TORCH_CHECK(s.ig <= s.Ig, "slimops::", op, ": in_channels=", s.C, " needs ", s.ig,
              " input channels per group but the weight ", weight.sizes(), " has ", s.Ig,
              " (groups=", groups, ")");

  // Checked 64-bit arithmetic (checked_size.h): an extreme stride, padding or dilation is an
  // error or the right size, never a wrapped one.
  s.Ho = conv_output_size(op, "height", s.H, s.kh, s.sh, s.ph, s.dh);
  s.Wo = conv_output_size(op, "width", s.W, s.kw, s.sw, s.pw, s.dw);
  checked_numel(std::array<int64_t, 4>{s.N, s.O, s.Ho, s.Wo}, op, "the output's element count");
  // im2col's rows and the direct kernels' padded field are sized from these.
  checked_mul(checked_mul(s.C, s.kernel_area(), op, "the im2col rows"), s.P(), op,
              "the im2col matrix");
  checked_mul(s.H + 2 * s.ph, s.W + 2 * s.pw, op, "the padded input plane");
  return s;
}

// Output positions o in [0, out_size) whose input index o * stride + offset lies in [0, size).
struct Span {
  int64_t lo, hi;
};

Span valid_span(int64_t offset, int64_t stride, int64_t size, int64_t out_size) {
  // ceil(-offset / stride) without forming -offset + stride - 1, which wraps for a stride
  // near 2^63 (the fuzz in tests/fuzz_geometry.py found stride 2^63 - 1 reading garbage).
  const int64_t lo = offset >= 0 ? 0 : -offset / stride + (-offset % stride != 0);
  const int64_t hi = size - 1 - offset < 0 ? 0 : (size - 1 - offset) / stride + 1;
  const int64_t clo = std::min(lo, out_size);
  return {clo, std::max(clo, std::min(hi, out_size))};
}

// Worker threads do not inherit the caller's thread-local state, so ATen calls inside a task
// (only the fallback GEMM makes any) must see an explicit below-autograd guard.
struct ImageGuard {
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

// One row r = (c*kh + i)*kw + j of the im2col matrix, over output positions [p0, p0 + ncols):
//   dst[q] = image[c, oh*sh - ph + i*dh, ow*sw - pw + j*dw] for p0 + q = oh*Wo + ow (0 off the
// image). Rows are ordered channel-major, so group g's rows are the block [g*K, (g+1)*K).
template <typename scalar_t>
void im2col_row(const scalar_t* image, scalar_t* dst, const ConvGeometry& s, int64_t r,
                int64_t p0, int64_t ncols) {
  const int64_t j = r % s.kw, i = (r / s.kw) % s.kh, c = r / s.kernel_area();
  const scalar_t* src = image + c * s.HW();
  const int64_t off_w = j * s.dw - s.pw;
  const Span w = valid_span(off_w, s.sw, s.W, s.Wo);
  for (int64_t p = p0, end = p0 + ncols; p < end;) {
    const int64_t oh = p / s.Wo, ow0 = p % s.Wo, ow1 = std::min(s.Wo, ow0 + (end - p));
    const int64_t ih = oh * s.sh + i * s.dh - s.ph;
    if (ih < 0 || ih >= s.H) {
      std::fill(dst, dst + (ow1 - ow0), scalar_t(0));
    } else {
      const scalar_t* row = src + ih * s.W + off_w;
      const int64_t lo = std::max(ow0, w.lo), hi = std::min(ow1, std::max(w.hi, ow0));
      for (int64_t ow = ow0; ow < std::min(lo, ow1); ++ow) dst[ow - ow0] = scalar_t(0);
      if (s.sw == 1) {
        if (hi > lo) copy_run(row + lo, hi - lo, dst + (lo - ow0));
      } else {
        for (int64_t ow = lo; ow < hi; ++ow) dst[ow - ow0] = row[ow * s.sw];
      }
      for (int64_t ow = std::max(hi, lo); ow < ow1; ++ow) dst[ow - ow0] = scalar_t(0);
    }
    dst += ow1 - ow0;
    p += ow1 - ow0;
  }
}

// The whole im2col matrix of one image (row stride ld), tap by tap: a tap's column span and
// its valid output rows are the same for every channel, so they are found once per tap, not
// once per row and output row as im2col_row does. Why: on small planes im2col_row's divisions
// and short runs cost more than the copies; a 512-channel 3x3 conv on a 7x7 plane spent
// ~0.4 ms of its 1.3 ms in them (2-core Intel Xeon).
template <typename scalar_t>
void im2col_plane(const scalar_t* image, scalar_t* cols, const ConvGeometry& s, int64_t ld) {
  const int64_t HW = s.HW();
  for (int64_t i = 0; i < s.kh; ++i) {
    const Span h = valid_span(i * s.dh - s.ph, s.sh, s.H, s.Ho);
    for (int64_t j = 0; j < s.kw; ++j) {
      const int64_t off_w = j * s.dw - s.pw;
      const Span w = valid_span(off_w, s.sw, s.W, s.Wo);
      for (int64_t c = 0; c < s.C; ++c) {
        scalar_t* dst = cols + ((c * s.kh + i) * s.kw + j) * ld;
        const scalar_t* plane = image + c * HW + off_w;
        std::fill(dst, dst + h.lo * s.Wo, scalar_t(0));
        for (int64_t oh = h.lo; oh < h.hi; ++oh) {
          // The same input row im2col_row reads (valid rows only: it lies in [0, H)).
          const scalar_t* src = plane + (oh * s.sh + i * s.dh - s.ph) * s.W;
          scalar_t* d = dst + oh * s.Wo;
          for (int64_t ow = 0; ow < w.lo; ++ow) d[ow] = scalar_t(0);
          if (s.sw == 1) {
            for (int64_t ow = w.lo; ow < w.hi; ++ow) d[ow] = src[ow];
          } else {
            for (int64_t ow = w.lo; ow < w.hi; ++ow) d[ow] = src[ow * s.sw];
          }
          for (int64_t ow = w.hi; ow < s.Wo; ++ow) d[ow] = scalar_t(0);
        }
        std::fill(dst + h.hi * s.Wo, dst + s.P(), scalar_t(0));
      }
    }
  }
}

// Columns [p0, p0 + ncols) of the im2col matrix (row stride ld), on the calling thread.
template <typename scalar_t>
void im2col_block(const scalar_t* image, scalar_t* cols, const ConvGeometry& s, int64_t p0,
                  int64_t ncols, int64_t ld) {
  if (p0 == 0 && ncols == s.P()) {
    im2col_plane(image, cols, s, ld);
    return;
  }
  const int64_t rows = s.col_rows();
  for (int64_t r = 0; r < rows; ++r) im2col_row(image, cols + r * ld, s, r, p0, ncols);
}

// Adjoint of im2col_row for the kh*kw rows of one channel: plane[ih, iw] += src rows, over
// output positions [p0, p0 + ncols) (src row stride ld). One writer per plane.
template <typename scalar_t>
void col2im_channel(const scalar_t* src, int64_t ld, scalar_t* plane, const ConvGeometry& s,
                    int64_t p0, int64_t ncols) {
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t off_h = i * s.dh - s.ph;
    for (int64_t j = 0; j < s.kw; ++j, src += ld) {
      const int64_t off_w = j * s.dw - s.pw;
      const Span w = valid_span(off_w, s.sw, s.W, s.Wo);
      const scalar_t* in = src;
      for (int64_t p = p0, end = p0 + ncols; p < end;) {
        const int64_t oh = p / s.Wo, ow0 = p % s.Wo, ow1 = std::min(s.Wo, ow0 + (end - p));
        const int64_t ih = oh * s.sh + off_h;
        if (ih >= 0 && ih < s.H) {
          scalar_t* row = plane + ih * s.W + off_w;
          const int64_t lo = std::max(ow0, w.lo), hi = std::min(ow1, w.hi);
          if (s.sw == 1) {
            for (int64_t ow = lo; ow < hi; ++ow) row[ow] += in[ow - ow0];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) row[ow * s.sw] += in[ow - ow0];
          }
        }
        in += ow1 - ow0;
        p += ow1 - ow0;
      }
    }
  }
}

// The backward passes walk the batch in chunks whose GEMM operands fit a fixed budget, so
// their scratch stays in reused buffers of bounded size whatever the batch. Small images go
// several to a chunk, side by side along the GEMM's inner (weight gradient) or column (input
// gradient) dimension: one GEMM per chunk and group instead of one per image, which for a
// 3x3 conv's 8x8 image is a 64-column product dominated by call overhead (pointwise convs
// keep images of 64+ positions apart: kPointwiseImageColumns). An image larger than the
// budget is cut into blocks of output positions. The chunking depends on the shapes only
// (never on the thread count), and chunks are accumulated in order: deterministic.
constexpr int64_t kChunkBudget = int64_t{1} << 20;  // operand elements per chunk

// A pointwise conv's images of at least this many positions go one to a chunk: its GEMMs then
// read the image and its output gradient in place and write the input gradient straight into
// place, where several images side by side are three copies (the output gradient and the input
// gathered, the input gradient scattered back) that cost more than the wider GEMMs save. Both
// gradients (2-core Intel Xeon, AVX-512, 2 threads, median of 21, one process per setting;
// one image per chunk vs as many as the budget takes): 8 x 64 -> 64 at 56x56 1.65-1.73 vs
// 2.54-2.60 ms, 8 x 512 -> 128 at 28x28 4.8-5.3 vs 6.2-6.6, 8 x 1024 -> 256 at 14x14 5.0-5.1
// vs 5.4-5.6, 64 x 96 -> 24 at 32x32 3.4-3.5 vs 5.7-6.1, 64 x 64 -> 384 at 8x8 1.86-1.92 vs
// 2.13-2.14, 64 x 16 -> 32 at 8x8 0.085-0.091 vs 0.117-0.118. Below it they stay side by
// side: at 7x7 8 x 2048 -> 512 7.0-7.1 vs 5.0-5.2 (a 49-column GEMM), at 4x4 64 x 576 -> 96
// 1.6 vs 1.3-1.4. Just above it, 9x9 planes lose (64 x 64 -> 64: 0.71-0.75 vs 0.57-0.63 ms;
// 8 x 256 -> 256 equal); the route's oneDNN candidate covers such a pass. With im2col (any
// other conv) the columns are gathered anyway, and side by side measured equal or faster (3x3
// s2 8 x 256 -> 512 on 14x14: 7.5-7.7 vs 11.6-12.5 ms one per chunk).
constexpr int64_t kPointwiseImageColumns = 64;

bool pointwise_images_apart(const ConvGeometry& s) {
  return s.pointwise() && s.P() >= kPointwiseImageColumns;
}

struct Chunk {
  int64_t n0, k, p0, cnt;                 // images [n0, n0 + k), positions [p0, p0 + cnt)
  int64_t L() const { return k * cnt; }   // columns of the chunk's operands
};

struct ChunkPlan {
  int64_t images;  // images per chunk (> 1: whole images side by side)
  int64_t cols;    // positions per chunk and image
  int64_t blocks;  // position blocks per image (> 1 only when images == 1)
  int64_t chunks;

  Chunk at(int64_t c, int64_t N, int64_t P) const {
    if (blocks == 1) {
      const int64_t n0 = c * images;
      return {n0, std::min(images, N - n0), 0, P};
    }
    const int64_t p0 = (c % blocks) * cols;
    return {c / blocks, 1, p0, std::min(cols, P - p0)};
  }
};

// rows: operand rows per output position (what one position of one image costs).
ChunkPlan plan_chunks(const ConvGeometry& s, int64_t rows) {
  const int64_t P = s.P(), per_image = rows * P;
  if (per_image <= kChunkBudget) {
    const int64_t images = pointwise_images_apart(s)
                               ? 1
                               : std::max<int64_t>(1, std::min(s.N, kChunkBudget / per_image));
    return {images, P, 1, (s.N + images - 1) / images};
  }
  const int64_t cols = std::min(P, std::max<int64_t>(256, kChunkBudget / rows));
  const int64_t blocks = (P + cols - 1) / cols;
  return {1, cols, blocks, s.N * blocks};
}

// The chunk's im2col matrix [C*kh*kw, L]: image n0 + j at columns [j*cnt, (j+1)*cnt).
template <typename scalar_t>
void gather_cols(const scalar_t* x, const ConvGeometry& s, const Chunk& ch, scalar_t* cols) {
  const int64_t rows = s.col_rows(), HW = s.HW(), k = ch.k;
  // Items in the order of the matrix, row r then image j: consecutive items write
  // consecutive memory (row r's images side by side), and (r, j) steps without a division.
  run_ranges(rows * k, ch.cnt, [&](int64_t begin, int64_t end) {
    int64_t r = begin / k, j = begin % k;
    scalar_t* dst = cols + begin * ch.cnt;  // = cols + r * L + j * cnt, as L = k * cnt
    for (int64_t item = begin; item < end; ++item, dst += ch.cnt) {
      const scalar_t* image = x + (ch.n0 + j) * s.C * HW;
      if (s.pointwise()) {
        copy_run(image + r * HW + ch.p0, ch.cnt, dst);
      } else {
        im2col_row(image, dst, s, r, ch.p0, ch.cnt);
      }
      if (++j == k) {
        j = 0;
        ++r;
      }
    }
  });
}

// The chunk's output gradient as one matrix [O, L] (channels by the positions of its images).
template <typename scalar_t>
void gather_grad(const scalar_t* gz, const ConvGeometry& s, const Chunk& ch, scalar_t* dst) {
  const int64_t P = s.P(), k = ch.k, image = s.O * P;
  // Row o then image j, as gather_cols: sequential writes, no division per item.
  run_ranges(s.O * k, ch.cnt, [&](int64_t begin, int64_t end) {
    int64_t o = begin / k, j = begin % k;
    const scalar_t* first = gz + ch.n0 * image + ch.p0;
    scalar_t* out = dst + begin * ch.cnt;  // = dst + o * L + j * cnt
    for (int64_t item = begin; item < end; ++item, out += ch.cnt) {
      copy_run(first + j * image + o * P, ch.cnt, out);
      if (++j == k) {
        j = 0;
        ++o;
      }
    }
  });
}

// A GEMM operand: its first element and leading dimension.
template <typename scalar_t>
struct Operand {
  const scalar_t* data;
  int64_t ld;
};

// The chunk's output gradient [O, L] as a GEMM operand, shared by both backward passes: one
// image's block is that matrix already, read in place (leading dimension P); several images
// are gathered side by side into the kGradT scratch (leading dimension L).
template <typename scalar_t>
Operand<scalar_t> chunk_grad(const scalar_t* gz, const ConvGeometry& s, const Chunk& ch) {
  if (ch.k > 1) {
    scalar_t* g = scratch<scalar_t>(ScratchSlot::kGradT, s.O * ch.L());
    gather_grad(gz, s, ch, g);
    return {g, ch.L()};
  }
  return {gz + ch.n0 * s.O * s.P() + ch.p0, s.P()};
}

// Both backward passes walk the same chunks of (image, position) columns, in order: the plan
// budgets the gathered output gradient (O rows) and the columns (C*kh*kw rows) per position,
// and `body(ch, L, grad)` gets each chunk with its output gradient as a GEMM operand.
template <typename scalar_t, typename Body>
void for_grad_chunks(const ConvGeometry& s, const scalar_t* gz, Body&& body) {
  const ChunkPlan plan = plan_chunks(s, s.O + s.col_rows());
  for (int64_t c = 0; c < plan.chunks; ++c) {
    const Chunk ch = plan.at(c, s.N, s.P());
    body(ch, ch.L(), chunk_grad(gz, s, ch));
  }
}

// How the forward splits its work: one task per (image, block of output positions, block of
// output channels). A column block's GEMM operands, (K + O) x cols values, stay within about
// 1 MiB, so its epilogue reads the output while it is still in cache. With fewer images than
// threads each image is split further: small outputs (7x7, 14x14 at batch 1: a few hundred
// positions) by output channels, each thread reading its own rows of the weight prefix, so
// the threads get equal shares; larger ones by positions (a multiple of the thread count).
struct BlockPlan {
  int64_t cols, col_blocks;  // output positions per block, blocks per image
  int64_t rows, row_blocks;  // output channels per block, blocks per image
  int64_t tasks;
  int64_t images = 1;        // > 1: each task one GEMM over the positions of this many images
};

// Below this many output positions an image's GEMM is too skinny for BLAS's tiles (a 7x7
// output is 49 columns): tasks then take several images and run one GEMM over all their
// positions side by side, scattering the result back per image with the epilogue.
constexpr int64_t kMinGemmColumns = 256;

BlockPlan plan_blocks(const ConvGeometry& s, int64_t threads) {
  const int64_t P = s.P();
  // A pointwise conv from kPointwiseImageColumns positions keeps its images apart as in its
  // backward (the copies side by side cost more than the wider GEMM saves): forward alone,
  // 8 x 96 -> 576 at 14x14 0.52-0.53 vs 0.57-0.61 ms, 64 x 64 -> 384 at 8x8 0.58 vs 0.70-0.74,
  // 64 x 16 -> 32 at 8x8 0.024 vs 0.032 (2-core Intel Xeon, AVX-512, median of 21); with
  // im2col side by side stays faster (3x3 dilation 2, 8 x 256 -> 256 at 14x14: 5.7-6.0 vs 7.6).
  if (P < kMinGemmColumns && s.N >= 2 && !pointwise_images_apart(s)) {
    const int64_t want = (kMinGemmColumns + P - 1) / P;
    const int64_t images = std::max<int64_t>(1, std::min(want, s.N / std::max<int64_t>(1, threads)));
    if (images > 1) return {P, 1, s.O, 1, (s.N + images - 1) / images, images};
  }
  const int64_t budget = std::max<int64_t>(64, (int64_t{1} << 18) / (s.col_rows() + s.O));
  int64_t col_blocks = (P + budget - 1) / budget, row_blocks = 1;
  const int64_t split = s.N < threads ? (threads + s.N - 1) / s.N : 1;
  if (split > 1) {
    if (s.G == 1 && P < 256 * split && s.O >= 16 * split) {
      row_blocks = split;
    } else {
      col_blocks = (std::max(col_blocks, split) + split - 1) / split * split;
    }
  }
  col_blocks = std::max<int64_t>(1, std::min(col_blocks, P));
  const int64_t cols = (P + col_blocks - 1) / col_blocks;
  col_blocks = (P + cols - 1) / cols;
  // Row blocks in multiples of 16 channels (whole vectors for the GEMM's output tiles).
  int64_t rows = (s.O + row_blocks - 1) / row_blocks;
  if (row_blocks > 1) rows = (rows + 15) / 16 * 16;
  row_blocks = (s.O + rows - 1) / rows;
  return {cols, col_blocks, rows, row_blocks, s.N * col_blocks * row_blocks};
}

// oneDNN (through at::convolution, the library behind F.conv2d) is the other route a pass can
// take; route.h picks between it and the kernels per shape by measuring both. What it costs:
// at full input width (width 1.0, a first layer) the active weight W[:O] is contiguous and
// handed over as a view; at a partial width the forward and the input gradient need the
// prefix W[:O, :ig] as a contiguous copy (what the reference style copies on every call), and
// the weight gradient never reads the weight (it gets an empty tensor of the prefix's sizes).
//
// The fixed rule (SLIMOPS_CONV_ROUTE=fixed, and passes too small to measure) takes oneDNN at
// full width only. Measured side by side (2-core AMD EPYC with AVX-512, float32, 2 threads,
// glibc mmap/trim thresholds raised so neither side pays page faults; sweep in issue 13's
// closing note): oneDNN's direct 3x3 convolutions ran 1.7-3.1x faster than im2col + GEMM at
// batch 1 to 64. Pointwise convs split by size: at 14M multiply-adds and more (512x512 at
// 14x14, 1024x1024 at 7x7, 960 -> 320 at 7x7, 16 -> 96 at 112x112, 256x256 at 28x28, batch 8
// at 14x14) oneDNN was 1.2-2.1x faster; below (most of S-MobileNet v2's pointwise layers at
// batch 1, 4x4/2x2 planes at batch 64) the GEMM path was 1.0-2.4x faster (oneDNN reorders the
// weight into its blocked layout on every call, a fixed cost small layers do not amortise).
// The backward passes follow the same rule.
// SLIMOPS_CONV_ONEDNN=0 turns the route off altogether (tests run both paths).
constexpr int64_t kOnednnPointwiseMacs = int64_t{14} << 20;

bool conv_direct_enabled();
bool conv_winograd_enabled();
bool conv_narrow_enabled();

// Whether oneDNN can run the pass at all (route.h, onednn_takes).
bool onednn_possible(const ConvGeometry& s, const at::Tensor& input) {
  return onednn_takes(input, {s.sh, s.sw, s.dh, s.dw, s.H + 2 * s.ph, s.W + 2 * s.pw});
}

// The fixed rule: oneDNN where its weight is a view of the shared one (full input width; with
// groups, also full output width), 3x3 always, pointwise from 14M multiply-adds.
bool onednn_fixed(const ConvGeometry& s) {
  if (s.ig != s.Ig || (s.G > 1 && s.og != s.Og)) return false;
  if (!s.pointwise()) return true;
  return s.N * s.P() * s.C * s.O >= kOnednnPointwiseMacs;
}

int64_t conv_macs(const ConvGeometry& s) { return s.N * s.P() * s.O * s.K(); }

// kBothGrads: the input and weight gradients of one call (conv2d_backward), as a pair.
enum class Pass { kForward, kInputGrad, kWeightGrad, kBothGrads };

// Everything a pass's speed depends on, for route.h's cache.
RouteKey route_key(const ConvGeometry& s, Pass pass, int64_t epilogue) {
  return {static_cast<int64_t>(RouteOp::kConv2d) + static_cast<int64_t>(pass),
          s.N, s.C, s.H, s.W, s.O, s.Ig, s.kh, s.kw, s.sh, s.sw, s.ph, s.pw, s.dh, s.dw,
          epilogue, at::get_num_threads(), static_cast<int64_t>(cpu_isa()),
          conv_direct_enabled() ? 1 : 0, s.G, conv_winograd_enabled() ? 1 : 0,
          conv_narrow_enabled() ? 1 : 0, 0, 0};
}

// The active weight [O, ig, kh, kw] as oneDNN takes it (contiguous): W[:O, :ig], or with
// groups each group's block prefix W[g*Og : g*Og + og, :ig] stacked (the reference style's
// gather). The shared weight itself at full width, a view where the prefix is the shared
// weight's own memory (full input width; with groups also full output width), else a copy,
// as the reference style copies it on every call.
at::Tensor onednn_weight(const at::Tensor& weight, const ConvGeometry& s) {
  if (s.O == weight.size(0) && s.ig == weight.size(1) && weight.is_contiguous()) return weight;
  const at::Tensor w =
      s.G == 1 ? weight.narrow(0, 0, s.O).narrow(1, 0, s.ig)
               : weight.view({s.G, s.Og, s.Ig, s.kh, s.kw}).narrow(1, 0, s.og).narrow(2, 0, s.ig);
  return w.is_contiguous() ? w.view({s.O, s.ig, s.kh, s.kw})
                           : w.contiguous().view({s.O, s.ig, s.kh, s.kw});
}

// Group g of the conv as a direct-kernel problem (conv2d_direct.h): W[g*Og : g*Og + og, :ig]
// read in place through the weight's strides.
DirectConv direct_forward_problem(const ConvGeometry& s, int64_t g, const float* x,
                                  const float* w, float* y) {
  const int64_t HW = s.HW(), KK = s.kernel_area(), P = s.P();
  DirectConv d;
  d.N = s.N; d.C = s.ig; d.H = s.H; d.W = s.W;
  d.O = s.og; d.Ho = s.Ho; d.Wo = s.Wo;
  d.kh = s.kh; d.kw = s.kw; d.sh = s.sh; d.sw = s.sw;
  d.ph = s.ph; d.pw = s.pw; d.dh = s.dh; d.dw = s.dw;
  d.x = x ? x + g * s.ig * HW : nullptr;
  d.x_n = s.C * HW;
  d.w = w ? w + g * s.Og * s.weight_ld() : nullptr;
  d.w_o = s.weight_ld(); d.w_c = KK; d.w_i = s.kw; d.w_j = 1;
  d.y = y ? y + g * s.og * P : nullptr;
  d.y_n = s.O * P;
  return d;
}

// The stride-1 input gradient of group g as the same correlation: grad_z (its og channels as
// the input) with the transposed, flipped prefix W(c, o, i, j) = weight[o, c, kh-1-i, kw-1-j]
// and padding (k-1)*d - p. Valid when that padding is not negative (checked by the caller).
// It is the forward problem of the transposed geometry, with the weight read backwards.
DirectConv direct_input_grad_problem(const ConvGeometry& s, int64_t g, const float* gz,
                                     const float* w, float* gi) {
  ConvGeometry t = s;
  t.C = s.O; t.H = s.Ho; t.W = s.Wo; t.ig = s.og;
  t.O = s.C; t.Ho = s.H; t.Wo = s.W; t.og = s.ig;
  t.sh = 1; t.sw = 1;
  t.ph = (s.kh - 1) * s.dh - s.ph; t.pw = (s.kw - 1) * s.dw - s.pw;
  DirectConv d = direct_forward_problem(t, g, gz, nullptr, gi);
  const int64_t KK = s.kernel_area();
  d.w = w ? w + g * s.Og * s.weight_ld() + (s.kh - 1) * s.kw + (s.kw - 1) : nullptr;
  d.w_o = KK; d.w_c = s.weight_ld(); d.w_i = -s.kw; d.w_j = -1;
  return d;
}

// When the direct kernels run instead of im2col + GEMM: float32 off the oneDNN route, on
// shapes they suit (direct_conv_suits). SLIMOPS_CONV_DIRECT=0 turns them off (tests run both).
// Read on every call (a getenv, next to a convolution), so that a benchmark can compare both
// paths in one process.
bool conv_direct_enabled() {
  const char* v = std::getenv("SLIMOPS_CONV_DIRECT");
  return v == nullptr || std::string(v) != "0";
}

// When the forward's GEMMs with few columns take the narrow GEMM (gemm_narrow.h) instead of
// BLAS. SLIMOPS_CONV_NARROW=0 turns it off (tests run both paths). Read on every call, so
// that a benchmark can compare both paths in one process.
bool conv_narrow_enabled() {
  const char* v = std::getenv("SLIMOPS_CONV_NARROW");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The forward's product of one block, C = A B: the narrow GEMM where it suits and this call is
// the product's only thread (inside a task, or too small for BLAS's team: gemm.h), else BLAS.
template <typename scalar_t>
void forward_gemm(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                  const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    // (M * N * K fits: narrow_gemm_suits bounds N and K.)
    if (narrow_gemm_suits(M, N, K) && conv_narrow_enabled() &&
        (at::in_parallel_region() || at::get_num_threads() == 1 || !worth_threads(M * N * K))) {
      narrow_gemm(M, N, K, A, lda, B, ldb, C, ldc);
      return;
    }
  }
  gemm<scalar_t>(M, N, K, A, lda, B, ldb, C, ldc);
}

// Which of the three passes the direct kernels take, per instruction set, from a side-by-side
// sweep against the im2col + GEMM path (2-core AMD EPYC Zen 4, float32, 2 threads, batch 1
// and 8, planes 14x14 to 56x56, 16 to 256 channels; issue 13's closing note has the table).
// Under AVX-512 the direct kernels won everywhere but in the forward of wide layers (128 or
// more input channels) on planes under 28 columns, where the GEMM's long inner dimension
// wins. Under AVX2 (the 9-accumulator tile) they won up to 32 channels on either side and lost
// beyond it in the forward and input gradient.
bool direct_wins(const ConvGeometry& s, Pass pass) {
  if (cpu_isa() == Isa::kAvx512)
    return pass != Pass::kForward || s.ig < 128 || s.Wo >= 28;
  return s.ig <= 32 && s.og <= 32;
}

// The input gradient is a correlation (direct_input_grad_problem) only at stride 1, with
// padding (k-1)*d - p >= 0.
bool input_grad_is_correlation(const ConvGeometry& s) {
  return s.sh == 1 && s.sw == 1 && s.ph <= (s.kh - 1) * s.dh && s.pw <= (s.kw - 1) * s.dw;
}

bool use_direct(const ConvGeometry& s, bool is_float, Pass pass) {
  if (!is_float || !conv_direct_enabled() || s.pointwise() ||
      !direct_wins(s, pass))
    return false;
  if (pass != Pass::kInputGrad)
    return direct_conv_suits(direct_forward_problem(s, 0, nullptr, nullptr, nullptr));
  return input_grad_is_correlation(s) &&
         direct_conv_suits(direct_input_grad_problem(s, 0, nullptr, nullptr, nullptr));
}

// When the Winograd kernels (conv2d_winograd.h) are the kernels' side of a 3x3 stride-1 pass:
// SLIMOPS_CONV_WINOGRAD=0 never, =1 wherever they suit (tests use it), unset (or "auto") only
// when the route measures (SLIMOPS_CONV_ROUTE=auto), because their float32 rounding differs
// from a direct sum's (conv2d_winograd.h): the fixed route keeps its exact arithmetic, and a
// measured route takes them only where they ran faster than oneDNN. Read on every call.
bool conv_winograd_enabled() {
  const char* v = std::getenv("SLIMOPS_CONV_WINOGRAD");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0)
    return route_mode() == RouteMode::kAuto;
  if (std::strcmp(v, "0") == 0) return false;
  if (std::strcmp(v, "1") == 0) return true;
  TORCH_CHECK(false, "SLIMOPS_CONV_WINOGRAD must be auto, 0 or 1, got '", v, "'");
}

bool use_winograd(const ConvGeometry& s, bool is_float, Pass pass) {
  if (!is_float || s.G != 1 || !conv_winograd_enabled()) return false;
  if (pass != Pass::kInputGrad)
    return winograd_suits(direct_forward_problem(s, 0, nullptr, nullptr, nullptr));
  return input_grad_is_correlation(s) &&
         winograd_suits(direct_input_grad_problem(s, 0, nullptr, nullptr, nullptr));
}

// The forward on the direct kernels, group by group (float32 only: use_direct is false for
// other dtypes, so the double instantiation is never called).
template <typename scalar_t>
void conv2d_direct(const ConvGeometry&, const scalar_t*, const scalar_t*, scalar_t*,
                   EpilogueRows<scalar_t>, const scalar_t*, const scalar_t*, const scalar_t*,
                   int64_t, bool) {
  TORCH_CHECK(false, "slimops::conv2d: the direct kernels are float32 only");
}

template <>
void conv2d_direct<float>(const ConvGeometry& s, const float* xp, const float* wp, float* op,
                          EpilogueRows<float> epilogue, const float* a, const float* t,
                          const float* rp, int64_t activation, bool has_epilogue) {
  const int64_t P = s.P();
  for (int64_t g = 0; g < s.G; ++g) {
    const DirectEpilogue ep{epilogue, a + g * s.og, t + g * s.og,
                            rp ? rp + g * s.og * P : nullptr, s.O * P, activation};
    direct_conv_forward(direct_forward_problem(s, g, xp, wp, op), has_epilogue ? &ep : nullptr);
  }
}

// The forward on the Winograd kernels (one group, float32 only: use_winograd is false
// otherwise); false when a value was out of their checked range (the caller's other kernels
// then overwrite the output).
template <typename scalar_t>
bool conv2d_winograd(const ConvGeometry&, const scalar_t*, const scalar_t*, scalar_t*,
                     EpilogueRows<scalar_t>, const scalar_t*, const scalar_t*, const scalar_t*,
                     int64_t, bool) {
  TORCH_CHECK(false, "slimops::conv2d: the Winograd kernels are float32 only");
}

template <>
bool conv2d_winograd<float>(const ConvGeometry& s, const float* xp, const float* wp, float* op,
                            EpilogueRows<float> epilogue, const float* a, const float* t,
                            const float* rp, int64_t activation, bool has_epilogue) {
  const DirectEpilogue ep{epilogue, a, t, rp, s.O * s.P(), activation};
  return winograd_forward(direct_forward_problem(s, 0, xp, wp, op), has_epilogue ? &ep : nullptr);
}

// The bias of the active output channels as oneDNN takes it: channel c = g*og + j is bias row
// g*Og + j (the bias itself at full output width, a view of the prefix with one group, else
// gathered: O values).
at::Tensor onednn_bias(const at::Tensor& bias, const ConvGeometry& s) {
  if (s.G == 1 || s.og == s.Og) return leading(bias, s.O);
  return bias.view({s.G, s.Og}).narrow(1, 0, s.og).reshape({s.O});
}

// The conv on oneDNN, then the epilogue (the same per-row pass as the GEMM path) in place.
// `bias_only`: the epilogue is just the bias, which oneDNN adds itself (as in the reference
// style's F.conv2d): no second pass over the output.
template <typename scalar_t>
at::Tensor conv2d_onednn(const at::Tensor& input, const at::Tensor& weight,
                   const ConvGeometry& s, const scalar_t* a, const scalar_t* t,
                   const scalar_t* rp, int64_t activation, bool has_epilogue,
                   const at::Tensor* bias_only) {
  // NCHW in, NCHW out (contiguous() is a no-op then; it only guards another layout).
  const c10::optional<at::Tensor> b =
      bias_only ? c10::optional<at::Tensor>(onednn_bias(*bias_only, s)) : c10::nullopt;
  at::Tensor out = at::convolution(input, onednn_weight(weight, s), b, {s.sh, s.sw},
                                   {s.ph, s.pw}, {s.dh, s.dw}, false, {0, 0}, s.G)
                       .contiguous();
  check_onednn_shape(out, {s.N, s.O, s.Ho, s.Wo}, "conv2d", "output");
  if (!has_epilogue || bias_only) return out;
  epilogue_planes(out.data_ptr<scalar_t>(), s.N, s.O, s.P(), a, t, rp, activation);
  return out;
}

template <typename scalar_t>
void conv2d_kernels(const ConvGeometry& s, const BlockPlan& plan, int64_t threads,
                    const scalar_t* xp, const scalar_t* wp, scalar_t* op_, const scalar_t* a_,
                    const scalar_t* t_, const scalar_t* rp, int64_t activation,
                    bool has_epilogue);

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, int64_t out_channels,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& shift,
                  const c10::optional<at::Tensor>& residual, int64_t activation) {
  constexpr const char* op = "conv2d";
  check_activation(activation);
  check_float(input, op, "input");
  check_same(weight, input, op, "weight");
  TORCH_CHECK(input.dim() == 4, "slimops::conv2d: expected a 4-D NCHW input, got shape ",
              input.sizes());
  const ConvGeometry s =
      make_geometry(op, input.sizes(), weight, out_channels, stride, padding, dilation, groups);
  check_vector(bias, s.G * s.Og, input, op, "bias");
  check_vector(scale, s.O, input, op, "scale");
  check_vector(shift, s.O, input, op, "shift");
  const std::vector<int64_t> out_size = {s.N, s.O, s.Ho, s.Wo};
  if (const at::Tensor* r = opt_ptr(residual)) {
    check_same(*r, input, op, "residual");
    TORCH_CHECK(r->sizes() == at::IntArrayRef(out_size), "slimops::conv2d: residual must have "
                "the output's shape ", at::IntArrayRef(out_size), ", got ", r->sizes());
  }

  const bool empty = s.N * s.O * s.Ho * s.Wo == 0;
  if (empty) return at::empty(out_size, input.options());
  const at::Tensor x = input.contiguous();
  at::Tensor out;
  const auto contiguous_or_undefined = [](const c10::optional<at::Tensor>& t) {
    const at::Tensor* p = opt_ptr(t);
    return p ? p->contiguous() : at::Tensor();
  };
  const at::Tensor sc = contiguous_or_undefined(scale);
  const at::Tensor sh = contiguous_or_undefined(shift);
  const at::Tensor res = contiguous_or_undefined(residual);
  const at::Tensor* b = opt_ptr(bias);
  const bool has_epilogue = b || sc.defined() || sh.defined() || res.defined() ||
                            activation != kNone;
  const int64_t threads = at::get_num_threads();
  const BlockPlan plan = plan_blocks(s, threads);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "slimops_conv2d", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const int64_t og = s.og, Og = s.Og;
    const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    // The epilogue as one multiply-add per element: act(z * a[c] + t[c] + r), with
    // (z + bias) * scale + shift == z * scale + (bias * scale + shift). Output channel
    // c = g*og + j reads bias row g*Og + j, through the bias's own stride.
    std::vector<scalar_t> a(has_epilogue ? s.O : 0), t(has_epilogue ? s.O : 0);
    if (has_epilogue) {
      const scalar_t* bp = b ? b->data_ptr<scalar_t>() : nullptr;
      const scalar_t* scp = sc.defined() ? sc.data_ptr<scalar_t>() : nullptr;
      const scalar_t* shp = sh.defined() ? sh.data_ptr<scalar_t>() : nullptr;
      const int64_t bias_stride = b ? b->stride(0) : 0;
      for (int64_t c = 0; c < s.O; ++c) {
        const scalar_t bias_c = bp ? bp[((c / og) * Og + c % og) * bias_stride] : scalar_t(0);
        a[c] = scp ? scp[c] : scalar_t(1);
        t[c] = (shp ? shp[c] : scalar_t(0)) + bias_c * a[c];
      }
    }
    // The oneDNN route returns its own output (no second, unused buffer: for a large output
    // that would be fresh pages to fault in on every call).
    const auto by_onednn = [&] {
      const bool bias_only = b && !sc.defined() && !sh.defined() && !res.defined() &&
                             activation == kNone;
      return conv2d_onednn<scalar_t>(x, weight, s, a.data(), t.data(), rp, activation,
                                     has_epilogue, bias_only ? b : nullptr);
    };
    const auto by_kernels = [&] {
      at::Tensor result = at::empty(out_size, input.options());
      conv2d_kernels<scalar_t>(s, plan, threads, xp, wp, result.data_ptr<scalar_t>(), a.data(),
                               t.data(), rp, activation, has_epilogue);
      return result;
    };
    const int64_t epilogue_key = (has_epilogue ? 1 : 0) + (rp ? 2 : 0) + 4 * activation;
    out = run_routed<at::Tensor>(route_key(s, Pass::kForward, epilogue_key),
                                 onednn_possible(s, x), conv_macs(s), onednn_fixed(s),
                                 by_onednn, by_kernels);
  });
  return out;
}

// The forward on slimops' kernels: the direct kernels where they suit, else im2col + GEMM.
template <typename scalar_t>
void conv2d_kernels(const ConvGeometry& s, const BlockPlan& plan, int64_t threads,
                    const scalar_t* xp, const scalar_t* wp, scalar_t* op_, const scalar_t* a_,
                    const scalar_t* t_, const scalar_t* rp, int64_t activation,
                    bool has_epilogue) {
    const int64_t P = s.P(), K = s.K(), lda = s.weight_ld();
    const int64_t og = s.og, Og = s.Og;
    const EpilogueRows<scalar_t> epilogue = epilogue_rows_for_cpu<scalar_t>();
    const bool is_float = std::is_same<scalar_t, float>::value;
    if (use_winograd(s, is_float, Pass::kForward) &&
        conv2d_winograd<scalar_t>(s, xp, wp, op_, epilogue, a_, t_, rp, activation,
                                  has_epilogue))
      return;
    if (use_direct(s, is_float, Pass::kForward)) {
      conv2d_direct<scalar_t>(s, xp, wp, op_, epilogue, a_, t_, rp, activation, has_epilogue);
      return;
    }

    // One (image, column block): im2col of the block (unless pointwise: the image is its own
    // im2col matrix), one GEMM per group on the weight's prefix in place, then the epilogue
    // on the block while it is in cache.
    // Several small images per task: their im2col (or, pointwise, their inputs) side by side
    // in `cols` [Ktot, k * P], one GEMM per group into `tmp` [O, k * P], then each image's
    // slice copied to its output and the epilogue applied there (in cache).
    const auto run_images = [&](int64_t task, scalar_t* cols, scalar_t* tmp) {
      const int64_t n0 = task * plan.images, k = std::min(plan.images, s.N - n0);
      const int64_t ld = k * P, rows = s.col_rows();
      if (s.pointwise()) {  // row by row: consecutive copies write consecutive memory
        const scalar_t* images = xp + n0 * s.C * P;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < k; ++j)
            copy_run(images + (j * s.C + r) * P, P, cols + r * ld + j * P);
      } else {
        for (int64_t j = 0; j < k; ++j)
          im2col_block(xp + (n0 + j) * s.C * s.HW(), cols + j * P, s, 0, P, ld);
      }
      for (int64_t g = 0; g < s.G; ++g)
        forward_gemm<scalar_t>(og, ld, K, wp + g * Og * lda, lda, cols + g * K * ld, ld,
                               tmp + g * og * ld, ld);
      for (int64_t j = 0; j < k; ++j) {
        scalar_t* C = op_ + (n0 + j) * s.O * P;
        for (int64_t c = 0; c < s.O; ++c)
          copy_run(tmp + c * ld + j * P, P, C + c * P);
        if (has_epilogue)
          epilogue(C, P, s.O, P, a_, t_, rp ? rp + (n0 + j) * s.O * P : nullptr,
                   activation);
      }
    };
    const auto run_block = [&](int64_t task, scalar_t* cols) {
      const int64_t per_image = plan.col_blocks * plan.row_blocks;
      const int64_t n = task / per_image;
      const int64_t p0 = (task % per_image) / plan.row_blocks * plan.cols;
      const int64_t r0 = (task % plan.row_blocks) * plan.rows;  // row blocks: G == 1 only
      const int64_t ncols = std::min(plan.cols, P - p0);
      const int64_t nrows = std::min(plan.rows, s.O - r0);
      const scalar_t* image = xp + n * s.C * s.HW();
      const scalar_t* B = image + p0;
      int64_t ldb = s.HW();
      if (!s.pointwise()) {
        im2col_block(image, cols, s, p0, ncols, ncols);
        B = cols;
        ldb = ncols;
      }
      scalar_t* C = op_ + n * s.O * P + p0;
      if (plan.row_blocks > 1) {
        forward_gemm<scalar_t>(nrows, ncols, K, wp + r0 * lda, lda, B, ldb, C + r0 * P, P);
      } else {
        for (int64_t g = 0; g < s.G; ++g)
          forward_gemm<scalar_t>(og, ncols, K, wp + g * Og * lda, lda, B + g * K * ldb, ldb,
                                 C + g * og * P, P);
      }
      if (has_epilogue)
        epilogue(C + r0 * P, P, nrows, ncols, a_ + r0, t_ + r0,
                 rp ? rp + n * s.O * P + p0 + r0 * P : nullptr, activation);
    };
    const bool multi = plan.images > 1;
    const int64_t cols_size = multi ? s.col_rows() * plan.images * P
                                    : (s.pointwise() ? 0 : s.col_rows() * plan.cols);
    const int64_t tmp_size = multi ? s.O * plan.images * P : 0;
    const auto run_tasks = [&](int64_t begin, int64_t end) {
      // The thread's own scratch (parallel.h): a fresh zeroed vector per call cost a memset
      // and, past glibc's mmap threshold, page faults on every call.
      scalar_t* cols = scratch<scalar_t>(ScratchSlot::kCols, cols_size);
      scalar_t* tmp = scratch<scalar_t>(ScratchSlot::kTmp, tmp_size);
      for (int64_t task = begin; task < end; ++task) {
        if (multi) {
          run_images(task, cols, tmp);
        } else {
          run_block(task, cols);
        }
      }
    };
    if (plan.tasks >= threads && threads > 1 && worth_threads(conv_macs(s))) {
      // One task per thread at a time; BLAS inside a parallel region runs single-threaded.
      // Not below kParallelWork (parallel.h's rule 1): an 8 -> 8 1x1 conv on a 2x2 plane
      // opened this region and took 8 ms with both cores of a 2-core Intel Xeon busy.
      watched_parallel_for(0, plan.tasks, 1, [&](int64_t begin, int64_t end) {
        ImageGuard guard;  // only the fallback GEMM creates tensors
        run_tasks(begin, end);
      });
    } else {
      // Too little work to split (or one thread): BLAS uses the threads itself where the
      // product is large enough (gemm.h).
      run_tasks(0, plan.tasks);
    }
}

// grad_z: [N, O, Ho, Wo] with O = grad_z.size(1) the active output width.
ConvGeometry backward_geometry(const char* op, const at::Tensor& grad_z,
                               at::IntArrayRef input_size, const at::Tensor& weight,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  check_float(grad_z, op, "grad_z");
  TORCH_CHECK(weight.scalar_type() == grad_z.scalar_type() && weight.device() == grad_z.device(),
              "slimops::", op, ": weight (", weight.scalar_type(), ", ", weight.device(),
              ") must match grad_z (", grad_z.scalar_type(), ", ", grad_z.device(), ")");
  TORCH_CHECK(grad_z.dim() == 4, "slimops::", op, ": grad_z must be 4-D [N, O, Ho, Wo], got ",
              grad_z.sizes());
  const ConvGeometry s = make_geometry(op, input_size, weight, grad_z.size(1), stride, padding,
                                       dilation, groups);
  TORCH_CHECK(grad_z.size(0) == s.N && grad_z.size(2) == s.Ho && grad_z.size(3) == s.Wo,
              "slimops::", op, ": grad_z shape ", grad_z.sizes(), " does not match the output [",
              s.N, ", ", s.O, ", ", s.Ho, ", ", s.Wo, "] of an input of size ", input_size);
  return s;
}

// backward_geometry for the ops that read the forward's input (the weight gradient, the
// pair): a 4-D float input of grad_z's dtype and device as well.
ConvGeometry input_backward_geometry(const char* op, const at::Tensor& grad_z,
                                     const at::Tensor& input, const at::Tensor& weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups) {
  check_float(input, op, "input");
  check_same(grad_z, input, op, "grad_z");
  TORCH_CHECK(input.dim() == 4, "slimops::", op, ": expected a 4-D NCHW input, got shape ",
              input.sizes());
  return backward_geometry(op, grad_z, input.sizes(), weight, stride, padding, dilation,
                           groups);
}

// The input gradient on oneDNN (see onednn_possible). The input's values are not needed for
// its gradient; convolution_backward reads only its sizes.
at::Tensor conv2d_backward_input_onednn(const ConvGeometry& s, const at::Tensor& grad_z,
                                        const at::Tensor& weight, at::IntArrayRef input_size) {
  const at::Tensor sizes_only = at::empty(input_size, grad_z.options());
  auto grads = at::convolution_backward(
      grad_z.contiguous(), sizes_only, onednn_weight(weight, s), c10::nullopt, {s.sh, s.sw},
      {s.ph, s.pw}, {s.dh, s.dw}, false, {0, 0}, s.G, {true, false, false});
  check_onednn_shape(std::get<0>(grads), input_size, "conv2d", "input gradient");
  return std::get<0>(grads).contiguous();
}

at::Tensor conv2d_backward_input_kernels(const ConvGeometry& s, const at::Tensor& grad_z,
                                         const at::Tensor& weight, at::IntArrayRef input_size);

at::Tensor conv2d_backward_input(const at::Tensor& grad_z, const at::Tensor& weight,
                                 at::IntArrayRef input_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const ConvGeometry s = backward_geometry("conv2d_backward_input", grad_z, input_size, weight,
                                           stride, padding, dilation, groups);
  const bool work = s.N * s.C * s.HW() > 0 && s.O > 0;
  return run_routed<at::Tensor>(
      route_key(s, Pass::kInputGrad, 0), work && onednn_possible(s, grad_z), conv_macs(s),
      onednn_fixed(s), [&] { return conv2d_backward_input_onednn(s, grad_z, weight, input_size); },
      [&] { return conv2d_backward_input_kernels(s, grad_z, weight, input_size); });
}

at::Tensor conv2d_backward_input_kernels(const ConvGeometry& s, const at::Tensor& grad_z,
                                         const at::Tensor& weight, at::IntArrayRef input_size) {
  if (s.N * s.C * s.HW() > 0 &&
      use_winograd(s, grad_z.scalar_type() == at::kFloat, Pass::kInputGrad)) {
    at::Tensor grad_input = at::empty(input_size, grad_z.options());
    const at::Tensor gz = grad_z.contiguous();
    if (winograd_forward(direct_input_grad_problem(s, 0, gz.data_ptr<float>(),
                                                   weight.data_ptr<float>(),
                                                   grad_input.data_ptr<float>()),
                         nullptr))
      return grad_input;
  }
  if (s.N * s.C * s.HW() > 0 &&
      use_direct(s, grad_z.scalar_type() == at::kFloat, Pass::kInputGrad)) {
    // The groups' ig input channels cover C: every element of grad_input is written.
    at::Tensor grad_input = at::empty(input_size, grad_z.options());
    const at::Tensor gz = grad_z.contiguous();
    for (int64_t g = 0; g < s.G; ++g)
      direct_conv_forward(direct_input_grad_problem(s, g, gz.data_ptr<float>(),
                                                    weight.data_ptr<float>(),
                                                    grad_input.data_ptr<float>()),
                          nullptr);
    return grad_input;
  }
  // The pointwise path writes every element through its GEMMs; col2im accumulates.
  at::Tensor grad_input = s.pointwise() ? at::empty(input_size, grad_z.options())
                                        : at::zeros(input_size, grad_z.options());
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor gz = grad_z.contiguous();

  // A pointwise conv writes its columns straight into grad_input when a chunk is one image.
  AT_DISPATCH_FLOATING_TYPES(grad_z.scalar_type(), "slimops_conv2d_backward_input", [&] {
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* gip = grad_input.data_ptr<scalar_t>();
    for_grad_chunks(s, gz.data_ptr<scalar_t>(), [&](const Chunk& ch, int64_t L,
                                                    const Operand<scalar_t>& B) {
      // Columns' gradient [C*kh*kw, L] = W_g^T [K, og] @ B_g [og, L], per group; the
      // transposed prefix is read in place (column-major with the same leading dimension).
      const bool direct = s.pointwise() && ch.k == 1;
      scalar_t* cols = direct ? gip + ch.n0 * s.C * s.HW() + ch.p0
                              : scratch<scalar_t>(ScratchSlot::kCols, s.col_rows() * L);
      const int64_t ldc = direct ? s.HW() : L;
      for (int64_t g = 0; g < s.G; ++g)
        gemm<scalar_t>(true, false, s.K(), L, s.og, wp + g * s.Og * s.weight_ld(), s.weight_ld(),
                       B.data + g * s.og * B.ld, B.ld, scalar_t(0), cols + g * s.K() * ldc, ldc);
      if (direct) return;
      // Scatter back, one (image, channel) plane per item: planes never share a writer.
      run_ranges(ch.k * s.C, s.kernel_area() * ch.cnt, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t j = item / s.C, cc = item % s.C;
          scalar_t* plane = gip + ((ch.n0 + j) * s.C + cc) * s.HW();
          const scalar_t* src = cols + cc * s.kernel_area() * L + j * ch.cnt;
          if (s.pointwise()) {
            copy_run(src, ch.cnt, plane + ch.p0);
          } else {
            col2im_channel(src, L, plane, s, ch.p0, ch.cnt);
          }
        }
      });
    });
  });
  return grad_input;
}

at::Tensor conv2d_backward_weight_onednn(const ConvGeometry& s, const at::Tensor& gz,
                                         const at::Tensor& x, const at::Tensor& weight);
at::Tensor conv2d_backward_weight_kernels(const ConvGeometry& s, const at::Tensor& gz,
                                          const at::Tensor& x, const at::Tensor& weight);

at::Tensor conv2d_backward_weight(const at::Tensor& grad_z, const at::Tensor& input,
                                  const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  const ConvGeometry s = input_backward_geometry("conv2d_backward_weight", grad_z, input,
                                                 weight, stride, padding, dilation, groups);
  if (s.N == 0) return at::zeros(weight.sizes(), weight.options());
  const at::Tensor x = input.contiguous();
  const at::Tensor gz = grad_z.contiguous();
  return run_routed<at::Tensor>(
      route_key(s, Pass::kWeightGrad, 0), s.O > 0 && onednn_possible(s, x), conv_macs(s),
      onednn_fixed(s), [&] { return conv2d_backward_weight_onednn(s, gz, x, weight); },
      [&] { return conv2d_backward_weight_kernels(s, gz, x, weight); });
}

// oneDNN's weight gradient [O, ig, kh, kw] written into the prefix of a full-size gradient,
// row by row, the rest zeroed. Output channel o = g*og + j is the weight's row g*Og + j (one
// group: row o).
at::Tensor full_size_weight_grad(const ConvGeometry& s, const at::Tensor& onednn_grad,
                                 const at::Tensor& weight) {
  const at::Tensor gw = onednn_grad.contiguous();
  check_onednn_shape(gw, {s.O, s.ig, s.kh, s.kw}, "conv2d", "weight gradient");
  // At full width oneDNN's gradient is the full-size one: no second buffer, no copy (a
  // 2048 x 512 1x1 layer's is 4 MB).
  if (gw.sizes() == weight.sizes()) return gw;
  // Every element is written below (the prefix copied, the rest zeroed): no zero-fill first.
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  const int64_t row = s.ig * s.kernel_area(), ldw = s.weight_ld();
  const float* src = gw.data_ptr<float>();
  float* dst = grad_weight.data_ptr<float>();
  for (int64_t r = 0; r < weight.size(0); ++r) {
    const int64_t j = r % s.Og;
    float* d = dst + r * ldw;
    if (j < s.og) {
      const float* from = src + ((r / s.Og) * s.og + j) * row;
      std::copy(from, from + row, d);
      std::fill(d + row, d + ldw, 0.0f);
    } else {
      std::fill(d, d + ldw, 0.0f);
    }
  }
  return grad_weight;
}

// The weight gradient on oneDNN. It never reads the weight, so oneDNN gets an empty tensor of
// the prefix's sizes (no copy at any width).
at::Tensor conv2d_backward_weight_onednn(const ConvGeometry& s, const at::Tensor& gz,
                                         const at::Tensor& x, const at::Tensor& weight) {
  const at::Tensor sizes_only = at::empty({s.O, s.ig, s.kh, s.kw}, weight.options());
  auto grads = at::convolution_backward(gz, x, sizes_only, c10::nullopt, {s.sh, s.sw},
                                        {s.ph, s.pw}, {s.dh, s.dw}, false, {0, 0}, s.G,
                                        {false, true, false});
  return full_size_weight_grad(s, std::get<1>(grads), weight);
}

at::Tensor conv2d_backward_weight_kernels(const ConvGeometry& s, const at::Tensor& gz,
                                          const at::Tensor& x, const at::Tensor& weight) {
  if (use_winograd(s, x.scalar_type() == at::kFloat, Pass::kWeightGrad)) {
    at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
    const DirectConv d = direct_forward_problem(s, 0, x.data_ptr<float>(), nullptr, nullptr);
    if (winograd_weight_grad(d, gz.data_ptr<float>(), s.O * s.P(),
                             grad_weight.data_ptr<float>()))
      return grad_weight;
  }
  if (use_direct(s, x.scalar_type() == at::kFloat, Pass::kWeightGrad)) {
    at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
    for (int64_t g = 0; g < s.G; ++g) {
      DirectConv d = direct_forward_problem(s, g, x.data_ptr<float>(), nullptr, nullptr);
      direct_conv_weight_grad(d, gz.data_ptr<float>() + g * s.og * s.P(), s.O * s.P(),
                              grad_weight.data_ptr<float>() + g * s.Og * s.weight_ld());
    }
    return grad_weight;
  }

  // Per chunk and group, one GEMM accumulates gz_g [og, L] @ cols_g^T [L, K] straight into the
  // strided prefix of the full-size gradient (leading dimension Ig*kh*kw): the chunk's images
  // and positions are the GEMM's inner dimension. At full width the GEMMs write every element
  // (the chunks run in order, the first one's overwrite: beta 0), so nothing is zero-filled
  // first: that was a pass over the whole gradient (a 1024 x 1024 1x1 layer's 4 MB at 7x7,
  // batch 1: 0.48-0.50 -> 0.33-0.39 ms per call, 2-core Xeon, AVX-512 and AVX2). At a partial
  // width the rest must be zero, and one parallel fill of all of it measured faster than
  // zeroing only the rest row by row (0.5x: 0.21-0.23 vs 0.25-0.30 ms).
  const bool whole = s.og == s.Og && s.ig == s.Ig;
  at::Tensor grad_weight = whole ? at::empty(weight.sizes(), weight.options())
                                 : at::zeros(weight.sizes(), weight.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "slimops_conv2d_backward_weight", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gwp = grad_weight.data_ptr<scalar_t>();
    for_grad_chunks(s, gz.data_ptr<scalar_t>(), [&](const Chunk& ch, int64_t L,
                                                    const Operand<scalar_t>& A) {
      const scalar_t* B = xp + ch.n0 * s.C * s.HW() + ch.p0;  // a pointwise image: [C, HW]
      int64_t ldb = s.HW();
      if (!(s.pointwise() && ch.k == 1)) {
        scalar_t* cols = scratch<scalar_t>(ScratchSlot::kCols, s.col_rows() * L);
        gather_cols(xp, s, ch, cols);
        B = cols;
        ldb = L;
      }
      const scalar_t beta = whole && ch.n0 == 0 && ch.p0 == 0 ? scalar_t(0) : scalar_t(1);
      for (int64_t g = 0; g < s.G; ++g)
        gemm<scalar_t>(false, true, s.og, s.K(), L, A.data + g * s.og * A.ld, A.ld,
                       B + g * s.K() * ldb, ldb, beta, gwp + g * s.Og * s.weight_ld(),
                       s.weight_ld());
    });
  });
  return grad_weight;
}

using GradPair = std::tuple<at::Tensor, at::Tensor>;

// Both gradients in one oneDNN call: convolution_backward with both outputs, on the prefix
// W[:O, :ig] (a view at full input width, else a copy, as the input gradient's route takes).
GradPair conv2d_backward_onednn(const ConvGeometry& s, const at::Tensor& gz, const at::Tensor& x,
                                const at::Tensor& weight) {
  auto grads = at::convolution_backward(gz, x, onednn_weight(weight, s), c10::nullopt,
                                        {s.sh, s.sw}, {s.ph, s.pw}, {s.dh, s.dw}, false, {0, 0},
                                        s.G, {true, true, false});
  check_onednn_shape(std::get<0>(grads), x.sizes(), "conv2d", "input gradient");
  return {std::get<0>(grads).contiguous(), full_size_weight_grad(s, std::get<1>(grads), weight)};
}

// The input and weight gradients of one conv (what conv2d's autograd asks for in training).
// Why one op: oneDNN computes both from one convolution_backward call, which is what the
// reference style's autograd makes, while the two backward ops make one call each. Measured
// (2-core AMD EPYC Zen 3, AVX2, 2 threads, idle, median of 15 interleaved): two calls vs one
// took 1.06x at [8, 64, 56, 56] 3x3 s1 and 1.00x at [8, 32, 112, 112] 3x3 s2. The pair is
// routed as a pair (route.h): oneDNN's one call against the two backward passes on their
// own routes (each of which may itself be oneDNN or the kernels), whichever measured faster.
GradPair conv2d_backward(const at::Tensor& grad_z, const at::Tensor& input,
                         const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry s = input_backward_geometry("conv2d_backward", grad_z, input, weight,
                                                 stride, padding, dilation, groups);
  const auto apart = [&]() -> GradPair {
    return {conv2d_backward_input(grad_z, weight, input.sizes(), stride, padding, dilation,
                                  groups),
            conv2d_backward_weight(grad_z, input, weight, stride, padding, dilation, groups)};
  };
  if (!(s.N * s.C * s.HW() > 0 && s.O > 0)) return apart();  // empty: the passes' own cases
  // The passes apart cost what their own routes measured: the first measurement of the pair
  // takes their best times instead of timing them again (three runs of both passes fewer
  // per training shape: the first S-ResNet-50 step, b8 on a Zen 3, 25.4/23.0 s -> 21.8/20.0 s).
  const auto apart_best = [&] {
    return route_cache().best(route_key(s, Pass::kInputGrad, 0)) +
           route_cache().best(route_key(s, Pass::kWeightGrad, 0));
  };
  // Dense copies for oneDNN only, inside its route: a pair on the passes apart takes none.
  return run_routed<GradPair>(
      route_key(s, Pass::kBothGrads, 0), onednn_possible(s, input), 2 * conv_macs(s),
      onednn_fixed(s),
      [&] { return conv2d_backward_onednn(s, grad_z.contiguous(), input.contiguous(), weight); },
      apart, apart_best);
}

}  // namespace

SLIMOPS_CPU_IMPL_WITH_BACKWARDS(conv2d)

// The two gradients as one op (conv2d's autograd calls it when it needs both).
TORCH_LIBRARY_IMPL(slimops, CPU, m) { SLIMOPS_CPU_IMPL("conv2d_backward", conv2d_backward); }

}  // namespace cpu
}  // namespace slimops
