// Direct depthwise convolution on the channel prefix W[:C] of a [C_full, 1, kh, kw] weight,
// with the fused epilogue, and its two backward ops.
//
// Every op works one (n, c) plane at a time, so planes are independent and parallel_for needs
// no synchronisation. A plane that needs padding is first copied into a zero-bordered
// thread-local buffer, so the convolution loops carry no bounds tests at all: with the kernel
// size and stride fixed at compile time (the common depthwise shapes) the row loop unrolls over
// the taps and vectorises over output columns. The stride-1 input gradient reuses that loop (it
// is a correlation with the flipped kernel); other strides scatter into the padded buffer.
#include "checked_size.h"
#include "cpu/common.h"
#include "cpu/epilogue_rows.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"
#include "cpu/route.h"

#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace slimops {
namespace cpu {
namespace {

// A strided, dilated, zero-padded 2-D correlation of one H x W plane with a KH x KW kernel:
// out[oh][ow] = sum_{i,j} w[i][j] * padded[oh * sh + i * dh][ow * sw + j * dw], where `padded`
// is the plane placed at (ph, pw) in an HP x WP field of zeros, HP x WP being exactly the
// extent the output reads. The padding may be negative (the stride-1 backward correlation of a
// heavily padded conv): the plane is then cropped.
struct PlaneConv {
  int64_t H, W, KH, KW, OH, OW;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t HP, WP;

  PlaneConv(int64_t H_, int64_t W_, int64_t KH_, int64_t KW_, int64_t OH_, int64_t OW_,
            int64_t sh_, int64_t sw_, int64_t ph_, int64_t pw_, int64_t dh_, int64_t dw_)
      : H(H_), W(W_), KH(KH_), KW(KW_), OH(OH_), OW(OW_), sh(sh_), sw(sw_), ph(ph_), pw(pw_),
        dh(dh_), dw(dw_), HP((OH_ - 1) * sh_ + (KH_ - 1) * dh_ + 1),
        WP((OW_ - 1) * sw_ + (KW_ - 1) * dw_ + 1) {}

  // Without padding the plane itself serves as `padded` (rows past HP are simply not read).
  bool needs_padding() const { return ph != 0 || pw != 0; }
  // The input rows [row_begin, row_end) and columns [col_begin, col_end) inside the field.
  int64_t row_begin() const { return std::max<int64_t>(0, -ph); }
  int64_t row_end() const { return std::min(H, HP - ph); }
  int64_t col_begin() const { return std::max<int64_t>(0, -pw); }
  int64_t col_end() const { return std::min(W, WP - pw); }
  // The field split by column phase of the strided input gradient (input_grad_strided_plane):
  // per padded row, phases() runs (one per column % sw; a phase past WP would be empty) of
  // phase_width() = ceil(WP / sw) entries; its buffer holds (HP + 1) rows of them.
  int64_t phases() const { return std::min(sw, WP); }
  int64_t phase_width() const { return WP / sw + (WP % sw > 0); }
  int64_t phase_field_size() const { return (HP + 1) * phases() * phase_width(); }
  // The work of one plane, in multiply-adds (its larger side: input or output), for sizing
  // the parallel loops' grains.
  int64_t plane_work() const { return std::max(H * W, OH * OW) * KH * KW; }
};

// The forward problem: N x C planes, and the plane geometry.
struct Problem {
  int64_t N, C;
  PlaneConv conv;
};

// The input of the forward and the weight gradient: a 4-D CPU float tensor.
void check_input(const at::Tensor& input, const char* op) {
  check_float(input, op, "input");
  check_device(input, c10::kCPU, op, "input");
  check_depthwise_input(input, op);
}

void check_weight(const at::Tensor& weight, const char* op) {
  check_float(weight, op, "weight");
  check_device(weight, c10::kCPU, op, "weight");
  check_depthwise_weight(weight, op);
  // The kernels read the prefix W[:C] in place; copying the shared weight is what slimops avoids.
  TORCH_CHECK(weight.is_contiguous(), "slimops::", op,
              ": weight must be contiguous (its channel prefix is read in place, never copied); "
              "got strides ",
              weight.strides());
}

// Validates everything shape-related that the three ops share (arg_checks.h, as the CUDA
// bindings do) and derives the output size.
Problem make_problem(const char* op, at::IntArrayRef input_size, const at::Tensor& weight,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_weight(weight, op);
  const auto [OH, OW] = depthwise_output_size(op, input_size, weight, stride, padding, dilation);
  const int64_t C = input_size[1], H = input_size[2], W = input_size[3];
  const int64_t KH = weight.size(2), KW = weight.size(3);
  // Checked 64-bit arithmetic (checked_size.h) for the buffers too: the padded plane is what
  // the field buffers hold.
  checked_numel(std::array<int64_t, 4>{input_size[0], C, OH, OW}, op,
                "the output's element count");
  checked_mul(H + 2 * padding[0], W + 2 * padding[1], op, "the padded input plane");
  return Problem{input_size[0], C,
                 PlaneConv(H, W, KH, KW, OH, OW, stride[0], stride[1], padding[0], padding[1],
                           dilation[0], dilation[1])};
}

// make_problem for a backward op, and its grad_z checked against the forward's output for the
// input of size `input_size` (`input_name` in the message: the op's argument it came from).
Problem backward_problem(const char* op, const at::Tensor& grad_z, const char* input_name,
                         at::IntArrayRef input_size, const at::Tensor& weight,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation) {
  const Problem pr = make_problem(op, input_size, weight, stride, padding, dilation);
  check_depthwise_grad_z(grad_z, {pr.N, pr.C, pr.conv.OH, pr.conv.OW}, op, input_name,
                         input_size);
  return pr;
}

// The zero-padded plane of a correlation, addressed with row stride `ld`.
template <typename scalar_t>
struct Field {
  scalar_t* data;
  int64_t ld;
};

// A thread's padding buffer: HP x WP zeros, or nothing when the plane needs no padding.
template <typename scalar_t>
std::vector<scalar_t> field_buffer(const PlaneConv& p) {
  return std::vector<scalar_t>(p.needs_padding() ? p.HP * p.WP : 0, scalar_t(0));
}

// The padded plane of x: x itself when there is no padding, else x copied into `buffer` at
// (ph, pw). Only that region of the buffer is ever written, so its border stays zero.
template <typename scalar_t>
Field<const scalar_t> pad_plane(const PlaneConv& p, const scalar_t* x,
                                std::vector<scalar_t>& buffer) {
  if (!p.needs_padding()) return {x, p.W};
  // The field can miss whole rows or columns of the plane: past the last one a large stride
  // reads, or, with negative padding, cropped away.
  const int64_t c0 = p.col_begin(), c1 = p.col_end();
  for (int64_t ih = p.row_begin(); ih < p.row_end() && c0 < c1; ++ih) {
    const scalar_t* row = x + ih * p.W;
    std::copy(row + c0, row + c1, buffer.data() + (ih + p.ph) * p.WP + c0 + p.pw);
  }
  return {buffer.data(), p.WP};
}

// Calls f(kh, kw, sw) with std::integral_constant arguments: the kernel size and column stride
// of the common depthwise shapes, so the kernels' loops over the taps unroll and their loops
// over columns vectorise, or zeros, meaning "read them from `p` at run time".
template <typename F>
void dispatch_shape(const PlaneConv& p, const F& f) {
  using Zero = std::integral_constant<int64_t, 0>;
  using One = std::integral_constant<int64_t, 1>;
  using Two = std::integral_constant<int64_t, 2>;
  using Three = std::integral_constant<int64_t, 3>;
  using Five = std::integral_constant<int64_t, 5>;
  using Seven = std::integral_constant<int64_t, 7>;
  const auto is = [&](int64_t k, int64_t s) { return p.KH == k && p.KW == k && p.sw == s; };
  if (is(3, 1)) return f(Three(), Three(), One());
  if (is(3, 2)) return f(Three(), Three(), Two());
  if (is(5, 1)) return f(Five(), Five(), One());
  if (is(5, 2)) return f(Five(), Five(), Two());
  if (is(7, 1)) return f(Seven(), Seven(), One());
  // 1x1 (a per-channel scale): the run-time loops cost 1.16x the reference style's conv on
  // 256 channels at 32x32 (random-shape sweep, bench/matrix.py --cells sweep)
  if (is(1, 1)) return f(One(), One(), One());
  f(Zero(), Zero(), Zero());
}

// Channels per block of the small-plane kernel (forward_lanes): one AVX-512 vector of floats.
constexpr int64_t kLanes = 16;
// Planes at most this wide and high go through the small-plane (lanes) paths of the backward
// passes (measured per pass, see there).
constexpr int64_t kLanesMaxSide = 16;

// Input planes at most this wide and high go through forward_lanes, per instruction set and
// stride, from side-by-side runs of both paths (forward with epilogue, batch 1 to 64).
// AVX-512 (Zen 4, S-MobileNet v2's shapes): 14x14 and 7x7 gain 2-4x; at 28x28 interleaving
// costs more than it saves. AVX2 (Zen 3, two vectors per position): strided, the lanes still
// win up to 16x16 (1.2-1.4x); at stride 1 the per-plane path's flattened rows win from 12x12
// (1.0-1.5x on 12x12 to 16x16 planes) and lose at 10x10 and below (1.3-1.5x).
int64_t forward_lanes_max_side(const PlaneConv& p) {
  if (cpu_isa() == Isa::kAvx512 || p.sh != 1 || p.sw != 1) return kLanesMaxSide;
  return 10;
}
// The weight gradient's small-plane path sums this many output positions in scalar_t before
// adding the sum in double (an 8x8 plane's worth; see depthwise_conv2d_backward_weight).
constexpr int64_t kFloatRun = 64;

// The small-plane paths' tasks [begin, end), block by block (task = block * N + image): a
// thread sets up a block of kLanes channels once for all the images it takes. Calls
// on_block(c0, lanes) when a task starts a new block of channels [c0, c0 + lanes), then
// on_image(plane, lanes) with plane = n * C + c0, the block's first plane in image n.
template <typename B, typename I>
void for_block_tasks(int64_t begin, int64_t end, int64_t N, int64_t C, const B& on_block,
                     const I& on_image) {
  int64_t set_up = -1;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t block = task / N, n = task % N, c0 = block * kLanes;
    const int64_t lanes = std::min(kLanes, C - c0);
    if (block != set_up) {
      set_up = block;
      on_block(c0, lanes);
    }
    on_image(n * C + c0, lanes);
  }
}

// wl[k * kLanes + l] = w[l * taps + k] for a block's `lanes` channels (w: the block's first
// channel's taps), 0 in the lanes past them: the taps interleaved as the lane kernels read
// them, once per block of channels, not per image.
template <typename scalar_t>
void interleave_taps(scalar_t* __restrict__ wl, const scalar_t* __restrict__ w, int64_t lanes,
                     int64_t taps) {
  std::fill(wl, wl + taps * kLanes, scalar_t(0));
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t k = 0; k < taps; ++k) wl[k * kLanes + l] = w[l * taps + k];
}

