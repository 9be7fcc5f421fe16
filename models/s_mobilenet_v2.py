"""S-MobileNet v2: the slimmable MobileNet v2 of the slimmable networks paper (Table 3).

A 3x3 stride-2 stem, 17 inverted residual blocks (1x1 expansion, 3x3 depthwise, linear 1x1
projection; ReLU6 after the first two; a residual add when the shape is kept), a 1x1 conv to
1280 channels, global average pooling and a fully connected classifier. Default switches
``[0.35, 0.5, 0.75, 1.0]x``.

Fidelity to the original implementation (github.com/JiahuiYu/slimmable_networks,
``models/s_mobilenet_v2.py``), whose checkpoints ``convert_original_state_dict`` loads:

* block and stem channels are ``make_divisible(c * w, 8, min_value=1)`` (the original's
  v2 rounding; it differs from v1's ``min_value=8`` only below 4 channels);
* a block's expanded width is ``expand_ratio`` times its input channels *at that width*
  (not rounded again);
* the last 1x1 conv has 1280 outputs at every width (``make_divisible(1280 * max(widths))``
  when the largest width exceeds 1.0), and the classifier reads all of them: neither slims;
* the residual add follows the projection's BN and is fused into its conv epilogue.

* the tail's 1280 channels are normalised by one batch norm shared by every width (the
  original's plain ``nn.BatchNorm2d`` there; ``SlimConvBNAct(shared_bn=True)`` here, state
  keys ``last_conv.bn.bn.0.*``): 3,556,456 stored parameters at the default widths, the
  original's count. Every other BN is switchable.

The original pools with ``AvgPool2d(input_size // 32)``; ``AdaptiveAvgPool2d(1)`` is the
same at 224x224 and also works on other input sizes.

At 224x224 this gives 3,470,760 conv + FC parameters and 34,112 BN parameters at 1.0x, and
about 301M / 209M / 97M / 59M MACs at 1.0 / 0.75 / 0.5 / 0.35x.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from slimops.models._features import FeatureInfoMixin, FeatureTap
from slimops.models._mobilenet import MobileNetBody
from slimops.models._original import init_like_original
from slimops.nn import (
    ChecksBNWidthsOnLoad,
    EvalChain,
    SlimConvBNAct,
    SlimmableLinear,
    runs_eval_chain,
)
from slimops.width import ChannelRule, make_divisible, normalize_widths

# (expand ratio, output channels at 1.0x, number of blocks, stride of the first block).
BLOCK_SETTING: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def v2_channels(c: int) -> ChannelRule:
    """The channels of a layer with ``c`` at 1.0x at any width, rounded as the original v2
    does (``make_divisible(c * w, 8, min_value=1)``)."""
    return ChannelRule(c, divisor=8, min_value=1)


# An inverted residual's layers as one compiled call in inference (slimops.nn.EvalChain; slot
# 0 is the block's input), by (has an expansion, adds the input).
_CHAINS: Dict[Tuple[bool, bool], EvalChain] = {
    (expands, adds): EvalChain(
        ([("expand", 0, None)] if expands else [])
        + [("depthwise", int(expands), None), ("project", int(expands) + 1, 0 if adds else None)])
    for expands in (False, True) for adds in (False, True)}


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when ``expand_ratio`` is 1), 3x3 depthwise, linear 1x1
    projection; the input is added to the projection's BN output when the shape is kept."""

    def __init__(self, cin: ChannelRule, cout: ChannelRule, stride: int, expand_ratio: int,
                 widths: Sequence[float]) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.expand: Optional[SlimConvBNAct] = None
        if expand_ratio != 1:
            self.expand = SlimConvBNAct(cin, hidden, 1, activation="relu6", widths=widths)
        # groups = the largest channel count makes the conv depthwise at every width.
        self.depthwise = SlimConvBNAct(hidden, hidden, 3, stride, groups=hidden(max(widths)),
                                       activation="relu6", widths=widths)
        # Linear bottleneck: no activation after the projection.
        self.project = SlimConvBNAct(hidden, cout, 1, activation=None, widths=widths)
        self.stride = stride
        self.use_residual = stride == 1 and cin == cout

    def eval_chain(self) -> EvalChain:
        """The layers this block's ``forward`` runs, as an ``EvalChain``."""
        return _CHAINS[(self.expand is not None, self.use_residual)]

    @runs_eval_chain
    def forward(self, x: Tensor) -> Tensor:
        out = self.eval_chain()(self, x)
        if out is not None:
            return out
        h = x if self.expand is None else self.expand(x)
        # The residual goes into the projection's epilogue (one pass over its output).
        return self.project(self.depthwise(h), x if self.use_residual else None)


