"""``SlimmableLinear``: a drop-in ``nn.Linear`` whose active features follow the width."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import Tensor, nn

from slimops import ops
from slimops.nn._attrs import held
from slimops.nn._checks import (channel_rule, check_layer_input, counts_between_switches,
                                per_width, resolve_widths)
from slimops.width import ChannelSpec, Slimmable


class SlimmableLinear(Slimmable, nn.Linear):
    """``nn.Linear`` with per-width feature counts, on prefixes of one shared weight.

    Args:
        in_features, out_features: an int (the same at every width), one count per width
            (in the order of ascending ``widths``) or a ``ChannelRule``; a classifier keeps
            ``out_features`` fixed. Without lists the layer also runs at any width between
            its smallest and largest switch.
        bias, device, dtype: as ``nn.Linear``.
        widths: the width switches; defaults to ``(1.0,)`` with ints (then it behaves exactly
            like ``nn.Linear``).
    """

    def __init__(
        self,
        in_features: ChannelSpec,
        out_features: ChannelSpec,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        widths: Optional[Sequence[float]] = None,
    ) -> None:
        ws = resolve_widths(widths, in_features, out_features)
        in_list = per_width(in_features, ws, "SlimmableLinear in_features")
        out_list = per_width(out_features, ws, "SlimmableLinear out_features")
        super().__init__(max(in_list), max(out_list), bias, device, dtype)
        self.in_features_rule = channel_rule(in_features)
        self.out_features_rule = channel_rule(out_features)
        self._init_widths(ws, any_width=self.in_features_rule is not None
                          and self.out_features_rule is not None)
        self.in_features_list = in_list
        self.out_features_list = out_list

    def active_features(self) -> Tuple[int, int]:
        """``(in_features, out_features)`` at the active width."""
        i = self.width_index()
        if i is not None:
            return self.in_features_list[i], self.out_features_list[i]
        return counts_between_switches(
            self, (self.in_features_list, self.out_features_list),
            (self.in_features_rule, self.out_features_rule),
            (self.in_features, self.out_features))

    def forward(self, input: Tensor) -> Tensor:
        fin, fout = self.active_features()
        weight = held(self, "_parameters", "weight")
        check_layer_input(self, input, fin, weight, dims=None, channel_dim=-1)
        # The input is checked against this layer's own weight and width: the op need not
        # re-validate (at batch 1 that was ~5 us of a ~60 us call).
        return ops.linear_unchecked(input, weight, held(self, "_parameters", "bias"), fout)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, widths={self.widths}, "
                f"in_features_list={self.in_features_list}, "
                f"out_features_list={self.out_features_list}")
