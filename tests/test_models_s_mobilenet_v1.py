"""S-MobileNet v1 (models/s_mobilenet_v1.py): the channel rules, the backbone's feature
channels, and loading checkpoints of the original implementation (checked against an
independent re-implementation of its structure). What every model shares (the paper's
counts, fused convs, custom widths, running between the switches) is
tests/test_models_contract.py.
"""

from __future__ import annotations

from typing import List, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimops.models._original import CheckpointMismatchError, load_original
from slimops.models.s_mobilenet_v1 import s_mobilenet_v1
from slimops.width import width

from original_layers import (
    OrigConv,
    OrigSBN,
    Switch,
    assert_matches_original,
    original_checkpoint,
    seeded_original,
)

WIDTHS = (0.25, 0.5, 0.75, 1.0)
# MobileNet v1's body: (channels at 1.0x, blocks, first stride).
SETTING = [(64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2)]


def original_round(v: float, divisor: int = 8, min_value: int = 8) -> int:
    """The original v1's ``_make_divisible`` (nearest multiple of 8, at least 8, never more
    than 10% below ``v``), written out independently of slimops."""
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


# --- channel rules -----------------------------------------------------------------------

def _expected_channels(widths: Sequence[float]) -> List[List[int]]:
    """Per-layer per-width channel counts of the original: stem, then each block's output."""
    out = [[original_round(32 * w) for w in widths]]
    for c, n, _ in SETTING:
        out += [[original_round(c * w) for w in widths]] * n
    return out


@pytest.mark.parametrize("widths", [WIDTHS, (0.3, 0.6, 1.0)])
def test_channel_rules(widths):
    m = s_mobilenet_v1(widths)
    expected = _expected_channels(sorted(widths))
    n = len(widths)
    assert m.stem.conv.in_channels_list == [3] * n  # the image never slims
    assert m.stem.conv.out_channels_list == expected[0]
    assert len(m.blocks) == 13
    for block, cin, cout in zip(m.blocks, expected, expected[1:]):
        dw = block.depthwise.conv
        assert dw.depthwise and dw.groups == max(cin)
        assert dw.in_channels_list == dw.out_channels_list == cin
        assert block.pointwise.conv.in_channels_list == cin
        assert block.pointwise.conv.out_channels_list == cout
        assert block.depthwise.activation == block.pointwise.activation == "relu6"
    assert m.stem.activation == "relu6"
    assert m.classifier.in_features_list == expected[-1]
    assert m.classifier.out_features_list == [1000] * n  # the classes never slim
    assert isinstance(m.pool, nn.AdaptiveAvgPool2d)


def test_channel_values():
    m = s_mobilenet_v1()
    assert m.stem.conv.out_channels_list == [8, 16, 24, 32]
    assert m.blocks[-1].pointwise.conv.out_channels_list == [256, 512, 768, 1024]
    # 32 * 0.3 = 9.6 rounds to 8, more than 10% below: the rule takes 16.
    assert s_mobilenet_v1((0.3, 1.0)).stem.conv.out_channels_list == [16, 32]


# --- forward -----------------------------------------------------------------------------

def test_feature_channels_follow_the_original_rounding():
    model = s_mobilenet_v1().eval()
    x = torch.randn(2, 3, 64, 64)
    for w in WIDTHS:
        with width(model, w), torch.no_grad():
            feats = model.forward_features(x)
        assert set(feats) == {"stride8", "stride16", "stride32"}
        assert feats["stride8"].shape == (2, original_round(256 * w), 8, 8)
        assert feats["stride16"].shape == (2, original_round(512 * w), 4, 4)
        assert feats["stride32"].shape == (2, original_round(1024 * w), 2, 2)


# --- loading original checkpoints --------------------------------------------------------
# An independent minimal re-implementation of the original's module structure and key
# names (models/s_mobilenet_v1.py and models/slimmable_ops.py of JiahuiYu/slimmable_networks),
# in plain torch: each layer slices the prefix of its weight for the current width index.

