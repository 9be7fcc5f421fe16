"""``SlimConvBNAct``: slimmable conv + switchable BN + activation (+ residual), fused."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from slimops.nn.batchnorm import SwitchableBatchNorm2d
from slimops.nn.conv import Channels, IntPair, SlimmableConv2d
from slimops.reference import ACTIVATIONS


class SlimConvBNAct(nn.Module):
    """The building block of the reference models: ``act(bn(conv(x)) + residual)``.

    In eval mode the active width's BN is a per-channel scale/shift applied, with the
    residual add and the activation, in the convolution's epilogue: one op, one pass over the
    output. In training the convolution is followed by the fused batch-statistics
    BN + residual + activation op (only the active width's running stats update).

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, widths: as
            ``SlimmableConv2d`` (the conv has no bias; the BN's β plays that role).
        padding: defaults to ``dilation * (kernel_size - 1) // 2`` ("same" at stride 1).
        activation: ``"relu"`` (default), ``"relu6"`` or ``None``.
        eps, momentum: of the switchable BN.
        shared_bn: one BN for all widths instead of switchable BN (the naive baseline the
            paper compares against; see ``SwitchableBatchNorm2d(shared=True)``).
    """

    def __init__(
        self,
        in_channels: Channels,
        out_channels: Channels,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Optional[IntPair] = None,
        dilation: IntPair = 1,
        groups: int = 1,
        activation: Optional[str] = "relu",
        *,
        widths: Optional[Sequence[float]] = None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        shared_bn: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        if padding is None:
            k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
            d = (dilation, dilation) if isinstance(dilation, int) else dilation
            padding = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        self.conv = SlimmableConv2d(in_channels, out_channels, kernel_size, stride, padding,
                                    dilation, groups, bias=False, device=device, dtype=dtype,
                                    widths=widths)
        # The conv's out channels: its rule if it has one (then both run at any width).
        out = self.conv.out_channels_rule or self.conv.out_channels_list
        self.bn = SwitchableBatchNorm2d(out, eps, momentum,
                                        device=device, dtype=dtype, widths=self.conv.widths,
                                        shared=shared_bn)
        self.activation = activation

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.bn.uses_batch_stats():
            return self.bn.normalize(self.conv(input), residual, self.activation)
        scale, shift = self.bn.eval_scale_shift()
        return self.conv.conv(input, scale, shift, residual, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