// Elements of forward_plane's scratch: OH rows of the field's row stride (WP when padded,
// else the plane's W).
inline int64_t scratch_size(const PlaneConv& p) {
  return p.OH * (p.needs_padding() ? p.WP : p.W);
}

// The row kernels, compiled once per instruction set (isa_variants.h, depthwise_rows.inc).
#define SLIMOPS_ISA_INC "cpu/depthwise_rows.inc"
#include "cpu/isa_variants.h"

// The plane kernels of one shape (kernel size and column stride as compile-time constants,
// 0 = read at run time) for the instruction set chosen at run time.
template <int64_t KH, int64_t KW, int64_t SW, typename scalar_t>
struct PlaneKernels {
  // Each a pointer to the .inc function of that name (one type for every instruction set).
  static auto lanes() { SLIMOPS_RETURN_FOR_CPU_ISA(&isa::forward_lanes<KH, KW, SW, scalar_t>); }
  static auto forward() {
    SLIMOPS_RETURN_FOR_CPU_ISA(&isa::forward_plane<KH, KW, SW, scalar_t>);
  }
  static auto accumulate() {
    SLIMOPS_RETURN_FOR_CPU_ISA(&isa::accumulate_plane<KH, KW, SW, scalar_t>);
  }
  static auto input_grad_strided() {
    SLIMOPS_RETURN_FOR_CPU_ISA(&isa::input_grad_strided_plane<KH, KW, SW, scalar_t>);
  }
  static auto input_grad_lanes() {
    SLIMOPS_RETURN_FOR_CPU_ISA(&isa::input_grad_lanes<KH, KW, SW, scalar_t>);
  }
  static auto weight_grad_lanes() {
    SLIMOPS_RETURN_FOR_CPU_ISA(&isa::weight_grad_lanes<KH, KW, SW, scalar_t>);
  }
};

// The masked-row forward (depthwise_rows.inc, rows_plane) of one epilogue mode and column
// stride, for the instruction set chosen at run time.
template <int64_t MODE, int64_t SW>
struct RowKernel {
  static auto get() { SLIMOPS_RETURN_FOR_CPU_ISA(&isa::rows_plane<MODE, SW>); }
};

// The stride-2 input gradient on rows (depthwise_rows.inc, input_grad_s2_plane).
struct S2GradKernel {
  static auto get() { SLIMOPS_RETURN_FOR_CPU_ISA(&isa::input_grad_s2_plane); }
};

// The masked-row weight gradient (depthwise_rows.inc, rows_weight_grad) of one column stride.
template <int64_t SW>
struct RowGradKernel {
  static auto get() { SLIMOPS_RETURN_FOR_CPU_ISA(&isa::rows_weight_grad<SW>); }
};

// MODE: the activation, or -1 for the bare convolution (no epilogue).
template <int64_t SW>
auto row_kernel(int64_t mode) {
  if (mode == kRelu) return RowKernel<kRelu, SW>::get();
  if (mode == kRelu6) return RowKernel<kRelu6, SW>::get();
  if (mode == kNone) return RowKernel<kNone, SW>::get();
  return RowKernel<-1, SW>::get();
}

// Whether the masked-row forward may run: under AVX2 or AVX-512 (masked loads; the baseline
// has none). SLIMOPS_DEPTHWISE_ROWS=0 turns it off (tests compare both paths); read on every
// call, so that a benchmark can compare both paths in one process (the forward's route key
// has whether it runs: depthwise_rows_suit).
bool depthwise_rows_enabled() {
  const char* v = std::getenv("SLIMOPS_DEPTHWISE_ROWS");
  return (v == nullptr || std::strcmp(v, "0") != 0) && cpu_isa() != Isa::kBase;
}

// Whether the gradients' row kernels may run (depthwise_rows_grad_suit, input_grad_rows_suit,
// input_grad_s2_rows_suit): where the row kernels may, unless SLIMOPS_DEPTHWISE_ROWS_GRAD=0,
// which keeps the gradients alone on the other paths (read on every call, so that a benchmark
// can compare both in one process; the route keys record it).
bool depthwise_rows_grad_enabled() {
  const char* v = std::getenv("SLIMOPS_DEPTHWISE_ROWS_GRAD");
  return (v == nullptr || std::strcmp(v, "0") != 0) && depthwise_rows_enabled();
}

