"""S-ResNet: slimmable ResNet with bottleneck blocks (Yu et al., ICLR 2019), ResNet-50 today.

The structure follows the original implementation (github.com/JiahuiYu/slimmable_networks,
``models/s_resnet.py``): a 7x7 stride-2 stem + 3x3 max pool, four stages of bottleneck
blocks (1x1 -> 3x3 -> 1x1, each conv + switchable BN, ReLU on the first two), the stride on
the 3x3 conv (the "ResNet v1.5" placement, as torchvision), a projection shortcut (1x1 conv +
switchable BN, at the block's stride) on the first block of every stage and the identity
elsewhere, global average pooling and a classifier whose outputs never slim.

Channels truncate, ``int(c * w)`` (``slimops.width.channels(c, widths)``); a block's
bottleneck width is a quarter of its (already truncated) output width, as in the original.
The shortcut is added inside the last conv's fused epilogue, before the final ReLU.

Depths are a row of ``_STAGE_BLOCKS``; only ResNet-50 is provided (and checked against the
paper's parameter and MAC counts).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from slimops.models._features import FeatureInfoMixin, FeatureTap
from slimops.models._original import CheckpointMismatchError, init_like_original, take
from slimops.nn import (
    ChecksBNWidthsOnLoad,
    EvalChain,
    MaxPool2d,
    SlimConvBNAct,
    SlimmableLinear,
    block_chains,
    bypassable,
    chains_can_run,
    run_eval_chains,
    runs_eval_chain,
)
from slimops.width import ChannelRule, normalize_widths

# depth -> number of bottleneck blocks per stage. Another depth of the original (101:
# (3, 4, 23, 3), 152: (3, 8, 36, 3)) is one more row here.
_STAGE_BLOCKS: Dict[int, Tuple[int, int, int, int]] = {50: (3, 4, 6, 3)}
# Full-width bottleneck (mid) channels per stage; a block's output has 4x as many.
_STAGE_MID = (64, 128, 256, 512)
_EXPANSION = 4
_STEM = 64
# Output stride of each stage's last feature map; the keys of ``forward_features``.
_STAGE_STRIDES = (4, 8, 16, 32)
_FEATURE_KEYS = {8: "stride8", 16: "stride16", 32: "stride32"}


# A bottleneck's layers as one compiled call in inference (slimops.nn.EvalChain; slot 0 is
# the block's input): without and with the projection shortcut.
_IDENTITY_CHAIN = EvalChain([("conv1", 0, None), ("conv2", 1, None), ("conv3", 2, 0)])
_PROJECTION_CHAIN = EvalChain([("shortcut", 0, None), ("conv1", 0, None), ("conv2", 2, None),
                               ("conv3", 3, 1)])


class Bottleneck(nn.Module):
    """``relu(conv3(conv2(conv1(x))) + shortcut(x))``, each conv with its switchable BN.

    Args:
        cin, cout: per-width input and output channel counts (ascending widths).
        stride: 1 or 2, applied by the 3x3 conv and by the projection shortcut.
        widths: the width switches.

    The projection shortcut (1x1 conv + S-BN, no activation) exists when the block changes
    the resolution or the channel counts, as in the original; its output (or ``x`` itself) is
    passed as ``residual`` to ``conv3`` so the add and the ReLU run in that conv's epilogue.
    """

    def __init__(self, cin: ChannelRule, cout: ChannelRule, stride: int,
                 widths: Sequence[float]) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"Bottleneck: stride must be 1 or 2, got {stride}")
        mid = cout // _EXPANSION
        self.conv1 = SlimConvBNAct(cin, mid, 1, widths=widths)
        self.conv2 = SlimConvBNAct(mid, mid, 3, stride, widths=widths)
        self.conv3 = SlimConvBNAct(mid, cout, 1, widths=widths)
        self.shortcut: Optional[SlimConvBNAct] = None
        if stride != 1 or cin != cout:
            self.shortcut = SlimConvBNAct(cin, cout, 1, stride, activation=None, widths=widths)

    def eval_chain(self) -> EvalChain:
        """The layers this block's ``forward`` runs, as an ``EvalChain``."""
        return _IDENTITY_CHAIN if self.shortcut is None else _PROJECTION_CHAIN

    @runs_eval_chain
    def forward(self, x: Tensor) -> Tensor:
        out = self.eval_chain()(self, x)
        if out is not None:
            return out
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.conv3(self.conv2(self.conv1(x)), residual)


