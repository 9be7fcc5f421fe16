"""Pooling for the reference builders: ``nn.MaxPool2d`` and ``nn.AvgPool2d`` with a faster CPU
inference path.

Pooling does not slim (it keeps whatever channels the layer before it produced), but it sits
on the eval path of models (S-ResNet's stem pool, S-ShuffleNet's stem pool and the average
pool of its stride-2 units), and there PyTorch's CPU kernels for NCHW tensors are slow: their
loops run one output at a time. The channels-last kernels vectorise over channels.
S-ResNet-50's max pool (64 channels, 112x112 -> 56x56, batch 1) took 2.8 ms through the NCHW
kernel, 8% of the whole model's eval forward, and 0.64 ms converted to channels-last, pooled
and converted back (a 2-core Intel Xeon, 2 threads; 0.20-0.26x from 16 to 64 channels, planes
of 16 to 112, batches 1 to 64). S-ShuffleNet's 3x3 average pools: 0.35-0.7x (24 to 480
channels, 14x14 to 56x56, batches 1 and 8).

So these layers run that conversion where no gradient is needed; the max pool, where it can,
runs slimops' own C++ kernel instead (``slimops.ops.max_pool2d_inference``,
csrc/cpu/max_pool.h): it pools the NCHW planes in place, without indices, the same result to
the bit. S-ResNet-50's stem pool at batch 1 took 0.27-0.33x the channels-last round trip's
time on a 2-core Intel Xeon (16 to 64 channels; 0.36-0.47x capped to AVX2;
docs/BENCHMARKS.md, twenty-third round). In training the max pool splits the difference:
its forward (with the argmax indices the backward needs) runs on the channels-last copy, 4-5x
faster than the NCHW kernel, and its backward scatters the output gradient to those indices
in NCHW, as PyTorch's NCHW backward does, because the channels-last backward measured
1.3-1.6x the NCHW one's time at 64 channels (0.55-0.7x at 16-24).
S-ResNet-50's stem pool at batch 8 (forward + backward, 16 to 64 channels) took 0.33-0.42x
the NCHW pool's time that way (docs/BENCHMARKS.md, nineteenth round). The average pool trains
on PyTorch's own path (the same split measured 0.5-1.3x). The output is the same tensor
either way (both kernels visit a window in the same order: the max takes NaN as the maximum
of a window holding one and keeps the first of equal maxima, so the indices agree too; the
average sums in the same order and divides by the same count), returned in the input's NCHW
layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimops import ops


def _nchw_batch_on_cpu(input: Tensor) -> bool:
    """A contiguous NCHW batch on the CPU: what the channels-last paths convert."""
    return input.dim() == 4 and input.device.type == "cpu" and input.is_contiguous()


def _records_grad(input: Tensor) -> bool:
    return torch.is_grad_enabled() and input.requires_grad


def _inference_on_cpu(input: Tensor) -> bool:
    """Whether ``input`` takes the channels-last path: a contiguous NCHW batch on the CPU
    with no gradient to record."""
    return _nchw_batch_on_cpu(input) and not _records_grad(input)


def _training_on_cpu(input: Tensor) -> bool:
    """Whether ``input`` takes the max pool's training path: a contiguous, non-empty NCHW
    batch on the CPU, float32 or float64, with a gradient to record. (Those dtypes only: in
    bfloat16 / float16 PyTorch's backward adds overlapping windows' gradients in float and
    rounds once, where a scatter in the tensor's dtype rounds after each add.)"""
    return (_nchw_batch_on_cpu(input) and _records_grad(input) and input.numel() > 0
            and (input.dtype == torch.float32 or input.dtype == torch.float64))


class _MaxPoolChannelsLastForward(torch.autograd.Function):
    """``F.max_pool2d`` of an NCHW batch: the forward on a channels-last copy (its argmax
    indices, offsets within a plane, do not depend on the layout), the backward a scatter of
    the output gradient to those indices. The backward is made of differentiable ops, so a
    double backward works as through ``F.max_pool2d``."""

    @staticmethod
    def forward(ctx, input: Tensor, kernel_size, stride, padding, dilation,
                ceil_mode: bool) -> Tensor:
        out, indices = F.max_pool2d(input.contiguous(memory_format=torch.channels_last),
                                    kernel_size, stride, padding, dilation,
                                    ceil_mode=ceil_mode, return_indices=True)
        indices = indices.contiguous()
        ctx.save_for_backward(indices)
        ctx.input_shape = input.shape
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (indices,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        # Each output's gradient added at its argmax, plane by plane in output order: what
        # PyTorch's NCHW max-pool backward does, so the sums (where windows overlap) are the
        # same to the bit. In place on fresh zeros: the out-of-place scatter_add copies them
        # first (1.6 vs 2.9 ms for 8 x 64 x 112 x 112; PyTorch's backward took 2.8).
        planes = n * c
        grad_input = grad.new_zeros((planes, h * w))
        grad_input.scatter_add_(1, indices.view(planes, -1), grad.contiguous().view(planes, -1))
        return grad_input.view(n, c, h, w), None, None, None, None, None


class MaxPool2d(nn.MaxPool2d):
    """Drop-in ``nn.MaxPool2d`` (same arguments, no parameters, the same state dict) whose CPU
    forward, when no gradient is recorded and no indices are asked for, pools a channels-last
    copy of an NCHW batch and returns the result contiguous again (see the module doc)."""

    def plain(self) -> nn.MaxPool2d:
        """This layer as a plain ``nn.MaxPool2d`` (the reference style and ``export`` use it:
        their models hold PyTorch's own layers)."""
        return nn.MaxPool2d(self.kernel_size, self.stride, self.padding, self.dilation,
                            return_indices=self.return_indices, ceil_mode=self.ceil_mode)

    def forward(self, input: Tensor) -> Tensor:
        if not self.return_indices and _inference_on_cpu(input):
            if not torch.jit.is_scripting():
                kernel_out = self._inference_kernel(input)
                if kernel_out is not None:
                    return kernel_out
            pooled = F.max_pool2d(input.contiguous(memory_format=torch.channels_last),
                                  self.kernel_size, self.stride, self.padding, self.dilation,
                                  ceil_mode=self.ceil_mode)
            return pooled.contiguous()
        if (not torch.jit.is_scripting() and not self.return_indices
                and _training_on_cpu(input)):
            return self._train_forward(input)
        # nn.MaxPool2d.forward, written out: TorchScript cannot call super()
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)

    @torch.jit.unused
    def _inference_kernel(self, input: Tensor) -> Optional[Tensor]:
        # Not TorchScript: slimops' C++ kernel (slimops.ops.max_pool2d_inference), or None
        # where it does not run.
        return ops.max_pool2d_inference(input, self.kernel_size, self.stride, self.padding,
                                        self.dilation, self.ceil_mode)

    @torch.jit.unused
    def _train_forward(self, input: Tensor) -> Tensor:
        # Not TorchScript: an autograd.Function (a scripted layer takes PyTorch's path).
        return _MaxPoolChannelsLastForward.apply(input, self.kernel_size, self.stride,
                                                 self.padding, self.dilation, self.ceil_mode)


class AvgPool2d(nn.AvgPool2d):
    """Drop-in ``nn.AvgPool2d`` whose CPU forward, when no gradient is recorded, pools a
    channels-last copy of an NCHW batch and returns the result contiguous again (see the
    module doc)."""

    def plain(self) -> nn.AvgPool2d:
        """This layer as a plain ``nn.AvgPool2d`` (for the reference style and ``export``)."""
        return nn.AvgPool2d(self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)

    def forward(self, input: Tensor) -> Tensor:
        if _inference_on_cpu(input):
            input = input.contiguous(memory_format=torch.channels_last)
            return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding,
                                self.ceil_mode, self.count_include_pad,
                                self.divisor_override).contiguous()
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)
