// Direct float32 convolution for the dense conv2d family (see conv2d_direct.h for why).
//
// Each pass first copies the input rows it needs into a zero-padded "field" (an activation
// copy of about one input band, never the weight): per channel, rows of the padded input, each
// split into its sw column phases, so that output column ox of tap (i, j) reads field column
// ox + j*dw/sw of phase (j*dw) % sw -- unit-stride vector loads for every stride and dilation,
// and no bounds tests in the tiles. The field holds exactly the padded input the convolution
// reads (zeros elsewhere, including the columns a strided conv skips at the right edge), so a
// vector lane past the last output column reads a zero or a value whose result is dropped.
#include "cpu/conv2d_direct.h"

#include "cpu/isa.h"
#include "cpu/parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace slimops {
namespace cpu {

// The tiles per vector instruction set (isa_variants.h); none for the baseline, where
// tiles_for_cpu() gives nullptr and the callers take another route.
#define SLIMOPS_ISA_INC "cpu/conv2d_direct_tiles.inc"
#define SLIMOPS_ISA_NO_BASE
#include "cpu/isa_variants.h"

namespace {

// The tiles of the instruction set the kernels run with.
struct Tiles {
  int64_t vec;  // floats per vector
  int positions;  // forward tile: rows x vectors per row
  int ocb;        // forward tile: output channels
  int ob, tb;     // weight-gradient tile: output channels x taps
  isa_avx2::ForwardTile (*forward_for)(int xv);
  isa_avx2::ForwardTile3 (*forward3_for)(int xv, int64_t sw, bool flip);
  void (*weight_run)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                     const int64_t*, int64_t, int64_t, int64_t, int64_t, float*);
  std::vector<int> xv_choices;  // vectors per tile row, preferred first
};

const Tiles* tiles_for_cpu() {
  static const Tiles avx512{isa_avx512::kVec,
                            isa_avx512::kForwardPositions,
                            isa_avx512::kForwardOCB,
                            isa_avx512::kWeightOB,
                            isa_avx512::kWeightTB,
                            &isa_avx512::forward_tile_for,
                            &isa_avx512::forward_tile3_for,
                            &isa_avx512::weight_tile_run,
                            {4, 2, 1}};
  static const Tiles avx2{isa_avx2::kVec,
                          isa_avx2::kForwardPositions,
                          isa_avx2::kForwardOCB,
                          isa_avx2::kWeightOB,
                          isa_avx2::kWeightTB,
                          &isa_avx2::forward_tile_for,
                          &isa_avx2::forward_tile3_for,
                          &isa_avx2::weight_tile_run,
                          {3, 1}};
  switch (cpu_isa()) {
    case Isa::kAvx512: return &avx512;
    case Isa::kAvx2: return &avx2;
    default: return nullptr;
  }
}

// Rounds toward +infinity for any sign of a (b > 0), and never forms a + b - 1, which wraps
// for b near 2^63.
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b > 0); }

// A field channel's stride (floats) rounded up to an odd number of 64-byte lines. A tile reads
// the same rows of every channel in turn; with a stride near a multiple of 4 KiB (a 28x28
// band is 30 rows of 34 floats: 4,080 bytes) those rows all fall in the same few sets of the
// L1 cache and evict each other. An odd line count spreads them over every set.
int64_t channel_stride(int64_t floats) {
  int64_t lines = ceil_div(floats, 16);
  if (lines % 2 == 0) ++lines;
  return lines * 16;
}

// The padded extent the output reads (rows HP, columns WP) and the field's layout: per channel
// `rows` padded rows of sw phases of `wb` columns each.
struct Field {
  int64_t HP, WP;  // padded extent read by the convolution
  int64_t wb;      // field columns per phase row (covers the widest vector overrun)
  int64_t rows;    // padded rows held per channel
};