class SResNet(ChecksBNWidthsOnLoad, FeatureInfoMixin, nn.Module):
    """Slimmable ResNet with bottleneck blocks; build it with ``s_resnet50``.

    Attributes (modules): ``stem`` (7x7/2 conv + S-BN + ReLU), ``maxpool`` (3x3/2),
    ``layer1`` .. ``layer4`` (``nn.Sequential`` of ``Bottleneck``), ``pool`` (global
    average), ``classifier`` (``SlimmableLinear``, outputs never slim).

    ``feature_info``: the maps of ``forward_features`` (``FeatureInfo``: name, stride,
    module, channels per width); ``feature_channels(width)`` gives their channels at any
    width the model runs at.
    """

    def __init__(self, depth: int, widths: Sequence[float], num_classes: int) -> None:
        super().__init__()
        if depth not in _STAGE_BLOCKS:
            raise ValueError(f"S-ResNet depth {depth} is not provided; known: {sorted(_STAGE_BLOCKS)}")
        self.depth = depth
        self.widths = normalize_widths(widths)
        ws = self.widths
        # Channel rules (not per-width lists): the model also runs at any width between its
        # switches. The image's 3 channels are the same at every width.
        stem = ChannelRule(_STEM)
        self.stem = SlimConvBNAct(3, stem, 7, 2, widths=ws)
        self.maxpool = MaxPool2d(3, 2, 1)  # nn.MaxPool2d, faster in CPU eval (slimops.nn.pool)
        cin = stem
        self.stage_names: List[str] = []
        self._feature_taps: List[FeatureTap] = []
        for s, (n_blocks, mid) in enumerate(zip(_STAGE_BLOCKS[depth], _STAGE_MID)):
            cout = ChannelRule(mid * _EXPANSION)
            blocks = []
            for b in range(n_blocks):
                # Stage 1 keeps the max pool's resolution; the others halve it in block 0.
                stride = 2 if b == 0 and s > 0 else 1
                blocks.append(Bottleneck(cin, cout, stride, ws))
                cin = cout
            name = f"layer{s + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            stride = _STAGE_STRIDES[s]
            if stride in _FEATURE_KEYS:
                # The shortcut add and the ReLU keep conv3's channel count.
                self._feature_taps.append(FeatureTap(_FEATURE_KEYS[stride], stride, name,
                                                     f"{name}.{n_blocks - 1}.conv3"))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SlimmableLinear(cin, num_classes, widths=ws)
        init_like_original(self)
        self._init_feature_info()

    def forward_features(self, x: Tensor) -> Dict[str, Tensor]:
        """The last feature map at output strides 8, 16 and 32 (ends of stages 2, 3, 4), at
        the active width: keys ``"stride8"``, ``"stride16"``, ``"stride32"``."""
        return self._stages(self.maxpool(self.stem(x)))

    def _stages(self, x: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for name, stride in zip(self.stage_names, _STAGE_STRIDES):
            x = getattr(self, name)(x)
            if stride in _FEATURE_KEYS:
                out[_FEATURE_KEYS[stride]] = x
        return out

    def _chained_stages(self, x: Tensor) -> Optional[Tensor]:
        """The four stages' blocks on ``x`` as one compiled call in inference (each block's
        ``EvalChain``, one after another): the stride-32 map, or None where the modules
        must run (``slimops.nn.run_eval_chains``; a stage or block with a hook of its own,
        or replaced, is called as a module)."""
        if not chains_can_run():
            return None
        parts = []
        for name in self.stage_names:
            stage = getattr(self, name)
            blocks = block_chains(stage) if bypassable(stage) else None
            if blocks is None:
                return None
            parts += blocks
        return run_eval_chains(parts, x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]`` at the active width."""
        x = self.maxpool(self.stem(x))
        last = self._chained_stages(x)
        if last is None:
            last = self._stages(x)["stride32"]
        return self.classifier(torch.flatten(self.pool(last), 1))

    def _original_units(self) -> List[Tuple[SlimConvBNAct, str, str, str]]:
        """``(unit, our prefix, original conv prefix, original BN prefix)`` for every
        conv + S-BN unit, in the original's ``features`` order."""
        units = [(self.stem, "stem.", "features.0.0.", "features.0.1.")]
        k = 1  # features.0 is the stem; blocks follow, numbered across stages
        for name in self.stage_names:
            for b, block in enumerate(getattr(self, name)):
                ours, theirs = f"{name}.{b}.", f"features.{k}."
                # The original's body is Sequential(conv, bn, relu, conv, bn, relu, conv, bn).
                for conv, (ci, bi) in zip(("conv1", "conv2", "conv3"), ((0, 1), (3, 4), (6, 7))):
                    units.append((getattr(block, conv), f"{ours}{conv}.",
                                  f"{theirs}body.{ci}.", f"{theirs}body.{bi}."))
                if block.shortcut is not None:
                    units.append((block.shortcut, f"{ours}shortcut.",
                                  f"{theirs}shortcut.0.", f"{theirs}shortcut.1."))
                k += 1
        return units

    def convert_original_state_dict(self, sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Map an original S-ResNet state_dict (``module.`` prefix stripped) onto ours.

        The original keeps everything in ``features`` (``features.0`` the stem,
        ``features.{1..}`` the blocks with ``body.{0,3,6}`` convs, ``body.{1,4,7}.bn.{i}``
        S-BNs and ``shortcut.{0,1}``) and ``classifier.0``. A missing ``num_batches_tracked``
        (checkpoints of PyTorch < 0.4.1) becomes 0: it only drives ``momentum=None``.
        Raises ``CheckpointMismatchError`` for a missing key or a key nothing maps to.
        """
        out: Dict[str, Tensor] = {}
        used = set()

        def put(ours: str, theirs: str, optional: bool = False) -> None:
            if optional and theirs not in sd:
                out[ours] = torch.zeros((), dtype=torch.long)
                return
            out[ours] = take(sd, theirs)
            used.add(theirs)

        for unit, ours, conv, bn in self._original_units():
            put(f"{ours}conv.weight", f"{conv}weight")
            for i in range(len(unit.bn.bn)):
                for field in ("weight", "bias", "running_mean", "running_var"):
                    put(f"{ours}bn.bn.{i}.{field}", f"{bn}bn.{i}.{field}")
                put(f"{ours}bn.bn.{i}.num_batches_tracked", f"{bn}bn.{i}.num_batches_tracked",
                    optional=True)
        put("classifier.weight", "classifier.0.weight")
        put("classifier.bias", "classifier.0.bias")
        unused = [k for k in sd if k not in used]
        if unused:
            raise CheckpointMismatchError(
                f"checkpoint has an unexpected key {unused[0]!r} (not part of S-ResNet-"
                f"{self.depth} with {len(self.widths)} widths)"
            )
        return out


def s_resnet50(widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
               num_classes: int = 1000) -> SResNet:
    """S-ResNet-50: 25.5M conv + FC parameters at full width; 4.1G / 2.3G / 1.1G / 278M
    MACs at 1.0x / 0.75x / 0.5x / 0.25x on a 224x224 input (the paper's Table 3)."""
    return SResNet(50, widths, num_classes)