class OrigLinear(nn.Linear):
    def __init__(self, sw, ins, outs):
        super().__init__(max(ins), max(outs))
        self.sw, self.ins, self.outs = sw, ins, outs

    def forward(self, x):
        i = self.sw.idx
        return F.linear(x, self.weight[:self.outs[i], :self.ins[i]], self.bias[:self.outs[i]])


class OrigDepthwiseSeparable(nn.Module):
    def __init__(self, sw, inp, outp, stride):
        super().__init__()
        self.body = nn.Sequential(
            OrigConv(sw, inp, inp, 3, stride, 1, groups_list=inp), OrigSBN(sw, inp), nn.ReLU6(),
            OrigConv(sw, inp, outp, 1, 1, 0), OrigSBN(sw, outp), nn.ReLU6(),
        )

    def forward(self, x):
        return self.body(x)


class OrigMobileNetV1(nn.Module):
    def __init__(self, sw, num_classes=1000, input_size=224):
        super().__init__()
        ch = [original_round(32 * w) for w in sw.widths]
        layers = [nn.Sequential(OrigConv(sw, [3] * len(ch), ch, 3, 2, 1), OrigSBN(sw, ch),
                                nn.ReLU6())]
        for c, n, s in SETTING:
            outp = [original_round(c * w) for w in sw.widths]
            for i in range(n):
                layers.append(OrigDepthwiseSeparable(sw, ch, outp, s if i == 0 else 1))
                ch = outp
        layers.append(nn.AvgPool2d(input_size // 32))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(OrigLinear(sw, ch, [num_classes] * len(ch)))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(-1, x.size(1)))


def _original(widths=WIDTHS, num_classes=1000):
    return seeded_original(OrigMobileNetV1, widths, num_classes)


def _checkpoint(orig):
    return original_checkpoint(orig.state_dict())


def test_stored_parameters_equal_the_originals():
    ours = sum(p.numel() for p in s_mobilenet_v1().parameters())
    original = sum(p.numel() for p in OrigMobileNetV1(Switch(WIDTHS)).parameters())
    assert ours == original == 4_264_808


def test_loads_original_checkpoint(tmp_path, tol):
    sw, orig = _original()
    path = tmp_path / "s_mobilenet_v1.pt"
    torch.save(_checkpoint(orig), path)
    model = load_original(s_mobilenet_v1(), path).eval()
    outs = assert_matches_original(model, orig, sw, WIDTHS, torch.randn(2, 3, 64, 64), tol)
    assert not torch.allclose(outs[0], outs[-1])  # the widths really differ


def test_loads_into_custom_widths(tol):
    sw, orig = _original(widths=(0.3, 1.0), num_classes=10)
    model = load_original(s_mobilenet_v1((0.3, 1.0), num_classes=10), _checkpoint(orig)).eval()
    assert_matches_original(model, orig, sw, (0.3, 1.0), torch.randn(1, 3, 64, 64), tol)


def test_mismatched_checkpoints():
    _, orig = _original()
    ckpt = _checkpoint(orig)
    sd = ckpt["model"]
    key = "module.features.2.body.3.weight"  # block 2's pointwise conv: (128, 64, 1, 1)
    bad = dict(sd, **{key: torch.zeros(128, 65, 1, 1)})
    with pytest.raises(CheckpointMismatchError,
                       match=r"features\.2\.body\.3\.weight.*\(128, 64, 1, 1\).*\(128, 65, 1, 1\)"):
        load_original(s_mobilenet_v1(), {"model": bad})
    missing = {k: v for k, v in sd.items() if k != "module.features.0.1.bn.3.running_var"}
    with pytest.raises(CheckpointMismatchError, match=r"features\.0\.1\.bn\.3\.running_var"):
        load_original(s_mobilenet_v1(), {"model": missing})
    extra = dict(sd, **{"module.features.14.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'features\.14\.weight'"):
        load_original(s_mobilenet_v1(), {"model": extra})
    # a checkpoint trained with other switches, or for another class count
    with pytest.raises(CheckpointMismatchError):
        load_original(s_mobilenet_v1((0.5, 1.0)), ckpt)
    with pytest.raises(CheckpointMismatchError, match=r"classifier\.0\.weight"):
        load_original(s_mobilenet_v1(num_classes=10), ckpt)