// Whether it runs for this float32 3x3 forward at column stride 1 or 2 (the caller checks
// those), from side-by-side runs against the other paths in random order (2-core Intel Xeon,
// the fixed route, batch 1, 8 and 64, S-MobileNet v1/v2 shapes at 224 and 32 and odd sizes).
// Under AVX-512 it took 0.45-0.90x their time from 7 output columns up (7x7: 1.0x); with fewer
// a vector's lanes are mostly idle and the lanes path (16 channels per vector) won, 1.2-1.8x.
// Under AVX2 (8 lanes): stride 2 0.56-0.89x at every size; stride 1 0.77-0.98x to 28 columns
// and 0.83-0.93x from 56, level or behind between (32: 1.06-1.25x, 40: 1.03-1.08x, 64:
// 0.98-1.03x). At exactly 32 columns and stride 1 the per-plane path's flattened rows are
// fast (20% faster than at 31 or 33) and win under AVX-512 as well (1.05-1.10x).
// (Rows past kRowsMaxColumns outputs keep the other paths: the masks, ~44 bytes per output
// column, stay small whatever the plane.)
constexpr int64_t kRowsMaxColumns = int64_t{1} << 14;

bool depthwise_rows_suit(const PlaneConv& p) {
  if (!depthwise_rows_enabled() || p.OW < 7 || p.OW > kRowsMaxColumns) return false;
  if (p.sw != 1) return true;
  if (p.OW == 32) return false;
  return cpu_isa() == Isa::kAvx512 || p.OW <= 28 || p.OW >= 56;
}

// At stride 1 the input gradient is itself a correlation: of grad_z with the flipped kernel
// and padding d * (k - 1) - p, producing exactly H x W. Its geometry (the forward problem of
// grad_z's OH x OW planes).
PlaneConv transposed(const PlaneConv& p) {
  return PlaneConv(p.OH, p.OW, p.KH, p.KW, p.H, p.W, 1, 1, p.dh * (p.KH - 1) - p.ph,
                   p.dw * (p.KW - 1) - p.pw, p.dh, p.dw);
}

// Whether the stride-1 3x3 input gradient runs on the masked-row forward (rows_plane, its
// transposed geometry, the flipped kernel), where that forward suits the geometry
// (depthwise_rows_suit) and its padding is not negative (a plane cropped by a padding past
// the kernel's reach keeps the per-plane path). Side by side against the lanes and per-plane
// paths (2-core Intel Xeon, the fixed route, batch 1 to 64, 7x7 to 112x112 planes), it took
// 0.57-0.79x their time under AVX-512 and 0.63-0.96x under AVX2; the per-plane path had copied
// every plane of grad_z into a zero-bordered field first.
bool input_grad_rows_suit(const PlaneConv& p) {
  if (p.sh != 1 || p.sw != 1 || p.KH != 3 || p.KW != 3) return false;
  const PlaneConv t = transposed(p);
  return t.ph >= 0 && t.pw >= 0 && depthwise_rows_grad_enabled() && depthwise_rows_suit(t);
}

// Floats per vector of the row kernel under the instruction set chosen at run time.
int64_t row_lanes() { SLIMOPS_RETURN_FOR_CPU_ISA(isa::kRowLanes); }

// Whether the 3x3 stride-2 input gradient (no dilation) runs on rows (depthwise_rows.inc,
// input_grad_s2_plane). Side by side against the lanes and scatter paths (2-core Intel Xeon,
// the fixed route, batch 1 to 128, 224x224 down to 4x4 inputs, in random order): from 5 output
// columns up 0.36-0.82x their time under AVX-512 and 0.39-0.76x under AVX2; at 4 columns
// 0.89-1.05x, at 2 1.37-1.48x (a vector of 8 or 16 lanes for 4 or 8 input columns).
bool input_grad_s2_rows_suit(const PlaneConv& p) {
  if (p.sh != 2 || p.sw != 2 || p.KH != 3 || p.KW != 3 || p.dh != 1 || p.dw != 1) return false;
  return p.ph >= 0 && p.pw >= 0 && p.OW >= 5 && p.OW <= kRowsMaxColumns &&
         depthwise_rows_grad_enabled();
}

// input_grad_s2_plane's masks (kS2MasksPerBlock blocks of V int32 per block of 2V input
// columns from column -(pw % 2)): a header (1 when the rest is whole), the lanes of g[k, k + V)
// and g[k - 1, k - 1 + V) inside [0, OW), the lanes of the two output vectors inside [0, W).
std::vector<int32_t> input_grad_s2_masks(const PlaneConv& p) {
  const int64_t V = row_lanes(), iw0 = -(p.pw % 2), k0 = (iw0 + p.pw) / 2;
  const int64_t blocks = (p.W - iw0 + 2 * V - 1) / (2 * V), per = 5;  // kS2MasksPerBlock
  std::vector<int32_t> masks(static_cast<size_t>(blocks * per * V), 0);
  const auto in = [](int64_t i, int64_t n) { return i >= 0 && i < n ? -1 : 0; };
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t* m = masks.data() + b * per * V;
    const int64_t k = k0 + b * V, iw = iw0 + b * 2 * V;
    bool whole = true;
    for (int64_t l = 0; l < V; ++l) {
      m[V + l] = in(k + l, p.OW);
      m[2 * V + l] = in(k - 1 + l, p.OW);
      m[3 * V + l] = in(iw + l, p.W);
      m[4 * V + l] = in(iw + V + l, p.W);
      whole = whole && m[V + l] && m[2 * V + l] && m[3 * V + l] && m[4 * V + l];
    }
    m[0] = whole ? 1 : 0;
  }
  return masks;
}

// Whether the masked-row weight gradient (rows_weight_grad) runs for this 3x3 pass at column
// stride 1 or 2 (float32: the caller checks the dtype), from side-by-side runs against the lanes and
// per-plane paths in random order (2-core Intel Xeon, the fixed route, batch 1 to 64, planes
// 2x2 to 112x112, S-MobileNet v1/v2 shapes and others). Where at least 3/4 of the last
// column vector's lanes are output columns (AVX-512: 12 to 16, 28 to 32, 56, 64, ...; AVX2:
// 7, 8, 14, 16, 24, 28, ...) it ran 0.31-0.95x their time, but at exactly 32 columns at stride
// 1 under AVX2 (1.0-1.14x: the per-plane path's flattened rows); with fewer lanes in use it
// still won under AVX-512 up to batch 32 (7 to 10 columns: 0.82-0.99x; batch 64 1.06-1.07x)
// and lost under AVX2 (9, 10 columns: 1.16-1.28x); under 7 columns it lost on both (1.2-2.2x).
bool depthwise_rows_grad_suit(const Problem& pr) {
  const PlaneConv& p = pr.conv;
  if (p.KH != 3 || p.KW != 3 || p.sw < 1 || p.sw > 2) return false;
  if (!depthwise_rows_grad_enabled() || p.OW < 7 || p.OW > kRowsMaxColumns) return false;
  const int64_t V = row_lanes(), last = p.OW % V;
  const bool lanes_used = last == 0 || 4 * last >= 3 * V;
  if (cpu_isa() == Isa::kAvx512) return lanes_used || pr.N <= 32;
  return lanes_used && !(p.sw == 1 && p.OW == 32);
}

