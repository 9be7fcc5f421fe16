// Winograd F(4x4, 3x3) float32 convolution (see conv2d_winograd.h for why and when).
//
// The forward (and so the input gradient) is one parallel region after the filters'
// transform: its tasks are blocks of output tiles (all images' tiles, numbered row by row),
// each on one thread with its own scratch: transform the block's input tiles into
// V[k][tile][c] (k the 36 Winograd-domain points; a vector of channels per transform), 36
// GEMMs M_k[tiles, O] = V_k[tiles, C] U_k[C, O] on that thread, then the output tiles, and the
// epilogue on the block's output rows while they are in cache. Why one region: on a shared
// machine every region's closing barrier can wait a scheduler slice for a descheduled
// thread (parallel.h); with a transform, GEMM and output region per chunk, a 64-channel
// 56x56 conv at batch 1 ran 2.3x the reference's time with one core busy.
// The weight gradient accumulates dU_k[C, O] += V_k^T dM_k over chunks of tiles in order
// (deterministic), each chunk's two transforms in one region and its 36 GEMMs in another.
// The filters are transformed once per call, from the weight prefix in place; only
// activations and the transformed operands live in scratch buffers.
#include "cpu/conv2d_winograd.h"

#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace slimops {
namespace cpu {

// The per-instruction-set transforms (conv2d_winograd_tiles.inc; lanes = floats per vector).
struct WinogradTiles {
  int64_t lanes;
  bool (*weight)(const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t, float);
  void (*weight_grad)(const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t);
  bool (*input_tile)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                     float*, int64_t, float);
  void (*output_tile)(const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t,
                      int64_t);
  bool (*grad_tile)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int64_t,
                    float);
};

#define SLIMOPS_ISA_INC "cpu/conv2d_winograd_tiles.inc"
#include "cpu/isa_variants.h"

