"""S-ShuffleNet: slimmable ShuffleNet v1 with 3 groups (Yu et al., ICLR 2019, Table 3).

ShuffleNet v1 (g = 3, bottleneck = out / 4): a 3x3 stride-2 stem and a 3x3 stride-2 max pool,
then three stages of 4, 8 and 4 units with 240, 480 and 960 output channels at 1.0x. A unit is
a grouped 1x1 conv (BN, ReLU), a channel shuffle, a depthwise 3x3 conv (BN, no ReLU) and a
grouped 1x1 conv (BN); stride-1 units add the input before the final ReLU, stride-2 units
concatenate the ReLU'd main branch with a 3x3 stride-2 average pool of the input. Global
average pooling and a classifier (its outputs never slim) close the network.

Channels follow the original implementation (github.com/JiahuiYu/slimmable_networks,
``models/s_shufflenet.py``): ``int(c * w)`` (truncation), then *divided by the groups* to
get per-group counts. Every grouped 1x1 conv is one slimmable conv with ``groups=3`` whose
groups each use the channel prefix of their own block of the shared weight, which is exactly
the original's three separate slimmable convs (``a_0..a_2``, ``c_0..c_2``, ``head_0..2``)
with their outputs concatenated: ``convert_original_state_dict`` concatenates those weights
(and their switchable BNs) along the output channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from slimops.models._features import FeatureInfoMixin, FeatureTap
from slimops.models._original import CheckpointMismatchError, take
from slimops.nn import (
    AvgPool2d,
    ChecksBNWidthsOnLoad,
    MaxPool2d,
    SlimConvBNAct,
    SlimmableLinear,
)
from slimops.width import channels, normalize_widths

GROUPS = 3
# Bottleneck ratio: a unit's middle (depthwise) width is its output width / 4.
WIDTH_COMPRESS = 4
STEM_CHANNELS = 24
# (output channels at 1.0x, units); the first unit of each stage has stride 2.
STAGES = ((240, 4), (480, 8), (960, 4))
STAGE_NAMES = ("stage2", "stage3", "stage4")
# Output stride of each stage's last map; forward_features' keys are "stride{s}".
FEATURE_STRIDES = (8, 16, 32)
FEATURE_KEYS = tuple(f"stride{s}" for s in FEATURE_STRIDES)
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: ``[g0c0, g0c1, .., g1c0, ..]`` -> ``[g0c0, g1c0, ..]``.

    A view/transpose of the activation (one copy to make it contiguous), no weights.
    """
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _per_group(totals: Sequence[int]) -> List[int]:
    # The original divides a truncated total by the groups; at least one channel per group
    # so that tiny custom widths still build.
    return [max(1, t // GROUPS) for t in totals]


def _times_groups(per_group: Sequence[int]) -> List[int]:
    return [GROUPS * g for g in per_group]


@dataclass
class UnitChannels:
    """Per-width channel counts of one unit (lists in ascending width order)."""

    cin: List[int]  # unit input
    mid_group: List[int]  # per group of the first 1x1 conv's output (= depthwise width / 3)
    out_group: List[int]  # per group of the last 1x1 conv's output
    cout: List[int]  # unit output (main branch, plus the pooled input at stride 2)
    stride: int
    dense_first: bool  # the first 1x1 conv's groups each see the whole input


def unit_channels(widths: Sequence[float]) -> List[UnitChannels]:
    """The channel plan of the network's 16 units, per width.

    With widths where every count the original splits into 3 groups is divisible by 3 (the
    paper's 0.5x/1.0x/2.0x and most others), this is exactly the original's arithmetic:
    ``outp = int(c * w)``, middle = ``outp // 4``, per-group counts ``// 3``, and a stride-2
    unit's main branch produces ``outp - inp`` channels (the pooled input makes up the
    rest). For other widths the original would fail on a shape mismatch; here every total is
    instead ``3 * per-group`` (so shapes stay consistent at any width) and stride-1 units keep
    their input's channel count (their residual needs it).
    """
    ws = normalize_widths(widths)
    cin = _times_groups(_per_group(channels(STEM_CHANNELS, ws)))
    plan = []
    for stage, (c, units) in enumerate(STAGES):
        for i in range(units):
            stride = 2 if i == 0 else 1
            outp = channels(c, ws)
            mid_group = _per_group([o // WIDTH_COMPRESS for o in outp])
            if stride == 1:
                out_group = _per_group(cin)
                cout = _times_groups(out_group)
            else:
                out_group = _per_group([o - ci for o, ci in zip(outp, cin)])
                cout = [GROUPS * g + ci for g, ci in zip(out_group, cin)]
            # ShuffleNet does not group the first 1x1 conv of stage 2: its 24-channel input is
            # too narrow to split (the original tests `max(inp) == 24 * max(widths)`, which is
            # this unit whenever 24 * max(widths) is an integer).
            plan.append(UnitChannels(cin, mid_group, out_group, cout, stride,
                                     dense_first=stage == 0 and i == 0))
            cin = cout
    return plan


class ShuffleUnit(nn.Module):
    """One ShuffleNet v1 unit; see the module docstring.

    Submodules: ``a`` (grouped 1x1 conv + BN + ReLU), ``b`` (depthwise 3x3 conv + BN),
    ``c`` (grouped 1x1 conv + BN + ReLU, with the residual fused before the ReLU at stride 1)
    and, at stride 2, ``pool`` (the concatenated average-pooled shortcut).
    """

    def __init__(self, ch: UnitChannels, widths: Sequence[float]) -> None:
        super().__init__()
        self.dense_first = ch.dense_first
        mid = _times_groups(ch.mid_group)
        # Per-group prefixes over the *whole* input (the original's a_i each see all of x)
        # are, exactly, a grouped conv over the input repeated 3 times: group g reads copy g
        # and the first `inp` columns of its weight block. One activation copy of the
        # (narrow) stage-2 input; the weight is never copied, and the profile's count
        # cout * (cin / groups) is the true one.
        a_in = _times_groups(ch.cin) if ch.dense_first else ch.cin
        self.a = SlimConvBNAct(a_in, mid, 1, groups=GROUPS, activation="relu", widths=widths)
        self.b = SlimConvBNAct(mid, mid, 3, ch.stride, groups=max(mid), activation=None,
                               widths=widths)
        self.c = SlimConvBNAct(mid, _times_groups(ch.out_group), 1, groups=GROUPS,
                               activation="relu", widths=widths)
        # count_include_pad=True, as nn.AvgPool2d's default and the original
        # (slimops.nn.AvgPool2d: nn.AvgPool2d, faster in CPU eval).
        self.pool = AvgPool2d(3, 2, 1) if ch.stride == 2 else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x.repeat(1, GROUPS, 1, 1) if self.dense_first else x)
        y = self.b(channel_shuffle(y, GROUPS))
        if self.pool is None:
            return self.c(y, residual=x)  # ReLU(bn(conv) + x), one fused epilogue in eval
        return torch.cat([self.c(y), self.pool(x)], 1)


class ShuffleNetV1(ChecksBNWidthsOnLoad, FeatureInfoMixin, nn.Module):
    """Slimmable ShuffleNet v1 (3 groups); build it with ``s_shufflenet``.

    Submodules: ``stem`` (the 3x3 stride-2 conv + BN + ReLU, 3 output groups), ``maxpool``,
    ``stage2``/``stage3``/``stage4`` (``nn.Sequential`` of ``ShuffleUnit``), ``avgpool``,
    ``classifier``; ``widths``: the width switches, ascending.

    ``feature_info``: the maps of ``forward_features`` (``FeatureInfo``: name, stride,
    module, channels per width); ``feature_channels(width)`` gives their channels at every
    width the model runs at (its listed ones: the channels are per-width lists).
    """

    def __init__(self, widths: Sequence[float], num_classes: int) -> None:
        super().__init__()
        ws = normalize_widths(widths)
        self.widths = ws
        plan = unit_channels(ws)
        stem_out = plan[0].cin
        # The original's stem is 3 separate convs (3 -> 24w/3 each) whose outputs are
        # concatenated; at a width each takes its own prefix. Same trick as a unit's dense
        # first conv: a 3-group conv on the image repeated 3 times (9 channels; the image's 3
        # channels never slim).
        self.stem = SlimConvBNAct([GROUPS * 3] * len(ws), stem_out, 3, 2, padding=1,
                                  groups=GROUPS, activation="relu", widths=ws)
        # no padding, as the original; slimops.nn.MaxPool2d: nn.MaxPool2d, faster in CPU eval
        self.maxpool = MaxPool2d(kernel_size=3, stride=2)
        i = 0
        self._feature_taps: List[FeatureTap] = []
        for name, key, stride, (_, units) in zip(STAGE_NAMES, FEATURE_KEYS, FEATURE_STRIDES,
                                                 STAGES):
            setattr(self, name, nn.Sequential(*(ShuffleUnit(ch, ws) for ch in plan[i:i + units])))
            i += units
            # A stage ends with a stride-1 unit: its output is `c`'s (the residual add keeps
            # the count; only stride-2 units concatenate the pooled input).
            assert plan[i - 1].stride == 1
            self._feature_taps.append(FeatureTap(key, stride, name, f"{name}.{units - 1}.c"))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SlimmableLinear(plan[-1].cout, num_classes, widths=ws)
        self._init_feature_info()

    def forward_features(self, x: Tensor) -> Dict[str, Tensor]:
        """Feature maps at the active width: the last of each stage, keyed by its stride
        (``"stride8"``, ``"stride16"``, ``"stride32"``)."""
        x = self.maxpool(self.stem(x.repeat(1, GROUPS, 1, 1)))
        features = {}
        for name, key in zip(STAGE_NAMES, FEATURE_KEYS):
            x = getattr(self, name)(x)
            features[key] = x
        return features

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]`` at the active width."""
        x = self.forward_features(x)["stride32"]
        return self.classifier(torch.flatten(self.avgpool(x), 1))

    # -- loading checkpoints of the original implementation ---------------------------------

    def convert_original_state_dict(self, sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Map the original implementation's state_dict (``module.`` stripped) onto ours.

        The original's per-group convs (``head_i.0``, ``features.k.a_i.0``,
        ``features.k.c_i.0``) are concatenated along dim 0 into our grouped weight (group
        ``i`` = block ``i``), and their switchable BNs per width into ours: the same channel
        order as the original's ``torch.cat`` of the group outputs. A missing key, a group
        tensor of the wrong shape, or a key this model has no place for raises
        ``CheckpointMismatchError``.
        """
        ours = self.state_dict()
        out: Dict[str, Tensor] = {}
        used = set()

        def get(key: str, our_key: str, shape) -> Tensor:
            t = take(sd, key)
            used.add(key)
            if tuple(t.shape) != tuple(shape):
                raise CheckpointMismatchError(
                    f"shape mismatch for {key!r} (into {our_key!r}): the model expects "
                    f"{tuple(shape)}, the checkpoint has {tuple(t.shape)}"
                )
            return t

        def grouped(our_key: str, keys: List[str]) -> None:
            full = ours[our_key]
            if full.dim() == 0:  # num_batches_tracked: one counter, equal in every group
                out[our_key] = get(keys[0], our_key, ())
                for key in keys[1:]:
                    get(key, our_key, ())
                return
            piece = (full.shape[0] // len(keys),) + tuple(full.shape[1:])
            out[our_key] = torch.cat([get(k, our_key, piece) for k in keys], 0)

        def single(our_key: str, key: str) -> None:
            out[our_key] = get(key, our_key, ours[our_key].shape)

        def block(ours_prefix: str, orig: List[str], conv: str, bn: str) -> None:
            """A conv + switchable BN of ours from the original's (per-group) convs + BNs."""
            nb = len(self.get_submodule(ours_prefix).bn.bn)
            grouped(f"{ours_prefix}.conv.weight", [f"{o}.{conv}.weight" for o in orig])
            for j in range(nb):
                for t in BN_TENSORS:
                    grouped(f"{ours_prefix}.bn.bn.{j}.{t}", [f"{o}.{bn}.bn.{j}.{t}" for o in orig])

        groups = range(GROUPS)
        block("stem", [f"head_{g}" for g in groups], "0", "1")
        k = 0
        for name in STAGE_NAMES:
            for u in range(len(getattr(self, name))):
                p, f = f"{name}.{u}", f"features.{k}"
                block(f"{p}.a", [f"{f}.a_{g}" for g in groups], "0", "1")
                block(f"{p}.b", [f"{f}.b"], "1", "2")  # b.0 is the (weightless) shuffle
                block(f"{p}.c", [f"{f}.c_{g}" for g in groups], "0", "1")
                k += 1
        single("classifier.weight", "classifier.0.weight")
        single("classifier.bias", "classifier.0.bias")

        extra = sorted(set(sd) - used)
        if extra:
            raise CheckpointMismatchError(
                f"checkpoint has an unexpected key {extra[0]!r} (not an S-ShuffleNet of this "
                f"layout?)"
            )
        return out


def s_shufflenet(
    widths: Sequence[float] = (0.5, 1.0, 2.0), num_classes: int = 1000
) -> ShuffleNetV1:
    """S-ShuffleNet (ShuffleNet v1, 3 groups) at the paper's widths 0.5x, 1.0x, 2.0x.

    Args:
        widths: the width switches (any list; sorted ascending). Channels truncate
            ``int(c * w)`` and divide by the 3 groups, as the original implementation.
        num_classes: classifier outputs (never slim).
    """
    return ShuffleNetV1(widths, num_classes)