// rows_plane's masks for plane geometry p at column stride sw (1 or 2), per column vector of
// V output columns: a header (first value 1 when all the masks below are whole, values 1 to 3
// when tap column j's loads are), the output's lanes, then for each tap column j the lanes
// whose input column lies in [0, W) (stride 2: for the load of the first V input columns, the
// next V, and the output lanes whose input column 2 * lane is in the plane), then for each tap
// column j the weight gradient's lanes (rows_weight_grad: inside the output, input column in
// the plane). -1 = in, 0 = out. (rows_masks_per_vector in depthwise_rows.inc: the same count.)
std::vector<int32_t> row_masks(const PlaneConv& p, int64_t sw) {
  const int64_t V = row_lanes(), vectors = (p.OW + V - 1) / V;
  const int64_t per_tap = sw == 1 ? 1 : 3, per = 2 + 3 * per_tap + 3;
  std::vector<int32_t> masks(static_cast<size_t>(vectors * per * V), 0);
  const auto inside = [&](int64_t col) { return col >= 0 && col < p.W ? -1 : 0; };
  for (int64_t c = 0; c < vectors; ++c) {
    int32_t* m = masks.data() + c * per * V;
    const int64_t ow0 = c * V;
    for (int64_t l = 0; l < V; ++l) m[V + l] = ow0 + l < p.OW ? -1 : 0;
    for (int64_t j = 0; j < 3; ++j) {
      const int64_t base = ow0 * sw + j * p.dw - p.pw;
      int32_t* mj = m + (2 + j * per_tap) * V;
      int32_t* gj = m + (2 + 3 * per_tap + j) * V;
      for (int64_t l = 0; l < V; ++l) {
        mj[l] = inside(base + l);
        if (sw == 2) {
          mj[V + l] = inside(base + V + l);
          mj[2 * V + l] = inside(base + 2 * l);
        }
        gj[l] = ow0 + l < p.OW ? inside(base + sw * l) : 0;
      }
    }
    bool whole = true;
    for (int64_t k = V; k < per * V; ++k) whole = whole && m[k] != 0;
    m[0] = whole ? 1 : 0;
    for (int64_t j = 0; j < 3; ++j) {  // tap column j's loads (stride 2: both) whole
      const int32_t* mj = m + (2 + j * per_tap) * V;
      bool tap_whole = true;
      for (int64_t k = 0; k < (sw == 1 ? 1 : 2) * V; ++k) tap_whole = tap_whole && mj[k] != 0;
      m[1 + j] = tap_whole ? 1 : 0;
    }
  }
  return masks;
}

// The PlaneKernels of dispatch_shape's arguments (std::integral_constant types).
template <typename scalar_t, typename KH, typename KW, typename SW>
using KernelsFor = PlaneKernels<KH::value, KW::value, SW::value, scalar_t>;

// The flat kernels (depthwise_rows.inc, flat_correlate) for the instruction set chosen at run
// time: stride 1, output the input's size, planes of at most kFlatMaxPlane positions.
constexpr int64_t kFlatMaxPlane = 16;

bool flat_applies(const PlaneConv& p) {
  return p.sh == 1 && p.sw == 1 && p.OH == p.H && p.OW == p.W && p.H * p.W <= kFlatMaxPlane;
}

// The flat kernels' masks: integers of scalar_t's size, all ones inside the plane.
template <typename scalar_t>
using FlatMask = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;

template <typename scalar_t>
struct FlatKernels {
  using M = FlatMask<scalar_t>;
  // Each a pointer to the .inc function (one type for every instruction set), as PlaneKernels.
  static auto correlate() { SLIMOPS_RETURN_FOR_CPU_ISA(&isa::flat_correlate<scalar_t, M>); }
  static auto weight_grad() { SLIMOPS_RETURN_FOR_CPU_ISA(&isa::flat_weight_grad<scalar_t, M>); }
  // The flat path's epilogue, a whole plane at a time (affine_act.inc).
  static auto affine_act() { SLIMOPS_RETURN_FOR_CPU_ISA(&isa::affine_act_plane<scalar_t>); }
};

// A block of kLanes channels for the flat kernels: each tap's offset along the run, its
// inside-the-plane mask and (set_block) its weights, expanded per position of the block's
// run (row stride ld = kLanes * P), and the input buffer the run is copied into, with
// `margin` zeros on both sides so every offset read stays inside it. Built once per thread
// and block, reused for every image.
template <typename scalar_t>
struct FlatBlock {
  int64_t P, taps, ld, margin = 0;
  std::vector<int64_t> delta;
  std::vector<FlatMask<scalar_t>> inside;
  std::vector<scalar_t> wt, buffer;

  explicit FlatBlock(const PlaneConv& p)
      : P(p.H * p.W), taps(p.KH * p.KW), ld(kLanes * P), delta(taps), inside(taps * ld),
        wt(taps * ld) {
    for (int64_t i = 0; i < p.KH; ++i)
      for (int64_t j = 0; j < p.KW; ++j) {
        const int64_t t = i * p.KW + j, di = i * p.dh - p.ph, dj = j * p.dw - p.pw;
        delta[t] = di * p.W + dj;
        margin = std::max(margin, std::abs(delta[t]));
        for (int64_t oh = 0; oh < p.H; ++oh)
          for (int64_t ow = 0; ow < p.W; ++ow) {
            const bool in = oh + di >= 0 && oh + di < p.H && ow + dj >= 0 && ow + dj < p.W;
            for (int64_t l = 0; l < kLanes; ++l)
              inside[t * ld + l * P + oh * p.W + ow] = in ? -1 : 0;
          }
      }
    buffer.assign(ld + 2 * margin, scalar_t(0));
  }

  // The taps of channels [0, lanes) of w (taps values per channel), reversed when `flip`
  // (the stride-1 input gradient correlates with the flipped kernel).
  void set_block(const scalar_t* w, int64_t lanes, bool flip) {
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t l = 0; l < lanes; ++l)
        std::fill_n(wt.data() + t * ld + l * P, P, w[l * taps + (flip ? taps - 1 - t : t)]);
  }

  // The run of `n` values at src, copied between the margins; returns where it starts.
  const scalar_t* load(const scalar_t* src, int64_t n) {
    std::copy(src, src + n, buffer.data() + margin);
    return buffer.data() + margin;
  }
};

// oneDNN (through at::convolution with groups = C, the reference style's F.conv2d) is each
// pass's other route; route.h picks per shape by measuring both, as for conv2d. The active
// weight W[:C] of the [C_full, 1, kh, kw] weight is contiguous at every width, so oneDNN gets
// a view: no weight copy on either route. Why a route and not only the kernels: on a 2-core
// AMD EPYC (Zen 3, AVX2, 1 thread, 8 x 64 channels) oneDNN ran the 7x7 forward on 10x10 to
// 56x56 planes 1.1-1.4x and the 5x5 on 28x28 and larger 1.1-1.2x faster than the kernels, the
// 3x3 weight gradient on 28x28 and larger 1.3-2.0x faster, while the kernels won everything
// at 3x3 and small planes (0.1-0.8x) and every 5x5/7x7 weight gradient (0.1-0.2x). The fixed
// rule is the kernels (deterministic: the same route every run).
enum class DepthwisePass { kForward, kInputGrad, kWeightGrad };

// Whether the pass takes a row kernel (its route key records it: the switches are read per call).
bool rows_run(DepthwisePass pass, const Problem& pr) {
  const PlaneConv& p = pr.conv;
  if (pass == DepthwisePass::kForward) return depthwise_rows_suit(p);
  if (pass == DepthwisePass::kInputGrad)
    return input_grad_rows_suit(p) || input_grad_s2_rows_suit(p);
  return pass == DepthwisePass::kWeightGrad && depthwise_rows_grad_suit(pr);
}

RouteKey route_key(const Problem& pr, DepthwisePass pass, int64_t epilogue) {
  const PlaneConv& p = pr.conv;
  return {static_cast<int64_t>(RouteOp::kDepthwiseConv2d) + static_cast<int64_t>(pass), pr.N,
          pr.C, p.H, p.W, p.KH, p.KW, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw, epilogue,
          at::get_num_threads(), static_cast<int64_t>(cpu_isa()),
          rows_run(pass, pr) ? 1 : 0, 0, 0, 0, 0, 0, 0, 0};
}

int64_t problem_macs(const Problem& pr) {
  return pr.N * pr.C * pr.conv.OH * pr.conv.OW * pr.conv.KH * pr.conv.KW;
}

bool onednn_possible(const Problem& pr, const at::Tensor& t) {
  const PlaneConv& p = pr.conv;
  return problem_macs(pr) > 0 &&
         onednn_takes(t, {p.sh, p.sw, p.dh, p.dw, p.H + 2 * p.ph, p.W + 2 * p.pw});
}