// Fills the field of `C` channel planes (plane stride H*W at x) for padded rows
// [r0, r0 + f.rows): dst[c * f_c + (r * sw + q) * wb + j] = padded(r0 + r, j*sw + q).
void fill_field(const DirectConv& d, const Field& f, const float* x, int64_t r0, int64_t f_c,
                float* dst) {
  const int64_t HW = d.H * d.W, sw = d.sw, wb = f.wb;
  const int64_t col_end = std::min(f.WP, d.pw + d.W);  // padded columns holding input
  for (int64_t c = 0; c < d.C; ++c) {
    const float* plane = x + c * HW;
    for (int64_t r = 0; r < f.rows; ++r) {
      const int64_t pr = r0 + r, ih = pr - d.ph;
      const bool row_ok = pr < f.HP && ih >= 0 && ih < d.H;
      for (int64_t q = 0; q < sw; ++q) {
        float* out = dst + c * f_c + (r * sw + q) * wb;
        if (!row_ok) {
          std::fill(out, out + wb, 0.f);
          continue;
        }
        // Field column j holds padded column u = j*sw + q: input column u - pw when
        // pw <= u < col_end.
        const int64_t lo = std::min(wb, std::max<int64_t>(0, ceil_div(d.pw - q, sw)));
        const int64_t hi = std::max(lo, std::min(wb, ceil_div(col_end - q, sw)));
        const float* src = plane + ih * d.W + q - d.pw;
        std::fill(out, out + lo, 0.f);
        if (sw == 1) {
          std::copy(src + lo, src + hi, out + lo);
        } else if (sw == 2) {
          // A compile-time stride, which GCC vectorises as shuffles: element by element this
          // fill was a third of the strided stem's time (3 -> 32 channels, 224 -> 112).
          for (int64_t j = lo; j < hi; ++j) out[j] = src[2 * j];
        } else {
          for (int64_t j = lo; j < hi; ++j) out[j] = src[j * sw];
        }
        std::fill(out + hi, out + wb, 0.f);
      }
    }
  }
}

// Per tap (i, j), row-major: its offset in a channel of the field, for output (0, 0).
std::vector<int64_t> field_taps(const DirectConv& d, const Field& f) {
  std::vector<int64_t> taps;
  for (int64_t i = 0; i < d.kh; ++i)
    for (int64_t j = 0; j < d.kw; ++j)
      taps.push_back(i * d.dh * d.sw * f.wb + ((j * d.dw) % d.sw) * f.wb + (j * d.dw) / d.sw);
  return taps;
}

// The field budget of one forward task (floats): about a quarter of a 1 MiB L2, so the band a
// tile sweeps over stays in cache while every output channel of the task reuses it.
constexpr int64_t kForwardFieldBudget = int64_t{1} << 16;
// Input channels per block of the forward's reduction (see direct_conv_forward).
constexpr int64_t kChannelBlock = 16;
// Output tiles per forward task (32 channels for AVX-512's 4-channel tiles).
constexpr int64_t kForwardTiles = 8;
// The weight gradient's field per chunk of images (floats, 4 MiB), as conv2d.cpp's chunks.
constexpr int64_t kWeightFieldBudget = int64_t{1} << 20;

}  // namespace

bool direct_conv_suits(const DirectConv& d) {
  const Tiles* t = tiles_for_cpu();
  if (t == nullptr || d.kh * d.kw == 1) return false;
  // A 7x7 plane: too few columns per row for the tiles, whatever the vector (measured 1.5-4x
  // behind the GEMM path under AVX2).
  if (d.Wo < 12) return false;
  // Lanes past the last column are computed and dropped: below 3/4 of a vector's lanes doing
  // work (a 7x7 plane under AVX-512) the im2col GEMM path, which batches small images into one
  // product, keeps those shapes.
  const int64_t nv = ceil_div(d.Wo, t->vec);
  return d.Wo * 4 >= nv * t->vec * 3;
}

