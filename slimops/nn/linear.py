"""``SlimmableLinear``: a drop-in ``nn.Linear`` whose active features follow the width."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from slimops import ops
from slimops.nn._checks import check_layer_input, per_width, resolve_widths
from slimops.width import Slimmable


class SlimmableLinear(Slimmable, nn.Linear):
    """``nn.Linear`` with per-width feature counts, on prefixes of one shared weight.

    Args:
        in_features, out_features: an int (the same at every width) or one count per width
            (in the order of ascending ``widths``); a classifier keeps ``out_features`` fixed.
        bias, device, dtype: as ``nn.Linear``.
        widths: the width switches; defaults to ``(1.0,)`` with ints (then it behaves exactly
            like ``nn.Linear``).
    """

    def __init__(
        self,
        in_features: Union[int, Sequence[int]],
        out_features: Union[int, Sequence[int]],
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
        self._init_widths(ws)
        self.in_features_list = in_list
        self.out_features_list = out_list

    def active_features(self) -> Tuple[int, int]:
        """``(in_features, out_features)`` at the active width."""
        i = self.width_index()
        return self.in_features_list[i], self.out_features_list[i]

    def forward(self, input: Tensor) -> Tensor:
        fin, fout = self.active_features()
        check_layer_input(self, input, fin, self.weight, dims=None, channel_dim=-1)
        return ops.linear(input, self.weight, self.bias, fout)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, widths={self.widths}, "
                f"in_features_list={self.in_features_list}, "
                f"out_features_list={self.out_features_list}")