// The forward on oneDNN (float32), then the epilogue in place as one multiply-add per element:
// act(z * a[c] + t[c] + r) with a = scale, t = bias * scale + shift. A lone bias goes into the
// convolution itself (no second pass over the output).
at::Tensor depthwise_forward_onednn(const at::Tensor& x, const at::Tensor& weight,
                                    const Problem& pr, const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& scale,
                                    const c10::optional<at::Tensor>& shift,
                                    const at::Tensor& res, int64_t activation) {
  const PlaneConv& p = pr.conv;
  const at::Tensor* b = opt_ptr(bias);
  const at::Tensor* sc = opt_ptr(scale);
  const at::Tensor* sh = opt_ptr(shift);
  const bool bias_only = b && !sc && !sh && !res.defined() && activation == kNone;
  const c10::optional<at::Tensor> conv_bias =
      bias_only ? c10::optional<at::Tensor>(leading(*b, pr.C)) : c10::nullopt;
  at::Tensor out = at::convolution(x, leading(weight, pr.C), conv_bias, {p.sh, p.sw},
                                   {p.ph, p.pw}, {p.dh, p.dw}, false, {0, 0}, pr.C)
                       .contiguous();
  check_onednn_shape(out, {pr.N, pr.C, p.OH, p.OW}, "depthwise_conv2d", "output");
  if (bias_only || !(b || sc || sh || res.defined() || activation != kNone)) return out;
  // The 1-D vectors are read through their strides (parameters are never copied).
  const auto at_c = [](const at::Tensor* v, int64_t c, float none) {
    return v ? v->data_ptr<float>()[c * v->stride(0)] : none;
  };
  std::vector<float> a(pr.C), t(pr.C);
  for (int64_t c = 0; c < pr.C; ++c) {
    a[c] = at_c(sc, c, 1.0f);
    t[c] = at_c(b, c, 0.0f) * a[c] + at_c(sh, c, 0.0f);
  }
  epilogue_planes(out.data_ptr<float>(), pr.N, pr.C, p.OH * p.OW, a.data(), t.data(),
                  res.defined() ? res.data_ptr<float>() : nullptr, activation);
  return out;
}

// The input gradient on oneDNN (gz contiguous). Only the input's sizes are read.
at::Tensor depthwise_input_grad_onednn(const at::Tensor& gz, const at::Tensor& weight,
                                       const Problem& pr, at::IntArrayRef input_size) {
  const PlaneConv& p = pr.conv;
  const at::Tensor sizes_only = at::empty(input_size, gz.options());
  auto grads = at::convolution_backward(gz, sizes_only, leading(weight, pr.C),
                                        c10::nullopt, {p.sh, p.sw}, {p.ph, p.pw},
                                        {p.dh, p.dw}, false, {0, 0}, pr.C, {true, false, false});
  check_onednn_shape(std::get<0>(grads), input_size, "depthwise_conv2d_backward_input",
                     "input gradient");
  return std::get<0>(grads).contiguous();
}

// The weight gradient on oneDNN (gz, x contiguous), in the full weight's shape: rows past C
// zero, as the kernels route gives it (autograd accumulates it into the shared weight as is).
at::Tensor depthwise_weight_grad_onednn(const at::Tensor& gz, const at::Tensor& x,
                                        const at::Tensor& weight, const Problem& pr) {
  const at::Tensor active = leading(weight, pr.C);
  const PlaneConv& p = pr.conv;
  auto grads = at::convolution_backward(gz, x, active, c10::nullopt, {p.sh, p.sw},
                                        {p.ph, p.pw}, {p.dh, p.dw}, false, {0, 0}, pr.C,
                                        {false, true, false});
  const at::Tensor& gw = std::get<1>(grads);
  check_onednn_shape(gw, active.sizes(), "depthwise_conv2d_backward_weight", "weight gradient");
  const at::Tensor g = gw.contiguous();
  if (pr.C == weight.size(0)) return g;
  // W[:C]'s rows are the first C * taps values of the full shape.
  at::Tensor full = at::zeros(weight.sizes(), weight.options());
  std::copy_n(g.data_ptr<float>(), g.numel(), full.data_ptr<float>());
  return full;
}

// The forward on slimops' kernels (x contiguous; `res` the contiguous residual or undefined).
at::Tensor depthwise_forward_kernels(const at::Tensor& x, const at::Tensor& weight,
                                     const Problem& pr, const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& scale,
                                     const c10::optional<at::Tensor>& shift,
                                     const at::Tensor& res, int64_t activation) {
  const PlaneConv& p = pr.conv;
  at::Tensor out = at::empty({pr.N, pr.C, p.OH, p.OW}, x.options());
  const at::Tensor* b = opt_ptr(bias);
  const at::Tensor* sc = opt_ptr(scale);
  const at::Tensor* sh = opt_ptr(shift);
  const bool has_epilogue = b || sc || sh || res.defined() || activation != kNone;
  const int64_t in_plane = p.H * p.W, out_plane = p.OH * p.OW, taps = p.KH * p.KW;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "slimops_depthwise_conv2d", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    // The 1-D vectors are read through their strides so parameters are never copied.
    const scalar_t* bp = b ? b->data_ptr<scalar_t>() : nullptr;
    const scalar_t* scp = sc ? sc->data_ptr<scalar_t>() : nullptr;
    const scalar_t* shp = sh ? sh->data_ptr<scalar_t>() : nullptr;
    const int64_t bs = b ? b->stride(0) : 0, scs = sc ? sc->stride(0) : 0,
                  shs = sh ? sh->stride(0) : 0;
    scalar_t* outp = out.data_ptr<scalar_t>();
    // The small-plane paths' epilogue of channels [c0, c0 + lanes): act(z * a + t + r), with
    // a = scale, t = bias * scale + shift.
    const auto block_epilogue = [&](int64_t c0, int64_t lanes, scalar_t* a, scalar_t* t) {
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t c = c0 + l;
        a[l] = scp ? scp[c * scs] : scalar_t(1);
        t[l] = (bp ? bp[c * bs] : scalar_t(0)) * a[l] + (shp ? shp[c * shs] : scalar_t(0));
      }
    };
    dispatch_shape(p, [&](auto kh, auto kw, auto sw) {
      using Kernels = KernelsFor<scalar_t, decltype(kh), decltype(kw), decltype(sw)>;
      constexpr int64_t SW = decltype(sw)::value;
      if constexpr (std::is_same_v<scalar_t, float> && decltype(kh)::value == 3 &&
                    decltype(kw)::value == 3 && (SW == 1 || SW == 2)) {
        if (depthwise_rows_suit(p)) {
          // Each plane's rows in masked vectors, the epilogue in registers (depthwise_rows.inc,
          // rows_plane).
          const std::vector<int32_t> masks = row_masks(p, SW);
          const auto rows = row_kernel<SW>(has_epilogue ? activation : -1);
          watched_parallel_for(0, pr.N * pr.C, grain_for(p.plane_work()),
                               [&](int64_t begin, int64_t end) {
            for (int64_t plane = begin; plane < end; ++plane) {
              const int64_t c = plane % pr.C;
              // act((z + bias) * s + shift + r) == act(z * s + t + r), t = bias * s + shift.
              const float s = scp ? scp[c * scs] : 1.0f;
              const float t = (bp ? bp[c * bs] : 0.0f) * s + (shp ? shp[c * shs] : 0.0f);
              rows(outp + plane * out_plane, xp + plane * in_plane, wp + c * taps, p, s, t,
                   rp ? rp + plane * out_plane : nullptr, masks.data());
            }
          });
          return;
        }
      }
      if (flat_applies(p)) {
        // Stride 1, same size, small planes: runs of kLanes channels (depthwise_rows.inc,
        // flat_correlate), block by block as the lane path below.
        const auto correlate = FlatKernels<scalar_t>::correlate();
        const auto affine_act = FlatKernels<scalar_t>::affine_act();
        const int64_t blocks = (pr.C + kLanes - 1) / kLanes;
        watched_parallel_for(0, pr.N * blocks, grain_for(kLanes * p.plane_work()),
                             [&](int64_t begin, int64_t end) {
          FlatBlock<scalar_t> fb(p);
          std::vector<scalar_t> acc(fb.ld), a(kLanes), t(kLanes);
          for_block_tasks(begin, end, pr.N, pr.C, [&](int64_t c0, int64_t lanes) {
            fb.set_block(wp + c0 * taps, lanes, /*flip=*/false);
            block_epilogue(c0, lanes, a.data(), t.data());
          }, [&](int64_t plane, int64_t lanes) {
            const int64_t run = lanes * in_plane;
            scalar_t* o = outp + plane * out_plane;
            correlate(has_epilogue ? acc.data() : o, fb.load(xp + plane * in_plane, run), run,
                      fb.ld, taps, fb.delta.data(), fb.wt.data(), fb.inside.data());
            if (!has_epilogue) return;
            for (int64_t l = 0; l < lanes; ++l)
              affine_act(o + l * out_plane, acc.data() + l * out_plane,
                         rp ? rp + (plane + l) * out_plane : nullptr, out_plane, a[l], t[l],
                         activation);
          });
        });
        return;
      }
      const int64_t lanes_side = forward_lanes_max_side(p);
      if (p.H <= lanes_side && p.W <= lanes_side) {
        // Small planes: kLanes channels at a time, vectorised across the channels. Tasks
        // run block by block (task = block * N + image), so a thread sets up a block's
        // weights, epilogue vectors and field once for all the images it takes.
        const auto forward_lanes = Kernels::lanes();
        const int64_t blocks = (pr.C + kLanes - 1) / kLanes;
        watched_parallel_for(0, pr.N * blocks, grain_for(kLanes * p.plane_work()),
                             [&](int64_t begin, int64_t end) {
          std::vector<scalar_t> field(p.HP * p.WP * kLanes), wl(taps * kLanes),
              acc(out_plane * kLanes), a(kLanes), t(kLanes);
          for_block_tasks(begin, end, pr.N, pr.C, [&](int64_t c0, int64_t lanes) {
            std::fill(field.begin(), field.end(), scalar_t(0));
            interleave_taps(wl.data(), wp + c0 * taps, lanes, taps);
            block_epilogue(c0, lanes, a.data(), t.data());
          }, [&](int64_t plane, int64_t lanes) {
            forward_lanes(outp + plane * out_plane, xp + plane * in_plane, lanes, wl.data(), p,
                          has_epilogue, a.data(), t.data(),
                          rp ? rp + plane * out_plane : nullptr, activation, field.data(),
                          acc.data());
          });
        });
        return;
      }
      const auto forward_plane = Kernels::forward();
      watched_parallel_for(0, pr.N * pr.C, grain_for(p.plane_work()),
                           [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> buffer = field_buffer<scalar_t>(p);
        std::vector<scalar_t> scratch(scratch_size(p));
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t c = plane % pr.C;
          const Field<const scalar_t> in = pad_plane(p, xp + plane * in_plane, buffer);
          // act((z + bias) * s + shift + r) == act(z * s + t + r) with t = bias * s + shift.
          const scalar_t s = scp ? scp[c * scs] : scalar_t(1);
          const scalar_t t =
              (bp ? bp[c * bs] : scalar_t(0)) * s + (shp ? shp[c * shs] : scalar_t(0));
          forward_plane(outp + plane * out_plane, in.data, in.ld, wp + c * taps, p,
                        has_epilogue, s, t, rp ? rp + plane * out_plane : nullptr, activation,
                        scratch.data());
        }
      });
    });
  });
  return out;
}