class SMobileNetV2(ChecksBNWidthsOnLoad, FeatureInfoMixin, MobileNetBody, nn.Module):
    """Slimmable MobileNet v2; build it with ``s_mobilenet_v2``.

    Attributes:
        widths: the width switches, ascending.
        stem, blocks, last_conv, pool, classifier: the layers (``blocks`` is an
            ``nn.Sequential`` of 17 ``InvertedResidual``).
        feature_info: the maps of ``forward_features`` (``FeatureInfo``: name, stride,
            module, channels per width); ``feature_channels(width)`` gives their channels at
            any width the model runs at.
    """

    _tail_chain = EvalChain([("last_conv", 0, None)])

    def __init__(self, widths: Sequence[float], num_classes: int) -> None:
        super().__init__()
        self.widths = normalize_widths(widths)
        # Channel rules (not per-width lists): the model also runs at any width between its
        # switches. The input image has 3 channels at every width.
        stages = [(v2_channels(base), repeats, first_stride,
                   lambda cin, cout, s, t=t: InvertedResidual(cin, cout, s, t, self.widths))
                  for t, base, repeats, first_stride in BLOCK_SETTING]
        last, c = self._build_body(v2_channels(STEM_CHANNELS), stages, (8, 16))
        # Never slims: 1280 outputs at every width (more only if a width exceeds 1.0).
        top = max(self.widths)
        self.last_channels = (make_divisible(LAST_CHANNELS * top, 8, min_value=1) if top > 1.0
                              else LAST_CHANNELS)
        # One BN for every width, as the original has (its channel count never changes).
        self.last_conv = SlimConvBNAct(c, self.last_channels, 1, activation="relu6",
                                       widths=self.widths, shared_bn=True)
        # The last block of output stride 8 and 16 feed forward_features (stride 32: the
        # last conv's output).
        self._feature_taps = self._tap_blocks(last, "project") + (
            FeatureTap("stride32", 32, "last_conv", "last_conv"),)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SlimmableLinear(self.last_channels, num_classes, widths=self.widths)
        init_like_original(self)
        self._init_feature_info()

    def forward_features(self, x: Tensor) -> Dict[str, Tensor]:
        """Feature maps at the active width: the last map of output stride 8, 16 and 32
        (keys ``"stride8"``, ``"stride16"``, ``"stride32"``; the last is the 1280-channel
        output of the last conv)."""
        feats, x = self._block_features(x)
        feats["stride32"] = self.last_conv(x)
        return feats

    def convert_original_state_dict(self, sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Map the original implementation's keys (``module.`` already stripped) onto ours.

        The original is ``features.0`` = (conv, S-BN, ReLU6); ``features.k.body`` for the
        k-th block = (expand conv, S-BN, ReLU6, dw conv, S-BN, ReLU6, project conv, S-BN),
        without the first three when the expand ratio is 1; then ``features.18`` = (conv,
        plain BN, ReLU6), the pooling, and ``classifier.0`` (a plain linear layer). Its
        switchable BNs keep ``bn.{i}`` in its ascending width list, like ours; its single
        tail BN is our tail's one shared BN (``last_conv.bn.bn.0``).
        """
        prefixes: Dict[str, str] = {}
        for k, block in enumerate(self.blocks):
            body = f"features.{k + 1}.body"
            parts = ["depthwise", "project"] if block.expand is None else [
                "expand", "depthwise", "project"]
            for j, part in enumerate(parts):
                prefixes[f"blocks.{k}.{part}.conv"] = f"{body}.{3 * j}"
                prefixes[f"blocks.{k}.{part}.bn"] = f"{body}.{3 * j + 1}"
        tail = f"features.{len(self.blocks) + 1}"
        prefixes["last_conv.conv"] = f"{tail}.0"
        prefixes["last_conv.bn.bn.0"] = f"{tail}.1"
        return self._convert_original(sd, prefixes)


def s_mobilenet_v2(
    widths: Sequence[float] = (0.35, 0.5, 0.75, 1.0), num_classes: int = 1000
) -> SMobileNetV2:
    """S-MobileNet v2 with switches ``widths`` (any list of distinct positive widths) and a
    ``num_classes``-way classifier. Starts at the largest width."""
    return SMobileNetV2(widths, num_classes)
