"""``SlimmableConv2d``: a drop-in ``nn.Conv2d`` whose active channels follow the width."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from slimops import ops
from slimops.nn._attrs import held
from slimops.nn._checks import (channel_rule, check_layer_input, counts_between_switches,
                                per_width, resolve_widths)
from slimops.ops._common import (
    activation_code,
    check_residual,
    check_vector,
    conv_geometry,
    conv_output_hw,
)
from slimops.width import ChannelSpec, Slimmable

Channels = ChannelSpec
IntPair = Union[int, Tuple[int, int]]


class SlimmableConv2d(Slimmable, nn.Conv2d):
    """``nn.Conv2d`` with per-width channel counts, running on prefixes of one shared weight.

    Args:
        in_channels, out_channels: an int (the same at every width), one count per width
            in the order of ``widths`` (ascending), or a ``slimops.width.ChannelRule`` (any
            callable ``width -> count``). The weight is allocated for the largest. When
            neither is a list, the layer also runs at any width between the smallest and
            the largest switch (``any_width``).
        kernel_size, stride, padding, dilation, bias, device, dtype: as ``nn.Conv2d``
            (``padding`` may be ``"same"`` or ``"valid"``; only ``padding_mode="zeros"``).
        groups: as ``nn.Conv2d``. If ``groups`` equals the largest in and out channel count
            and the in and out lists are equal, the conv is *depthwise* at every width
            (``groups = channels(width)``, using ``W[:c]``). Otherwise the group count is fixed
            across widths and each group uses the prefix of its own block of the weight
            (ShuffleNet's grouped 1x1 convs).
        widths: the width switches (ascending after sorting). Needed with per-width lists;
            with ints it defaults to ``(1.0,)``, and the layer behaves exactly like
            ``nn.Conv2d`` (same parameters, initialisation and state_dict keys).

    The active width comes from ``slimops.set_width`` / ``slimops.width``.
    """

    def __init__(
        self,
        in_channels: Channels,
        out_channels: Channels,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Union[str, IntPair] = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        widths: Optional[Sequence[float]] = None,
    ) -> None:
        if padding_mode != "zeros":
            raise ValueError(f"SlimmableConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        ws = resolve_widths(widths, in_channels, out_channels)
        in_list = per_width(in_channels, ws, "SlimmableConv2d in_channels")
        out_list = per_width(out_channels, ws, "SlimmableConv2d out_channels")
        in_max, out_max = max(in_list), max(out_list)
        depthwise = groups > 1 and groups == in_max == out_max and in_list == out_list
        if not depthwise:
            bad = [(i, o) for i, o in zip(in_list, out_list) if i % groups or o % groups]
            if bad:
                raise ValueError(
                    f"SlimmableConv2d: with groups={groups} every width's in/out channel count "
                    f"must be divisible by {groups}; got (in, out) = {bad}"
                )
        super().__init__(in_max, out_max, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.in_channels_rule = channel_rule(in_channels)
        self.out_channels_rule = channel_rule(out_channels)
        self._init_widths(ws, any_width=self.in_channels_rule is not None
                          and self.out_channels_rule is not None)
        self.in_channels_list = in_list
        self.out_channels_list = out_list
        self.depthwise = depthwise
        self._op_padding = self._resolve_padding()

    def _resolve_padding(self) -> Tuple[int, int]:
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError(
                    "SlimmableConv2d: padding='same' needs an odd effective kernel size, got "
                    f"kernel_size={self.kernel_size}, dilation={self.dilation}"
                )
            return (total[0] // 2, total[1] // 2)
        return tuple(self.padding)  # type: ignore[return-value]

    def active_channels(self) -> Tuple[int, int]:
        """``(in_channels, out_channels)`` at the active width."""
        i = self.width_index()
        if i is not None:
            return self.in_channels_list[i], self.out_channels_list[i]
        return counts_between_switches(
            self, (self.in_channels_list, self.out_channels_list),
            (self.in_channels_rule, self.out_channels_rule),
            (self.in_channels, self.out_channels), self._check_rule_counts)

    def _check_rule_counts(self, cin: int, cout: int) -> None:
        """The shapes the channel rules must keep between the listed widths (at those, the
        counts are checked at construction): depthwise in = out, else divisible by groups."""
        if self.depthwise and cin != cout:
            raise ValueError(f"SlimmableConv2d (depthwise): at width {self.active_width()} the "
                             f"channel rules give {cin} inputs but {cout} outputs")
        if not self.depthwise and (cin % self.groups or cout % self.groups):
            raise ValueError(f"SlimmableConv2d: at width {self.active_width()} the channel "
                             f"rules give (in, out) = ({cin}, {cout}), not divisible by "
                             f"groups={self.groups}")

    def forward(self, input: Tensor) -> Tensor:
        return self.conv(input)

    def conv(
        self,
        input: Tensor,
        scale: Optional[Tensor] = None,
        shift: Optional[Tensor] = None,
        residual: Optional[Tensor] = None,
        activation: Optional[str] = None,
    ) -> Tensor:
        """The convolution at the active width with the fused epilogue
        ``act((conv + bias) * scale + shift + residual)`` (every term optional)."""
        cin, cout = self.active_channels()
        weight = self.weight
        check_layer_input(self, input, cin, weight, dims=4, channel_dim=1)
        # The layer's own channels, groups and geometry are valid by construction (and
        # active_channels checks a rule's counts between widths), so only what the caller
        # passes is checked here and the op's unchecked entry runs: in a training step of
        # small images the op entry's second round of checks cost as much as the kernel.
        s, p, d = self._geometry()
        op = "depthwise_conv2d" if self.depthwise else "conv2d"
        ho, wo = conv_output_hw(input.shape[2], input.shape[3], self.kernel_size, s, p, d, op)
        if scale is not None or shift is not None:
            check_vector(scale, cout, input, op, "scale")
            check_vector(shift, cout, input, op, "shift")
        check_residual(residual, (input.shape[0], cout, ho, wo), input, op)
        return self.conv_unchecked(input, cout, s, p, d, scale, shift, residual,
                                   activation_code(activation, op))

    def conv_unchecked(
        self, input: Tensor, cout: int, stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], scale: Optional[Tensor], shift: Optional[Tensor],
        residual: Optional[Tensor], activation: int,
    ) -> Tensor:
        """The op of this conv (depthwise or grouped/dense) on its shared weight and bias at
        ``cout`` output channels, for a caller that has checked the arguments (``conv``;
        ``SlimConvBNAct``'s fast paths); the activation as its code."""
        weight = held(self, "_parameters", "weight")
        bias = held(self, "_parameters", "bias")
        if self.depthwise:
            return ops.depthwise_conv2d_unchecked(input, weight, bias, stride, padding,
                                                  dilation, scale, shift, residual, activation)
        return ops.conv2d_unchecked(input, weight, bias, cout, stride, padding,
                                    dilation, self.groups, scale, shift, residual, activation)

    def _geometry(self) -> Tuple[List[int], List[int], List[int]]:
        """(stride, padding, dilation) as the ops' checked lists, converted once per value
        of the attributes (``nn.Conv2d``'s are plain tuples a user may replace)."""
        key = (self.stride, self._op_padding, self.dilation)
        if self.__dict__.get("_geometry_key") != key:
            self.__dict__["_geometry_cache"] = conv_geometry(*key, "conv2d")
            self.__dict__["_geometry_key"] = key
        return self.__dict__["_geometry_cache"]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, widths={self.widths}, "
                f"in_channels_list={self.in_channels_list}, "
                f"out_channels_list={self.out_channels_list}")