at::Tensor depthwise_conv2d(const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation,
                            const c10::optional<at::Tensor>& scale,
                            const c10::optional<at::Tensor>& shift,
                            const c10::optional<at::Tensor>& residual, int64_t activation) {
  constexpr const char* op = "depthwise_conv2d";
  check_activation(activation);
  check_input(input, op);
  check_same(weight, input, op, "weight");
  const Problem pr = make_problem(op, input.sizes(), weight, stride, padding, dilation);
  const PlaneConv& p = pr.conv;
  check_depthwise_epilogue(op, input, weight, bias, scale, shift, residual,
                           {pr.N, pr.C, p.OH, p.OW});
  at::Tensor res;
  if (const at::Tensor* r = opt_ptr(residual)) res = r->contiguous();
  const at::Tensor x = input.contiguous();
  const int64_t epilogue_key = (opt_ptr(bias) ? 1 : 0) + (opt_ptr(scale) ? 2 : 0) +
                               (opt_ptr(shift) ? 4 : 0) + (res.defined() ? 8 : 0) +
                               16 * activation;
  return run_routed<at::Tensor>(
      route_key(pr, DepthwisePass::kForward, epilogue_key), onednn_possible(pr, x),
      problem_macs(pr), /*fixed_onednn=*/false,
      [&] { return depthwise_forward_onednn(x, weight, pr, bias, scale, shift, res, activation); },
      [&] {
        return depthwise_forward_kernels(x, weight, pr, bias, scale, shift, res, activation);
      });
}

at::Tensor depthwise_input_grad_kernels(const at::Tensor& gz, const at::Tensor& weight,
                                        const Problem& pr, at::IntArrayRef input_size);
at::Tensor depthwise_weight_grad_kernels(const at::Tensor& gz, const at::Tensor& x,
                                         const at::Tensor& weight, const Problem& pr);

at::Tensor depthwise_conv2d_backward_input(const at::Tensor& grad_z, const at::Tensor& weight,
                                           at::IntArrayRef input_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d_backward_input";
  check_float(grad_z, op, "grad_z");
  check_device(grad_z, c10::kCPU, op, "grad_z");
  check_same(weight, grad_z, op, "weight");
  const Problem pr =
      backward_problem(op, grad_z, "input_size", input_size, weight, stride, padding, dilation);
  const at::Tensor gz = grad_z.contiguous();
  return run_routed<at::Tensor>(
      route_key(pr, DepthwisePass::kInputGrad, 0), onednn_possible(pr, gz), problem_macs(pr),
      /*fixed_onednn=*/false,
      [&] { return depthwise_input_grad_onednn(gz, weight, pr, input_size); },
      [&] { return depthwise_input_grad_kernels(gz, weight, pr, input_size); });
}

// The stride-1 input gradient on the masked-row forward where it suits (input_grad_rows_suit):
// the correlation (transposed) read and written in place (depthwise_rows.inc, rows_plane
// without epilogue). Whether it ran (float32 only).
template <typename scalar_t>
bool input_grad_on_rows(scalar_t*, const scalar_t*, const scalar_t*, const Problem&) {
  return false;
}

template <>
bool input_grad_on_rows<float>(float* gip, const float* gp, const float* wp,
                               const Problem& pr) {
  const PlaneConv& p = pr.conv;
  const int64_t in_plane = p.H * p.W, out_plane = p.OH * p.OW, taps = p.KH * p.KW;
  if (input_grad_s2_rows_suit(p)) {
    const std::vector<int32_t> masks = input_grad_s2_masks(p);
    const auto plane_grad = S2GradKernel::get();
    watched_parallel_for(0, pr.N * pr.C, grain_for(p.plane_work()),
                         [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane)
        plane_grad(gip + plane * in_plane, gp + plane * out_plane, wp + (plane % pr.C) * taps,
                   p, masks.data());
    });
    return true;
  }
  if (!input_grad_rows_suit(p)) return false;
  const PlaneConv t = transposed(p);
  const std::vector<int32_t> masks = row_masks(t, 1);
  const auto rows = row_kernel<1>(-1);
  watched_parallel_for(0, pr.N * pr.C, grain_for(p.plane_work()),
                       [&](int64_t begin, int64_t end) {
    float flipped[9];
    for (int64_t plane = begin; plane < end; ++plane) {
      const float* wc = wp + (plane % pr.C) * taps;
      std::reverse_copy(wc, wc + taps, flipped);
      rows(gip + plane * in_plane, gp + plane * out_plane, flipped, t, 1.0f, 0.0f, nullptr,
           masks.data());
    }
  });
  return true;
}