namespace {

const WinogradTiles& tiles_for_cpu() {
  static const WinogradTiles tiles = []() -> WinogradTiles {
    SLIMOPS_RETURN_FOR_CPU_ISA(isa::winograd_tiles());
  }();
  return tiles;
}

// Values beyond this magnitude (and NaN, Inf) send the call to the caller's other kernels:
// with inputs and filters under 2^40, no transformed value, product or sum comes near float's
// range (2^128), so the result stays finite wherever the direct sum is.
constexpr float kLimit = 1099511627776.0f;  // 2^40

// The weight gradient's chunks hold at most kChunkFloats (32 MB) of transformed operands (V
// and dM: 36 values per tile and channel), which bounds the scratch whatever the batch and
// plane; it accumulates dU over the chunks (read and written once per chunk), so they are
// large. The forward's blocks aim at kBlockFloats (4 MB per thread, V and M in cache between
// the steps) with kMinBlockTiles to kMaxBlockTiles tiles (skinnier GEMMs lose, measured:
// 256 channels on 14x14 ran 0.88x oneDNN's time with 56-tile GEMMs, 0.74x with 128), and
// at least two per thread when there are tiles enough.
constexpr int64_t kChunkFloats = int64_t{1} << 23;
constexpr int64_t kBlockFloats = int64_t{1} << 20;
constexpr int64_t kMinBlockTiles = 32;
constexpr int64_t kMaxBlockTiles = 256;

// Below these sizes the transforms cost more than the GEMMs save; the route would pick oneDNN,
// this spares it the measurement. A tile's GEMM work grows as C * O, its transforms' as C + O.
// With the first (row) transforms, training steps at batch 8 (2-core AMD EPYC Zen 3, AVX2,
// against oneDNN) ran 0.66-0.88x at C = O = 64 to 256 on 56x56 to 14x14 planes, 0.97x at 48
// channels (56x56), 1.2-2.3x at 16-32 channels. With the channel-lane transforms (2-core
// Intel Xeon, against F.conv2d on the full weight) the forward ran 0.69-0.75x at 32 and 48
// channels on 56x56 at batch 1 (S-ResNet-50's first stage at 0.5x and 0.75x) and 0.69-0.71x at
// 48 on 28x28 at batch 8, while training steps there ranged 0.8-1.8x by ISA: the route keeps
// what wins from C = O = 32, where the GEMMs still fill a vector. With fewer than 48 tiles the
// filters' transform, 36 x C x O values written and read per call, outweighs the products:
// batch 8 on 7x7 (32 tiles) 1.05-1.4x, batch 1 on 14x14 (16) 1.3-1.4x at 192-512 channels,
// where batch 1 on 28x28 (49 tiles, 96-128 channels) ran 0.66-0.9x (a later split of the
// output channels across tasks, each transforming the input again, lost at all of these).
constexpr int64_t kMinHarmonic = 16;  // C * O / (C + O)
constexpr int64_t kMinTiles = 48;
// The transformed filters (36 x C x O floats) stay under 256 MB.
constexpr int64_t kMaxFilterProducts = int64_t{1} << 21;

// The output tiles of a problem, numbered image by image, row by row: tile t is tile
// (t % tw) of tile row t / tw, which is row ty = (t / tw) % th of image (t / tw) / th; its
// outputs start at (4ty, 4tx), its input at (4ty - ph, 4tx - pw).
struct TileGrid {
  int64_t th, tw, total;
  explicit TileGrid(const DirectConv& d)  // members initialise in order: total reads th, tw
      : th((d.Ho + 3) / 4), tw((d.Wo + 3) / 4), total(d.N * th * tw) {}
};

// Tile t's image and its top-left output (oy, ox); its input starts at (oy - ph, ox - pw).
struct TilePos {
  int64_t n, oy, ox;
};

TilePos tile_pos(const TileGrid& grid, int64_t t) {
  const int64_t row = t / grid.tw;
  return {row / grid.th, 4 * (row % grid.th), 4 * (t % grid.tw)};
}

// The part of tile row `row` inside the chunk [t0, t0 + nt): tiles [tx0, tx0 + ntx).
struct RowRun {
  int64_t n, ty, tx0, ntx;
};

// The tile rows a chunk touches, [first, first + count).
struct ChunkRows {
  int64_t first, count;
};

ChunkRows chunk_rows(const TileGrid& grid, int64_t t0, int64_t nt) {
  const int64_t first = t0 / grid.tw;
  return {first, (t0 + nt - 1) / grid.tw - first + 1};
}

RowRun row_run(const TileGrid& grid, int64_t row, int64_t t0, int64_t nt) {
  const int64_t begin = std::max(t0, row * grid.tw);
  const int64_t end = std::min(t0 + nt, (row + 1) * grid.tw);
  return {row / grid.th, row % grid.th, begin - row * grid.tw, end - begin};
}

// Tiles per weight-gradient chunk for `channels` (C + O) per tile (at least one).
int64_t chunk_tiles(int64_t total, int64_t channels) {
  return std::max<int64_t>(1, std::min(total, kChunkFloats / (36 * channels)));
}

// Tiles per forward block (see kBlockFloats).
int64_t block_tiles(int64_t total, int64_t channels, int64_t threads) {
  const int64_t aim = std::clamp(kBlockFloats / (36 * channels), kMinBlockTiles, kMaxBlockTiles);
  const int64_t blocks = std::max((total + aim - 1) / aim,
                                  std::min(2 * threads, (total + kMinBlockTiles - 1) /
                                                            kMinBlockTiles));
  return (total + blocks - 1) / blocks;
}

// How the filters' transforms run: lanes along the index (o or c) whose weight stride is the
// smaller, so that a vector's filters lie close together (the forward's input channels, 9
// floats apart; the input gradient's output channels); the transformed filters U[k] are laid
// out with that index unit-stride: [c][o] (lanes over o) or [o][c] (lanes over c).
struct FilterLayout {
  bool lanes_over_o;
  int64_t lane_stride, other_stride, lanes_n, others_n;
  explicit FilterLayout(const DirectConv& d)
      : lanes_over_o(std::abs(d.w_o) <= std::abs(d.w_c)),
        lane_stride(lanes_over_o ? d.w_o : d.w_c),
        other_stride(lanes_over_o ? d.w_c : d.w_o),
        lanes_n(lanes_over_o ? d.O : d.C),
        others_n(lanes_over_o ? d.C : d.O) {}
};

// fn(filter_offset, u_offset, n) for every vector of n <= lanes filters, in parallel: the
// filters' offset in the weight's strides and the vector's offset in a U[k] laid out as
// FilterLayout says. Returns whether any fn returned true (a value out of range).
template <typename F>
bool for_filter_vectors(const WinogradTiles& wt, const FilterLayout& f, const F& fn) {
  std::atomic<bool> bad{false};
  const int64_t blocks = (f.lanes_n + wt.lanes - 1) / wt.lanes;
  run_ranges(f.others_n, 36 * f.lanes_n, [&](int64_t a0, int64_t a1) {
    bool b = false;
    for (int64_t a = a0; a < a1; ++a)
      for (int64_t q = 0; q < blocks; ++q) {
        const int64_t l0 = q * wt.lanes;
        b |= fn(a * f.other_stride + l0 * f.lane_stride, a * f.lanes_n + l0,
                std::min(wt.lanes, f.lanes_n - l0));
      }
    if (b) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

// U[k] for every (o, c) pair of the problem, laid out as FilterLayout says.
bool transform_weight(const DirectConv& d, const WinogradTiles& wt, const FilterLayout& f,
                      float* u) {
  return !for_filter_vectors(wt, f, [&](int64_t w_off, int64_t u_off, int64_t n) {
    return wt.weight(d.w + w_off, f.lane_stride, d.w_i, d.w_j, n, u + u_off, d.C * d.O,
                     kLimit);
  });
}

// The weight gradient from dU[k] (laid out as FilterLayout says), added into gw.
void inverse_weight(const DirectConv& d, const WinogradTiles& wt, const FilterLayout& f,
                    const float* du, float* gw) {
  for_filter_vectors(wt, f, [&](int64_t w_off, int64_t u_off, int64_t n) {
    wt.weight_grad(du + u_off, d.C * d.O, gw + w_off, f.lane_stride, d.w_i, d.w_j, n);
    return false;
  });
}

// The epilogue on output channel o's rows of one row run (written, and still in cache).
void epilogue_run(const DirectConv& d, const DirectEpilogue* ep, int64_t o, const RowRun& r) {
  const int64_t oy = 4 * r.ty, ox = 4 * r.tx0;
  const int64_t rows = std::min<int64_t>(4, d.Ho - oy);
  const int64_t offset = o * d.Ho * d.Wo + oy * d.Wo + ox;
  float* y = d.y + r.n * d.y_n + offset;
  const int64_t cols = std::min(4 * r.ntx, d.Wo - ox);
  const float* res = ep->residual ? ep->residual + r.n * ep->residual_n + offset : nullptr;
  for (int64_t i = 0; i < rows; ++i)
    ep->fn(y + i * d.Wo, d.Wo, 1, cols, ep->scale + o, ep->shift + o,
           res ? res + i * d.Wo : nullptr, ep->activation);
}

// Tile t's input, every channel, as V[k][tile][c] from v (ldk: the distance between k's; a
// vector of channels per transform). Returns whether a value was out of range.
bool input_tile_channels(const DirectConv& d, const WinogradTiles& wt, const TileGrid& grid,
                         int64_t t, float* v, int64_t ldk) {
  const TilePos p = tile_pos(grid, t);
  const float* x = d.x + p.n * d.x_n;
  const int64_t plane = d.H * d.W;
  bool bad_value = false;
  for (int64_t c = 0; c < d.C; c += wt.lanes)
    bad_value |= wt.input_tile(x + c * plane, plane, d.H, d.W, p.oy - d.ph, p.ox - d.pw,
                               std::min(wt.lanes, d.C - c), v + c, ldk, kLimit);
  return bad_value;
}

// The forward on the tile transforms (lanes over channels): V[k][tile][c] and M[k][tile][o],
// each block's tiles transformed one by one, then the epilogue on the block's rows.
bool forward_blocks(const DirectConv& d, const WinogradTiles& wt, const TileGrid& grid,
                    const FilterLayout& f, const float* u, int64_t block,
                    const DirectEpilogue* epilogue) {
  const int64_t C = d.C, O = d.O, L = wt.lanes;
  const int64_t out_plane = d.Ho * d.Wo;
  const int64_t blocks = (grid.total + block - 1) / block;
  std::atomic<bool> bad{false};
  run_tasks(blocks, 36 * block * C * O, [&](int64_t b) {
    if (bad.load(std::memory_order_relaxed)) return;
    const int64_t t0 = b * block, nt = std::min(block, grid.total - t0);
    float* v = scratch<float>(ScratchSlot::kWinogradIn, 36 * C * nt);
    // A vector past the end: output_tile reads whole vectors.
    float* m = scratch<float>(ScratchSlot::kWinogradOut, 36 * O * nt + L);
    bool bad_value = false;
    for (int64_t tl = 0; tl < nt && !bad_value; ++tl)
      bad_value = input_tile_channels(d, wt, grid, t0 + tl, v + tl * C, nt * C);
    if (bad_value) {
      bad.store(true, std::memory_order_relaxed);
      return;
    }
    for (int64_t k = 0; k < 36; ++k)  // M_k [nt, O] = V_k [nt, C] U_k [C, O]
      gemm<float>(false, !f.lanes_over_o, nt, O, C, v + k * nt * C, C, u + k * C * O,
                  f.lanes_over_o ? O : C, 0.0f, m + k * nt * O, O);
    for (int64_t tl = 0; tl < nt; ++tl) {
      const TilePos p = tile_pos(grid, t0 + tl);
      float* y = d.y + p.n * d.y_n + p.oy * d.Wo + p.ox;
      const int64_t rows = std::min<int64_t>(4, d.Ho - p.oy);
      const int64_t cols = std::min<int64_t>(4, d.Wo - p.ox);
      for (int64_t o = 0; o < O; o += L)
        wt.output_tile(m + tl * O + o, nt * O, std::min(L, O - o), y + o * out_plane,
                       out_plane, d.Wo, rows, cols);
    }
    if (epilogue == nullptr) return;
    const ChunkRows tile_rows = chunk_rows(grid, t0, nt);
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < tile_rows.count; ++i)
        epilogue_run(d, epilogue, o, row_run(grid, tile_rows.first + i, t0, nt));
  });
  return !bad.load();
}

}  // namespace

bool winograd_suits(const DirectConv& d) {
  return d.kh == 3 && d.kw == 3 && d.sh == 1 && d.sw == 1 && d.dh == 1 && d.dw == 1 &&
         d.ph >= 0 && d.pw >= 0 && d.C * d.O >= kMinHarmonic * (d.C + d.O) &&
         d.Ho >= 4 && d.Wo >= 4 && d.C * d.O <= kMaxFilterProducts &&
         TileGrid(d).total >= kMinTiles;
}

bool winograd_forward(const DirectConv& d, const DirectEpilogue* epilogue) {
  const WinogradTiles& wt = tiles_for_cpu();
  const TileGrid grid(d);
  const FilterLayout f(d);
  float* u = scratch<float>(ScratchSlot::kWinogradWeight, 36 * d.C * d.O);
  if (!transform_weight(d, wt, f, u)) return false;
  const int64_t block = block_tiles(grid.total, d.C + d.O, at::get_num_threads());
  return forward_blocks(d, wt, grid, f, u, block, epilogue);
}

bool winograd_weight_grad(const DirectConv& d, const float* gz, int64_t gz_n, float* gw) {
  const WinogradTiles& wt = tiles_for_cpu();
  const int64_t C = d.C, O = d.O, L = wt.lanes;
  const int64_t out_plane = d.Ho * d.Wo;
  const TileGrid grid(d);
  const int64_t chunk = chunk_tiles(grid.total, C + O);
  float* v = scratch<float>(ScratchSlot::kWinogradIn, 36 * chunk * C);
  float* m = scratch<float>(ScratchSlot::kWinogradOut, 36 * chunk * O);
  const FilterLayout f(d);
  float* du = scratch<float>(ScratchSlot::kWinogradWeight, 36 * C * O);
  for (int64_t t0 = 0; t0 < grid.total; t0 += chunk) {
    const int64_t nt = std::min(chunk, grid.total - t0);
    // The chunk's input tiles V[k][tile][c] and output-gradient tiles dM[k][tile][o]: one
    // region.
    std::atomic<bool> bad{false};
    run_ranges(nt, 36 * (C + O), [&](int64_t a, int64_t b) {
      bool bad_value = false;
      for (int64_t tl = a; tl < b && !bad_value; ++tl) {
        bad_value = input_tile_channels(d, wt, grid, t0 + tl, v + tl * C, nt * C);
        const TilePos p = tile_pos(grid, t0 + tl);
        const float* g = gz + p.n * gz_n + p.oy * d.Wo + p.ox;
        const int64_t rows = std::min<int64_t>(4, d.Ho - p.oy);
        const int64_t cols = std::min<int64_t>(4, d.Wo - p.ox);
        for (int64_t o = 0; o < O; o += L)
          bad_value |= wt.grad_tile(g + o * out_plane, out_plane, d.Wo, rows, cols,
                                    std::min(L, O - o), m + tl * O + o, nt * O, kLimit);
      }
      if (bad_value) bad.store(true, std::memory_order_relaxed);
    });
    if (bad.load()) return false;
    const float beta = t0 == 0 ? 0.0f : 1.0f;
    run_tasks(36, nt * C * O, [&](int64_t k) {
      // dU_k += V_k^T [C, nt] dM_k [nt, O] ([c][o]), or its transpose dM_k^T V_k ([o][c]).
      const float* vk = v + k * nt * C;
      const float* mk = m + k * nt * O;
      if (f.lanes_over_o) {
        gemm<float>(true, false, C, O, nt, vk, C, mk, O, beta, du + k * C * O, O);
      } else {
        gemm<float>(true, false, O, C, nt, mk, O, vk, C, beta, du + k * C * O, C);
      }
    });
  }
  inverse_weight(d, wt, f, du, gw);
  return true;
}

}  // namespace cpu
}  // namespace slimops