void direct_conv_forward(const DirectConv& d, const DirectEpilogue* epilogue) {
  const Tiles* t = tiles_for_cpu();
  TORCH_CHECK(t != nullptr, "slimops: direct convolution needs AVX2 or AVX-512");
  if (d.N == 0 || d.O == 0 || d.Ho == 0 || d.Wo == 0) return;
  const int64_t V = t->vec, P = d.Ho * d.Wo, taps = d.kh * d.kw;

  // Tile shape: vectors per row xv (rows R = positions / xv) with the least padded work.
  const int64_t nv = ceil_div(d.Wo, V);
  int xv = t->xv_choices.front();
  int64_t best = -1;
  for (int c : t->xv_choices) {
    const int64_t R = t->positions / c;
    const int64_t cost = ceil_div(nv, c) * c * ceil_div(d.Ho, R) * R;
    if (best < 0 || cost < best) {
      best = cost;
      xv = c;
    }
  }
  const int64_t R = t->positions / xv, tile_cols = xv * V;
  const int64_t x_groups = ceil_div(d.Wo, tile_cols);

  Field f;
  f.HP = (d.Ho - 1) * d.sh + (d.kh - 1) * d.dh + 1;
  f.WP = (d.Wo - 1) * d.sw + (d.kw - 1) * d.dw + 1;
  f.wb = x_groups * tile_cols + (d.kw - 1) * d.dw / d.sw;
  const int64_t padded_row = d.sw * f.wb;
  const auto rows_in = [&](int64_t out_rows) { return (out_rows - 1) * d.sh + (d.kh - 1) * d.dh + 1; };

  // Bands of output rows (a multiple of R) whose field fits the budget; more, smaller bands
  // when there would be too few tasks for the threads to share.
  const int64_t Ho_r = ceil_div(d.Ho, R) * R;
  int64_t band = Ho_r;
  while (band > R && d.C * rows_in(band) * padded_row > kForwardFieldBudget) band -= R;
  const int64_t task_channels = kForwardTiles * t->ocb;
  const int64_t oc_chunks = ceil_div(d.O, task_channels);
  const int64_t threads = at::get_num_threads();
  while (band > R && d.N * oc_chunks * ceil_div(d.Ho, band) < 4 * threads) band -= R;
  const int64_t bands = ceil_div(d.Ho, band);
  f.rows = rows_in(band);
  const std::vector<int64_t> tap_f = field_taps(d, f);
  std::vector<int64_t> tap_w;
  for (int64_t i = 0; i < d.kh; ++i)
    for (int64_t j = 0; j < d.kw; ++j) tap_w.push_back(i * d.w_i + j * d.w_j);
  const isa_avx2::ForwardTile tile = t->forward_for(xv);
  // The 3x3 specialisation: column dilation 1, column stride 1 or 2, the weight's taps read
  // row-major forward (i*3 + j) or flipped (-(i*3 + j)).
  const bool flip = d.w_i == -3 && d.w_j == -1;
  const isa_avx2::ForwardTile3 tile3 =
      d.kh == 3 && d.kw == 3 && d.dw == 1 && ((d.w_i == 3 && d.w_j == 1) || flip)
          ? t->forward3_for(xv, d.sw, flip)
          : nullptr;
  const int64_t f_c = channel_stride(f.rows * padded_row), f_r = d.sh * padded_row;
  const int64_t tasks = d.N * bands * oc_chunks;
  const int64_t work = std::min(task_channels, d.O) * d.C * taps * band * d.Wo;

  run_tasks(tasks, work, [&](int64_t task) {
    const int64_t n = task / (bands * oc_chunks);
    const int64_t b = task / oc_chunks % bands, chunk = task % oc_chunks;
    const int64_t y0 = b * band, y1 = std::min(d.Ho, y0 + band);
    const int64_t o0 = chunk * task_channels, o1 = std::min(d.O, o0 + task_channels);
    float* field = scratch<float>(ScratchSlot::kField, d.C * f_c);
    fill_field(d, f, d.x + n * d.x_n, y0 * d.sh, f_c, field);
    float* yn = d.y + n * d.y_n;
    // Every output channel of the task at one field window before the next window, and the
    // input channels in blocks: the window (a block of channels x the tile's rows and
    // columns, ~20 KiB) is read from L2 once, then from L1 by every output tile. Blocks after
    // the first add to the partial sums in y.
    for (int64_t c0 = 0; c0 < d.C; c0 += kChannelBlock) {
      const int64_t cb = std::min(kChannelBlock, d.C - c0);
      const float* fb = field + c0 * f_c;
      for (int64_t ly = 0; ly < y1 - y0; ly += R) {
        const int64_t rows = std::min(R, y1 - y0 - ly);
        for (int64_t g = 0; g < x_groups; ++g) {
          const int64_t ox = g * tile_cols;
          for (int64_t o = o0; o < o1; o += t->ocb) {
            const int64_t ocs = std::min<int64_t>(t->ocb, o1 - o);
            float* yt = yn + o * P + (y0 + ly) * d.Wo + ox;
            const int64_t cols = std::min(tile_cols, d.Wo - ox);
            const float* wt = d.w + o * d.w_o + c0 * d.w_c;
            if (tile3 != nullptr) {
              tile3(fb + ly * f_r + ox, f_c, f_r, d.dh * padded_row, f.wb, wt, d.w_o, d.w_c, cb,
                    ocs, yt, d.Wo, P, rows, cols, c0 > 0);
            } else {
              tile(fb + ly * f_r + ox, f_c, f_r, tap_f.data(), tap_w.data(), taps, wt, d.w_o,
                   d.w_c, cb, ocs, yt, d.Wo, P, rows, cols, c0 > 0);
            }
          }
        }
      }
    }
    if (epilogue != nullptr) {
      const int64_t off = o0 * P + y0 * d.Wo;
      epilogue->fn(yn + off, P, o1 - o0, (y1 - y0) * d.Wo, epilogue->scale + o0,
                   epilogue->shift + o0,
                   epilogue->residual ? epilogue->residual + n * epilogue->residual_n + off
                                      : nullptr,
                   epilogue->activation);
    }
  });
}

