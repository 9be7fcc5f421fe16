// Max pooling of a contiguous NCHW batch for inference (no indices), the CPU kernel behind
// slimops.nn.MaxPool2d's no-gradient path (slimops/ops/max_pool.py). Not an op family: pooling
// does not slim, and training keeps PyTorch's own op (its indices feed the backward).
//
// Why: PyTorch's NCHW max pool computes argmax indices even when none are asked for and walks
// one output at a time; S-ResNet-50's stem pool (64 channels, 112x112 -> 56x56, batch 1) took
// 3.4 ms that way and 0.66 ms converted to channels-last and back (2-core Intel Xeon, 2
// threads). This kernel pools the NCHW planes in place: each input row is split once into
// -inf-padded stride phases, so every tap of a row of outputs is one contiguous run.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace slimops {
namespace cpu {

// F.max_pool2d(input, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode) of a contiguous
// float32 / float64 NCHW `input`, to the bit, as a new contiguous tensor. The geometry must
// be one PyTorch accepts (positive kernel, stride and dilation; padding at most half the
// kernel; a non-empty output): checked, with PyTorch's output-size rule.
at::Tensor max_pool2d_nchw(const at::Tensor& input, int64_t kh, int64_t kw, int64_t sh,
                           int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                           bool ceil_mode);

}  // namespace cpu
}  // namespace slimops
