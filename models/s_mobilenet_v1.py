"""S-MobileNet v1: the slimmable MobileNet v1 of the slimmable networks paper (Table 3).

A 3x3 stride-2 stem, 13 depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, each
conv + switchable BN + ReLU6), global average pooling and a fully connected classifier.
Default switches ``[0.25, 0.5, 0.75, 1.0]x``.

Fidelity to the original implementation (github.com/JiahuiYu/slimmable_networks,
``models/s_mobilenet_v1.py``), whose checkpoints ``convert_original_state_dict`` loads:

* every channel count, the stem's included, is ``make_divisible(c * w, 8)`` (a multiple of 8
  never more than 10% below ``c * w``, at least 8); the stem's 3 inputs and the classifier's
  outputs never slim;
* the activation is ReLU6, as in the original code (the MobileNet v1 paper says ReLU; the
  released slimmable checkpoints were trained with ReLU6, so that is what reproduces them);
* the original pools with ``AvgPool2d(input_size // 32)``; ``AdaptiveAvgPool2d(1)`` is the
  same at 224x224 (and wherever the last map is 7x7) and also works on other input sizes.

At 224x224 this gives 4,210,088 conv + FC parameters and 21,888 BN parameters at 1.0x, and
569M / 325M / 150M / 41M MACs at 1.0 / 0.75 / 0.5 / 0.25x (the paper prints 317M for 0.75x;
the architecture, like the original MobileNet paper, gives 325M).
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

from torch import Tensor, nn

from slimops.models._features import FeatureInfoMixin
from slimops.models._mobilenet import MobileNetBody
from slimops.models._original import init_like_original
from slimops.nn import (
    ChecksBNWidthsOnLoad,
    EvalChain,
    SlimConvBNAct,
    SlimmableLinear,
    runs_eval_chain,
)
from slimops.width import ChannelRule, normalize_widths

# (output channels at 1.0x, number of blocks, stride of the first block): MobileNet v1's body.
BLOCK_SETTING: Tuple[Tuple[int, int, int], ...] = (
    (64, 1, 1),
    (128, 2, 2),
    (256, 2, 2),
    (512, 6, 2),
    (1024, 2, 2),
)
STEM_CHANNELS = 32


# A block's two layers as one compiled call in inference (slimops.nn.EvalChain).
_CHAIN = EvalChain([("depthwise", 0, None), ("pointwise", 1, None)])


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv (stride ``stride``) then 1x1 pointwise conv, each + S-BN + ReLU6."""

    def __init__(self, cin: ChannelRule, cout: ChannelRule, stride: int,
                 widths: Sequence[float]) -> None:
        super().__init__()
        # groups = the largest channel count makes the conv depthwise at every width.
        self.depthwise = SlimConvBNAct(cin, cin, 3, stride, groups=cin(max(widths)),
                                       activation="relu6", widths=widths)
        self.pointwise = SlimConvBNAct(cin, cout, 1, activation="relu6", widths=widths)
        self.stride = stride

    def eval_chain(self) -> EvalChain:
        """The layers this block's ``forward`` runs, as an ``EvalChain``."""
        return _CHAIN

    @runs_eval_chain
    def forward(self, x: Tensor) -> Tensor:
        out = self.eval_chain()(self, x)
        if out is not None:
            return out
        return self.pointwise(self.depthwise(x))


class SMobileNetV1(ChecksBNWidthsOnLoad, FeatureInfoMixin, MobileNetBody, nn.Module):
    """Slimmable MobileNet v1; build it with ``s_mobilenet_v1``.

    Attributes:
        widths: the width switches, ascending.
        stem, blocks, pool, classifier: the layers (``blocks`` is an ``nn.Sequential`` of 13
            ``DepthwiseSeparable``).
        feature_info: the maps of ``forward_features`` (``FeatureInfo``: name, stride,
            module, channels per width); ``feature_channels(width)`` gives their channels at
            any width the model runs at.
    """

    def __init__(self, widths: Sequence[float], num_classes: int) -> None:
        super().__init__()
        self.widths = normalize_widths(widths)
        # Channel rules (not per-width lists): the model also runs at any width between its
        # switches. The input image has 3 channels at every width.
        stages = [(ChannelRule(base, divisor=8), repeats, first_stride,
                   lambda cin, cout, s: DepthwiseSeparable(cin, cout, s, self.widths))
                  for base, repeats, first_stride in BLOCK_SETTING]
        last, c = self._build_body(ChannelRule(STEM_CHANNELS, divisor=8), stages, (8, 16, 32))
        # The last block of each output stride feeds forward_features.
        self._feature_taps = self._tap_blocks(last, "pointwise")
        self.pool = nn.AdaptiveAvgPool2d(1)
        # The class count never slims.
        self.classifier = SlimmableLinear(c, num_classes, widths=self.widths)
        init_like_original(self)
        self._init_feature_info()

    def forward_features(self, x: Tensor) -> Dict[str, Tensor]:
        """Feature maps at the active width: the last map of output stride 8, 16 and 32
        (keys ``"stride8"``, ``"stride16"``, ``"stride32"``)."""
        return self._block_features(x)[0]

    def convert_original_state_dict(self, sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Map the original implementation's keys (``module.`` already stripped) onto ours.

        The original is ``features.0`` = (conv, S-BN, ReLU6), ``features.k.body`` =
        (dw conv, S-BN, ReLU6, pw conv, S-BN, ReLU6) for the k-th block, then the pooling and
        ``classifier.0`` (a slimmable linear layer). Its switchable BNs keep ``bn.{i}`` in
        its ascending width list, like ours, so a checkpoint loads into a model built with
        the same widths.
        """
        prefixes: Dict[str, str] = {}
        for k in range(len(self.blocks)):
            body = f"features.{k + 1}.body"
            prefixes.update({
                f"blocks.{k}.depthwise.conv": f"{body}.0",
                f"blocks.{k}.depthwise.bn": f"{body}.1",
                f"blocks.{k}.pointwise.conv": f"{body}.3",
                f"blocks.{k}.pointwise.bn": f"{body}.4",
            })
        return self._convert_original(sd, prefixes)


def s_mobilenet_v1(
    widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0), num_classes: int = 1000
) -> SMobileNetV1:
    """S-MobileNet v1 with switches ``widths`` (any list of distinct positive widths) and a
    ``num_classes``-way classifier. Starts at the largest width."""
    return SMobileNetV1(widths, num_classes)
