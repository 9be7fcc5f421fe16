"""Which feature maps a model's ``forward_features`` returns, for detection and segmentation
heads: each map's name, total stride, producing submodule and channel count at every width
(timm's ``feature_info``, with one channel count per width).

A model lists its maps as ``FeatureTap``s (``_feature_taps``); the channel counts are read
off the layers themselves (``SlimmableConv2d.active_channels`` under ``slimops.width.width``),
so they follow the layers' channel lists and rules, in-between widths included, and can
never drift from what ``forward_features`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

from torch import nn

from slimops.nn import SlimConvBNAct, SlimmableConv2d
from slimops.width import width as scoped_width


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map that a model's ``forward_features`` returns.

    Attributes:
        name: its key in the dict ``forward_features`` returns (e.g. ``"stride8"``).
        reduction: its total stride: an input whose sides are multiples of it gives a map
            of side ``input side / reduction`` (ResNet and the MobileNets: ``ceil(side /
            reduction)`` for any side).
        module: the dotted name of the submodule whose output the map is
            (``model.get_submodule(module)``; where to hook it).
        channels: the map's channel count at each of ``model.widths`` (ascending, aligned
            with ``model.widths``).
    """

    name: str
    reduction: int
    module: str
    channels: Tuple[int, ...]


class FeatureTap(NamedTuple):
    """How a model declares one of its feature maps (``FeatureInfo`` without the channels).

    ``channels_from`` names the ``SlimConvBNAct`` (or ``SlimmableConv2d``) whose output
    channel count is the map's: the last conv of ``module``, whose other ops (a residual
    add, an activation) keep the count.
    """

    name: str
    reduction: int
    module: str
    channels_from: str


def _out_channels(model: nn.Module, path: str) -> int:
    try:
        layer = model.get_submodule(path)
    except AttributeError as e:
        # Re-raised as another type: an AttributeError inside the `feature_info` property
        # would make nn.Module.__getattr__ report that the property itself is missing.
        raise RuntimeError(f"{type(model).__name__}: feature tap {path!r}: {e}") from None
    conv = layer.conv if isinstance(layer, SlimConvBNAct) else layer
    if not isinstance(conv, SlimmableConv2d):
        raise RuntimeError(f"{type(model).__name__}: feature tap {path!r} is a "
                           f"{type(layer).__name__}, not a slimmable conv")
    return conv.active_channels()[1]


class FeatureInfoMixin:
    """Mixin for a model class (before ``nn.Module`` in the bases) whose ``__init__`` sets
    ``widths`` and ``_feature_taps`` (one ``FeatureTap`` per ``forward_features`` key,
    ascending stride); gives it ``feature_info`` and ``feature_channels``."""

    widths: Tuple[float, ...]
    _feature_taps: Sequence[FeatureTap]
    #: One ``FeatureInfo`` per map of ``forward_features``, ascending stride, with its
    #: channel count at each of ``self.widths``. Plain data set at construction
    #: (``_init_feature_info``), not a property: ``torch.jit.trace`` reads every attribute
    #: of a module, and an exported dense copy has no width to evaluate one at.
    feature_info: List[FeatureInfo]

    def _init_feature_info(self) -> None:
        """Set ``feature_info``; call it at the end of ``__init__`` (the layers exist)."""
        per_width = [self.feature_channels(w) for w in self.widths]
        self.feature_info = [FeatureInfo(tap.name, tap.reduction, tap.module,
                                         tuple(counts[k] for counts in per_width))
                             for k, tap in enumerate(self._feature_taps)]

    def feature_channels(self, width: Optional[float] = None) -> List[int]:
        """The channel count of each ``forward_features`` map (``feature_info`` order) at
        ``width``: one of ``self.widths`` or, for a model built from channel rules, any width
        between its smallest and largest. ``None``: the width the model runs at in this
        thread (``set_width`` or an enclosing ``slimops.width`` block).

        Raises:
            ValueError: a width the model does not run at (the message lists its widths).
        """
        model: nn.Module = self  # type: ignore[assignment]
        if width is None:
            return [_out_channels(model, tap.channels_from) for tap in self._feature_taps]
        with scoped_width(model, width):
            return [_out_channels(model, tap.channels_from) for tap in self._feature_taps]