// The input gradient on slimops' kernels (gz contiguous).
at::Tensor depthwise_input_grad_kernels(const at::Tensor& gz, const at::Tensor& weight,
                                        const Problem& pr, at::IntArrayRef input_size) {
  const PlaneConv& p = pr.conv;
  at::Tensor grad_input = at::empty(input_size, gz.options());
  const int64_t in_plane = p.H * p.W, out_plane = p.OH * p.OW, taps = p.KH * p.KW;

  AT_DISPATCH_FLOATING_TYPES(gz.scalar_type(), "slimops_depthwise_conv2d_backward_input", [&] {
    const scalar_t* gp = gz.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* gip = grad_input.data_ptr<scalar_t>();
    // Strided, or tiny planes: kLanes channels at a time, vectorised across the channels; each
    // task writes its own block of planes. Measured on S-MobileNet v2's shapes at batch 64
    // (AMD EPYC, AVX-512): 1.3-2x faster than the per-plane loops for 4x4 and smaller planes
    // and for stride 2 up to 16x16; at stride 1 on 8x8 and larger the per-plane correlation
    // (below) stays faster.
    if (flat_applies(p)) {
      // Stride 1, same size, small planes: the correlation of grad_z with the flipped kernel
      // (as the per-plane stride-1 path below), as runs of kLanes channels.
      const PlaneConv t = transposed(p);
      const auto correlate = FlatKernels<scalar_t>::correlate();
      const int64_t blocks = (pr.C + kLanes - 1) / kLanes;
      watched_parallel_for(0, pr.N * blocks, grain_for(kLanes * p.plane_work()),
                           [&](int64_t begin, int64_t end) {
        FlatBlock<scalar_t> fb(t);
        for_block_tasks(begin, end, pr.N, pr.C, [&](int64_t c0, int64_t lanes) {
          fb.set_block(wp + c0 * taps, lanes, /*flip=*/true);
        }, [&](int64_t plane, int64_t lanes) {
          const int64_t run = lanes * in_plane;
          correlate(gip + plane * in_plane, fb.load(gp + plane * out_plane, run), run, fb.ld,
                    taps, fb.delta.data(), fb.wt.data(), fb.inside.data());
        });
      });
      return;
    }
    if (input_grad_on_rows(gip, gp, wp, pr)) return;
    const bool strided = p.sh != 1 || p.sw != 1;
    if ((strided && p.OH <= kLanesMaxSide && p.OW <= kLanesMaxSide) || (p.OH <= 4 && p.OW <= 4)) {
      dispatch_shape(p, [&](auto kh, auto kw, auto sw) {
        const auto input_grad_lanes =
            KernelsFor<scalar_t, decltype(kh), decltype(kw), decltype(sw)>::input_grad_lanes();
        // Items block by block (item = block * N + image), so a range sets up a block's
        // weights once for its images, as the forward does.
        const int64_t blocks = (pr.C + kLanes - 1) / kLanes;
        run_ranges(pr.N * blocks, kLanes * p.plane_work(), [&](int64_t begin, int64_t end) {
          scalar_t* field = scratch<scalar_t>(ScratchSlot::kCols, p.HP * p.WP * kLanes);
          scalar_t* gl = scratch<scalar_t>(ScratchSlot::kGradT, out_plane * kLanes);
          scalar_t* wl = scratch<scalar_t>(ScratchSlot::kTmp, taps * kLanes);
          for_block_tasks(begin, end, pr.N, pr.C, [&](int64_t c0, int64_t lanes) {
            interleave_taps(wl, wp + c0 * taps, lanes, taps);
            std::fill(gl, gl + out_plane * kLanes, scalar_t(0));
          }, [&](int64_t plane, int64_t lanes) {
            input_grad_lanes(gip + plane * in_plane, gp + plane * out_plane, wl, lanes, p,
                             field, gl);
          });
        });
      });
      return;
    }
    if (p.sh == 1 && p.sw == 1) {
      // At stride 1 the transpose is itself a correlation (transposed).
      const PlaneConv t = transposed(p);
      dispatch_shape(t, [&](auto kh, auto kw, auto sw) {
        const auto correlate_plane =
            KernelsFor<scalar_t, decltype(kh), decltype(kw), decltype(sw)>::forward();
        watched_parallel_for(0, pr.N * pr.C, grain_for(p.plane_work()),
                             [&](int64_t begin, int64_t end) {
          std::vector<scalar_t> buffer = field_buffer<scalar_t>(t);
          std::vector<scalar_t> scratch(scratch_size(t));
          std::vector<scalar_t> flipped(taps);
          for (int64_t plane = begin; plane < end; ++plane) {
            const scalar_t* wc = wp + (plane % pr.C) * taps;
            std::reverse_copy(wc, wc + taps, flipped.begin());
            const Field<const scalar_t> in = pad_plane(t, gp + plane * out_plane, buffer);
            correlate_plane(gip + plane * in_plane, in.data, in.ld, flipped.data(), t,
                            /*epilogue=*/false, scalar_t(1), scalar_t(0), nullptr, kNone,
                            scratch.data());
          }
        });
      });
      return;
    }
    // Strided: each plane scattered back into a column-phase-split field, then cropped
    // (depthwise_rows.inc, input_grad_strided_plane); a plane belongs to one thread alone.
    dispatch_shape(p, [&](auto kh, auto kw, auto sw) {
      const auto input_grad_plane =
          KernelsFor<scalar_t, decltype(kh), decltype(kw), decltype(sw)>::input_grad_strided();
      watched_parallel_for(0, pr.N * pr.C, grain_for(p.plane_work()),
                           [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> field(p.phase_field_size());
        for (int64_t plane = begin; plane < end; ++plane)
          input_grad_plane(gip + plane * in_plane, gp + plane * out_plane,
                           wp + (plane % pr.C) * taps, p, field.data());
      });
    });
  });
  return grad_input;
}

// The small-plane weight gradients' schedule (lane and flat kernels). A task is one block of
// kLanes channels over one group of images (groups fixed by the shape alone, so the result
// does not depend on the thread count: ~32K multiply-adds each, at most 16 groups, bounding
// the slots); sum_images(acc, c0, lanes, n_begin, n_end) adds images [n_begin, n_end) of
// the block's channels [c0, c0 + lanes) into its own double slot acc[taps][kLanes]; the slots
// are then added in group order into grad_weight: deterministic.
template <typename scalar_t, typename F>
void small_plane_weight_grad(scalar_t* gwp, const Problem& pr, int64_t taps,
                             const F& sum_images) {
  const PlaneConv& p = pr.conv;
  const int64_t blocks = (pr.C + kLanes - 1) / kLanes;
  const int64_t image_work = kLanes * p.plane_work();
  const int64_t per_group =
      std::max({int64_t{1}, kParallelWork / 4 / image_work, (pr.N + 15) / 16});
  const int64_t groups = (pr.N + per_group - 1) / per_group;
  std::vector<double> sums(groups * blocks * taps * kLanes);
  run_tasks(groups * blocks, per_group * image_work, [&](int64_t task) {
    const int64_t block = task % blocks, group = task / blocks, c0 = block * kLanes;
    sum_images(sums.data() + task * taps * kLanes, c0, std::min(kLanes, pr.C - c0),
               group * per_group, std::min(pr.N, (group + 1) * per_group));
  });
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t c0 = block * kLanes, lanes = std::min(kLanes, pr.C - c0);
    for (int64_t l = 0; l < lanes; ++l)
      for (int64_t tap = 0; tap < taps; ++tap) {
        double sum = 0.0;
        for (int64_t group = 0; group < groups; ++group)
          sum += sums[((group * blocks + block) * taps + tap) * kLanes + l];
        gwp[(c0 + l) * taps + tap] = static_cast<scalar_t>(sum);
      }
  }
}