void direct_conv_weight_grad(const DirectConv& d, const float* gz, int64_t gz_n, float* gw) {
  const Tiles* t = tiles_for_cpu();
  TORCH_CHECK(t != nullptr, "slimops: direct convolution needs AVX2 or AVX-512");
  if (d.N == 0 || d.O == 0 || d.C == 0 || d.Ho == 0 || d.Wo == 0) return;
  const int64_t V = t->vec, P = d.Ho * d.Wo, taps = d.kh * d.kw;
  Field f;
  f.HP = (d.Ho - 1) * d.sh + (d.kh - 1) * d.dh + 1;
  f.WP = (d.Wo - 1) * d.sw + (d.kw - 1) * d.dw + 1;
  f.wb = ceil_div(d.Wo, V) * V + (d.kw - 1) * d.dw / d.sw;
  const int64_t padded_row = d.sw * f.wb;
  const auto rows_in = [&](int64_t out_rows) { return (out_rows - 1) * d.sh + (d.kh - 1) * d.dh + 1; };

  // Chunks: several whole images when one image's field fits the budget, else one image in
  // bands of output rows. Fixed by the shapes, processed in order: deterministic.
  const int64_t per_image = d.C * rows_in(d.Ho) * padded_row;
  int64_t images = 1, band = d.Ho;
  if (per_image <= kWeightFieldBudget) {
    images = std::max<int64_t>(1, std::min(d.N, kWeightFieldBudget / per_image));
  } else {
    while (band > 1 && d.C * rows_in(band) * padded_row > kWeightFieldBudget) band = (band + 1) / 2;
  }
  const int64_t bands = ceil_div(d.Ho, band);
  f.rows = rows_in(band);
  const std::vector<int64_t> tap_f = field_taps(d, f);
  const int64_t f_c = channel_stride(f.rows * padded_row), f_n = d.C * f_c;
  const int64_t f_r = d.sh * padded_row;
  const int64_t o_blocks = ceil_div(d.O, t->ob), t_blocks = ceil_div(taps, t->tb);
  float* field = scratch<float>(ScratchSlot::kField, images * f_n);

  for (int64_t n0 = 0; n0 < d.N; n0 += images) {
    const int64_t k = std::min(images, d.N - n0);
    for (int64_t b = 0; b < bands; ++b) {
      const int64_t y0 = b * band, rows = std::min(band, d.Ho - y0);
      run_ranges(k, d.C * f_c, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j)
          fill_field(d, f, d.x + (n0 + j) * d.x_n, y0 * d.sh, f_c, field + j * f_n);
      });
      const float* gz0 = gz + n0 * gz_n + y0 * d.Wo;
      run_tasks(o_blocks * d.C * t_blocks, k * rows * d.Wo * t->ob * t->tb, [&](int64_t task) {
        const int64_t ob = task / (d.C * t_blocks), c = task / t_blocks % d.C;
        const int64_t tb = task % t_blocks;
        const int64_t o = ob * t->ob, obs = std::min<int64_t>(t->ob, d.O - o);
        const int64_t t0 = tb * t->tb, tbs = std::min<int64_t>(t->tb, taps - t0);
        float sums[64];
        t->weight_run(gz0 + o * P, P, gz_n, obs, field + c * f_c, f_n, f_r, tap_f.data() + t0,
                      tbs, k, rows, d.Wo, sums);
        for (int64_t oo = 0; oo < obs; ++oo)
          for (int64_t tt = 0; tt < tbs; ++tt) {
            const int64_t tap = t0 + tt, i = tap / d.kw, j = tap % d.kw;
            gw[(o + oo) * d.w_o + c * d.w_c + i * d.w_i + j * d.w_j] += sums[oo * t->tb + tt];
          }
      });
    }
  }
}

}  // namespace cpu
}  // namespace slimops
