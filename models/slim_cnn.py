"""A small slimmable CNN: the demo model and the test workhorse.

MobileNet-style: a 3x3 stem, depthwise-separable blocks (one with a residual), global
average pooling and a classifier whose outputs never slim. Channels follow the MobileNet
rule (multiples of 8 without losing more than 10%), the first conv's inputs never slim.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from slimops.models._features import FeatureInfoMixin, FeatureTap
from slimops.nn import ChecksBNWidthsOnLoad, SlimConvBNAct, SlimmableLinear
from slimops.width import ChannelRule, normalize_widths


class SeparableBlock(nn.Module):
    """Depthwise 3x3 + pointwise 1x1, each conv + switchable BN + ReLU6; residual when the
    shape is kept (added before the pointwise activation, as the fused op allows)."""

    def __init__(self, cin: ChannelRule, cout: ChannelRule, stride: int,
                 widths: Sequence[float], shared_bn: bool = False) -> None:
        super().__init__()
        self.depthwise = SlimConvBNAct(cin, cin, 3, stride, groups=cin(max(widths)),
                                       activation="relu6",
                                       widths=widths, shared_bn=shared_bn)
        self.pointwise = SlimConvBNAct(cin, cout, 1, activation="relu6", widths=widths,
                                       shared_bn=shared_bn)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x), x if self.residual else None)


class SlimCNN(ChecksBNWidthsOnLoad, FeatureInfoMixin, nn.Module):
    """Stem, three (+ ``extra_blocks``) separable blocks, pooling, classifier; see
    ``slim_cnn``.

    ``widths``: the width switches, ascending. ``feature_info``: the maps of
    ``forward_features`` (``FeatureInfo``: name, stride, module, channels per width);
    ``feature_channels(width)`` gives their channels at any width the model runs at.
    """

    def __init__(self, widths: Sequence[float], num_classes: int, in_channels: int,
                 base: Sequence[int], shared_bn: bool = False, extra_blocks: int = 0) -> None:
        super().__init__()
        self.widths = normalize_widths(widths)
        # Channel rules, not lists: the model also runs at any width between its switches.
        c = [ChannelRule(b, divisor=8) for b in base]
        self.stem = SlimConvBNAct(in_channels, c[0], 3, 1, activation="relu6",
                                  widths=widths, shared_bn=shared_bn)
        self.blocks = nn.Sequential(
            SeparableBlock(c[0], c[1], 2, widths, shared_bn),
            SeparableBlock(c[1], c[2], 2, widths, shared_bn),
            SeparableBlock(c[2], c[2], 1, widths, shared_bn),
            *(SeparableBlock(c[2], c[2], 1, widths, shared_bn) for _ in range(extra_blocks)),
        )
        last = f"blocks.{len(self.blocks) - 1}"
        self._feature_taps = (
            FeatureTap("stride1", 1, "stem", "stem"),
            FeatureTap("stride2", 2, "blocks.0", "blocks.0.pointwise"),
            FeatureTap("stride4", 4, last, f"{last}.pointwise"),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SlimmableLinear(c[2], num_classes, widths=widths)
        self._init_feature_info()

    def forward_features(self, x: Tensor) -> Dict[str, Tensor]:
        """Feature maps at the active width: the stem's output and the last map of output
        stride 2 and 4 (keys ``"stride1"``, ``"stride2"``, ``"stride4"``)."""
        x = self.stem(x)
        feats = {"stride1": x}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0:
                feats["stride2"] = x
        feats["stride4"] = x
        return feats

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


def slim_cnn(
    widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    num_classes: int = 10,
    in_channels: int = 3,
    base: Optional[Sequence[int]] = None,
    shared_bn: bool = False,
    extra_blocks: int = 0,
) -> SlimCNN:
    """A small slimmable CNN with full-width channels ``base`` (default 32, 64, 128).

    ``shared_bn=True`` builds the naive baseline of the paper: one batch norm shared by all
    widths instead of switchable batch norm. ``extra_blocks`` adds that many stride-1
    residual separable blocks at the last stage (deeper networks show the shared-BN failure
    more: the per-layer statistics mismatch compounds with depth).
    """
    return SlimCNN(widths, num_classes, in_channels, tuple(base or (32, 64, 128)), shared_bn,
                   extra_blocks)