at::Tensor depthwise_conv2d_backward_weight(const at::Tensor& grad_z, const at::Tensor& input,
                                            const at::Tensor& weight, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d_backward_weight";
  check_input(input, op);
  check_same(grad_z, input, op, "grad_z");
  check_same(weight, input, op, "weight");
  const Problem pr =
      backward_problem(op, grad_z, "input", input.sizes(), weight, stride, padding, dilation);
  const at::Tensor x = input.contiguous();
  const at::Tensor gz = grad_z.contiguous();
  return run_routed<at::Tensor>(
      route_key(pr, DepthwisePass::kWeightGrad, 0), onednn_possible(pr, x), problem_macs(pr),
      /*fixed_onednn=*/false, [&] { return depthwise_weight_grad_onednn(gz, x, weight, pr); },
      [&] { return depthwise_weight_grad_kernels(gz, x, weight, pr); });
}

// The weight gradient on slimops' kernels (gz and x contiguous), full weight shape.
at::Tensor depthwise_weight_grad_kernels(const at::Tensor& gz, const at::Tensor& x,
                                         const at::Tensor& weight, const Problem& pr) {
  const PlaneConv& p = pr.conv;
  // Full weight shape: rows past C stay zero so autograd accumulates it as is.
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  const int64_t in_plane = p.H * p.W, out_plane = p.OH * p.OW, taps = p.KH * p.KW;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "slimops_depthwise_conv2d_backward_weight", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gz.data_ptr<scalar_t>();
    scalar_t* gwp = grad_weight.data_ptr<scalar_t>();
    dispatch_shape(p, [&](auto kh, auto kw, auto sw) {
      using Kernels = KernelsFor<scalar_t, decltype(kh), decltype(kw), decltype(sw)>;
      constexpr int64_t SW = decltype(sw)::value;
      if constexpr (std::is_same_v<scalar_t, float> && decltype(kh)::value == 3 &&
                    decltype(kw)::value == 3 && (SW == 1 || SW == 2)) {
        if (depthwise_rows_grad_suit(pr)) {
          // Each channel's planes in masked row vectors, read in place (depthwise_rows.inc,
          // rows_weight_grad); one writer per channel, its images summed in order.
          const std::vector<int32_t> masks = row_masks(p, SW);
          const auto rows = RowGradKernel<SW>::get();
          watched_parallel_for(0, pr.C, grain_for(pr.N * p.plane_work()),
                               [&](int64_t begin, int64_t end) {
            for (int64_t c = begin; c < end; ++c) {
              double sums[9] = {};
              rows(sums, gp + c * out_plane, xp + c * in_plane, pr.N, pr.C * out_plane,
                   pr.C * in_plane, p, masks.data());
              for (int64_t tap = 0; tap < 9; ++tap)
                gwp[c * taps + tap] = static_cast<scalar_t>(sums[tap]);
            }
          });
          return;
        }
      }
      // Small planes (schedule: small_plane_weight_grad). Within a task the images are summed
      // in scalar_t in runs of at most kFloatRun output positions (one image when its plane is
      // larger), each run then added in double: the rounding of an 8x8 plane's sum, whatever
      // the plane.
      const int64_t per_run = std::max<int64_t>(1, kFloatRun / out_plane);
      if (flat_applies(p)) {
        // Stride 1, same size, planes up to 16 positions: runs of kLanes channels
        // (flat_weight_grad), per-position partials, each channel's positions added in double.
        const auto weight_grad = FlatKernels<scalar_t>::weight_grad();
        small_plane_weight_grad(gwp, pr, taps, [&](double* acc, int64_t c0, int64_t lanes,
                                                   int64_t n_begin, int64_t n_end) {
          const int64_t run = lanes * in_plane;
          FlatBlock<scalar_t> fb(p);
          std::vector<scalar_t> partial(taps * fb.ld);
          for (int64_t n0 = n_begin; n0 < n_end; n0 += per_run) {
            std::fill(partial.begin(), partial.end(), scalar_t(0));
            for (int64_t n = n0; n < std::min(n_end, n0 + per_run); ++n) {
              const int64_t plane = n * pr.C + c0;
              weight_grad(partial.data(), gp + plane * out_plane,
                          fb.load(xp + plane * in_plane, run), run, fb.ld, taps,
                          fb.delta.data(), fb.inside.data());
            }
            for (int64_t tap = 0; tap < taps; ++tap)
              for (int64_t l = 0; l < lanes; ++l) {
                const scalar_t* part = partial.data() + tap * fb.ld + l * in_plane;
                double sum = 0.0;
                for (int64_t q = 0; q < in_plane; ++q) sum += static_cast<double>(part[q]);
                acc[tap * kLanes + l] += sum;
              }
          }
        });
        return;
      }
      if (p.OH <= kLanesMaxSide && p.OW <= kLanesMaxSide) {
        // kLanes channels at a time, vectorised across the channels (weight_grad_lanes).
        const auto weight_grad_lanes = Kernels::weight_grad_lanes();
        small_plane_weight_grad(gwp, pr, taps, [&](double* acc, int64_t c0, int64_t lanes,
                                                   int64_t n_begin, int64_t n_end) {
          scalar_t* field = scratch<scalar_t>(ScratchSlot::kCols, p.HP * p.WP * kLanes);
          scalar_t* gl = scratch<scalar_t>(ScratchSlot::kGradT, out_plane * kLanes);
          scalar_t* partial = scratch<scalar_t>(ScratchSlot::kTmp, taps * kLanes);
          std::fill(field, field + p.HP * p.WP * kLanes, scalar_t(0));
          std::fill(gl, gl + out_plane * kLanes, scalar_t(0));
          for (int64_t n0 = n_begin; n0 < n_end; n0 += per_run) {
            std::fill(partial, partial + taps * kLanes, scalar_t(0));
            for (int64_t n = n0; n < std::min(n_end, n0 + per_run); ++n) {
              const int64_t plane = n * pr.C + c0;
              weight_grad_lanes(partial, gp + plane * out_plane, xp + plane * in_plane, lanes,
                                p, field, gl);
            }
            for (int64_t k = 0; k < taps * kLanes; ++k) acc[k] += static_cast<double>(partial[k]);
          }
        });
        return;
      }
      const auto accumulate_plane = Kernels::accumulate();
      // One channel per task: each grad_weight row has a single writer.
      watched_parallel_for(0, pr.C, grain_for(pr.N * p.plane_work()),
                           [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> buffer = field_buffer<scalar_t>(p);
        // Per-tap, per-column partial sums over the rows of a plane, reduced in double once per
        // plane so float32 sums over large batches stay accurate.
        std::vector<scalar_t> partial(taps * p.OW);
        std::vector<double> acc(taps);
        for (int64_t c = begin; c < end; ++c) {
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t n = 0; n < pr.N; ++n) {
            const int64_t plane = n * pr.C + c;
            const Field<const scalar_t> in = pad_plane(p, xp + plane * in_plane, buffer);
            std::fill(partial.begin(), partial.end(), scalar_t(0));
            accumulate_plane(partial.data(), gp + plane * out_plane, in.data, in.ld, p);
            for (int64_t tap = 0; tap < taps; ++tap) {
              const scalar_t* part = partial.data() + tap * p.OW;
              double sum = 0.0;
              for (int64_t k = 0; k < p.OW; ++k) sum += part[k];
              acc[tap] += sum;
            }
          }
          for (int64_t tap = 0; tap < taps; ++tap)
            gwp[c * taps + tap] = static_cast<scalar_t>(acc[tap]);
        }
      });
    });
  });
  return grad_weight;
}

}  // namespace

SLIMOPS_CPU_IMPL_WITH_BACKWARDS(depthwise_conv2d)

}  // namespace cpu
}  // namespace slimops
