"""Max pooling for the reference builders: ``nn.MaxPool2d`` with a faster CPU inference path.

Pooling does not slim (it keeps whatever channels the layer before it produced), but it sits
on the eval path of every model with a stem pool (S-ResNet, S-ShuffleNet), and there PyTorch's
CPU kernel for NCHW tensors is slow: its loop runs one output at a time, scalar. The
channels-last kernel vectorises over channels. S-ResNet-50's pool (64 channels, 112x112 ->
56x56, batch 1) took 2.8 ms through the NCHW kernel, 8% of the whole model's eval forward, and
0.64 ms converted to channels-last, pooled and converted back (a 2-core Intel Xeon, 2
threads; 0.20-0.26x from 16 to 64 channels, planes of 16 to 112, batches 1 to 64).

So ``MaxPool2d`` runs that conversion where no gradient is needed. Where one is (training),
it runs ``nn.MaxPool2d``'s own path: the channels-last kernel's backward measured 1.3-1.6x
the NCHW one's time at 64 channels (0.55-0.7x at 16-24), so the training step is left to
torch. The output is the same tensor either way: the maximum is exact, both kernels take NaN
as the maximum of a window holding one, and the result is returned in the input's NCHW
layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        if (input.dim() == 4 and input.device.type == "cpu" and not self.return_indices
                and not (torch.is_grad_enabled() and input.requires_grad)
                and input.is_contiguous()):
            pooled = F.max_pool2d(input.contiguous(memory_format=torch.channels_last),
                                  self.kernel_size, self.stride, self.padding, self.dilation,
                                  ceil_mode=self.ceil_mode)
            return pooled.contiguous()
        # nn.MaxPool2d.forward, written out: TorchScript cannot call super()
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)
