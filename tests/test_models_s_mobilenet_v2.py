"""S-MobileNet v2 (models/s_mobilenet_v2.py): the channel rules (expansion at each width,
the unslimmed 1280-channel tail and its shared BN), the fused residual, the backbone's
feature channels, and loading checkpoints of the original implementation (checked against
an independent re-implementation of its structure). What every model shares (the paper's
counts, fused convs, custom widths, running between the switches) is
tests/test_models_contract.py.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import pytest
import torch
from torch import nn

from slimops.models._original import CheckpointMismatchError, load_original
from slimops.models.s_mobilenet_v2 import s_mobilenet_v2
from slimops.nn import SlimConvBNAct
from slimops.width import width

from original_layers import (
    OrigConv,
    OrigSBN,
    Switch,
    assert_matches_original,
    original_checkpoint,
    seeded_original,
)

WIDTHS = (0.35, 0.5, 0.75, 1.0)
# MobileNet v2's body: (expand ratio, channels at 1.0x, blocks, first stride).
SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1)]


def original_round(v: float, divisor: int = 8, min_value: int = 1) -> int:
    """The original v2's ``_make_divisible`` (nearest multiple of 8, never more than 10% below
    ``v``; ``min_value=1`` unlike v1), written out independently of slimops."""
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def original_blocks(widths: Sequence[float]) -> List[Tuple[List[int], List[int], int, int]]:
    """(input channels, output channels, stride, expand ratio) of each block, per width."""
    cin = [original_round(32 * w) for w in widths]
    out = []
    for t, c, n, s in SETTING:
        cout = [original_round(c * w) for w in widths]
        for i in range(n):
            out.append((cin, cout, s if i == 0 else 1, t))
            cin = cout
    return out


@pytest.fixture(scope="module")
def model():
    return s_mobilenet_v2()


# --- channel rules -----------------------------------------------------------------------

@pytest.mark.parametrize("widths", [WIDTHS, (0.1, 0.6, 1.0)])
def test_channel_rules(widths):
    m = s_mobilenet_v2(widths)
    ws = sorted(widths)
    n = len(ws)
    assert m.stem.conv.in_channels_list == [3] * n  # the image never slims
    assert m.stem.conv.out_channels_list == [original_round(32 * w) for w in ws]
    expected = original_blocks(ws)
    assert len(m.blocks) == len(expected) == 17
    for block, (cin, cout, stride, t) in zip(m.blocks, expected):
        hidden = [t * c for c in cin]  # expansion of the input channels at each width
        if t == 1:
            assert block.expand is None
        else:
            assert block.expand.conv.in_channels_list == cin
            assert block.expand.conv.out_channels_list == hidden
            assert block.expand.activation == "relu6"
        dw = block.depthwise.conv
        assert dw.depthwise and dw.groups == max(hidden) and dw.stride == (stride, stride)
        assert dw.in_channels_list == dw.out_channels_list == hidden
        assert block.depthwise.activation == "relu6"
        assert block.project.conv.in_channels_list == hidden
        assert block.project.conv.out_channels_list == cout
        assert block.project.activation is None  # linear bottleneck
        assert block.use_residual == (stride == 1 and cin == cout)
    # the last conv and the classifier never slim
    assert m.last_conv.conv.in_channels_list == expected[-1][1]
    assert m.last_conv.conv.out_channels_list == [1280] * n
    assert m.classifier.in_features_list == [1280] * n
    assert m.classifier.out_features_list == [1000] * n
    assert isinstance(m.pool, nn.AdaptiveAvgPool2d)


def test_channel_values():
    m = s_mobilenet_v2()
    # 32 * 0.35 = 11.2 rounds to 8, more than 10% below: the rule takes 16 (so does the
    # original, and TF-slim).
    assert m.stem.conv.out_channels_list == [16, 16, 24, 32]
    assert m.blocks[0].project.conv.out_channels_list == [8, 8, 16, 16]
    assert m.blocks[1].expand.conv.out_channels_list == [48, 48, 96, 96]
    assert m.blocks[-1].project.conv.out_channels_list == [112, 160, 240, 320]
    assert sum(b.use_residual for b in m.blocks) == 10
    # A width above 1.0 widens the tail (the original's rule), still the same at every width.
    wide = s_mobilenet_v2((0.5, 1.4))
    assert wide.last_conv.conv.out_channels_list == [1792, 1792]
    assert wide.classifier.in_features_list == [1792, 1792]


def test_only_the_tail_bn_is_shared():
    # one BN per width in every block but the tail, whose one BN is shared (the original's)
    m = s_mobilenet_v2()
    fused = [x for x in m.modules() if isinstance(x, SlimConvBNAct)]
    assert [x for x in fused if x.bn.shared] == [m.last_conv]
    assert len(m.last_conv.bn.bn) == 1


def test_residual_fused_into_projection(model):
    """The residual goes to the projection's SlimConvBNAct (its epilogue), not a separate
    add after it."""
    seen = []
    hooks = [b.project.register_forward_pre_hook(
        lambda mod, args, b=b: seen.append((b.use_residual, len(args) > 1 and args[1] is not None)))
        for b in model.blocks]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 17 and all(res == passed for res, passed in seen)


# --- forward -----------------------------------------------------------------------------

def test_feature_channels_follow_the_original_rounding(model):
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    for w in WIDTHS:
        with width(model, w), torch.no_grad():
            feats = model.forward_features(x)
        assert set(feats) == {"stride8", "stride16", "stride32"}
        assert feats["stride8"].shape == (2, original_round(32 * w), 8, 8)
        assert feats["stride16"].shape == (2, original_round(96 * w), 4, 4)
        assert feats["stride32"].shape == (2, 1280, 2, 2)  # the tail never slims


# --- loading original checkpoints --------------------------------------------------------
# An independent minimal re-implementation of the original's module structure and key
# names (models/s_mobilenet_v2.py and models/slimmable_ops.py of JiahuiYu/slimmable_networks),
# in plain torch: each layer slices the prefix of its weight for the current width index.

class OrigInvertedResidual(nn.Module):
    def __init__(self, sw, inp, outp, stride, t):
        super().__init__()
        self.residual_connection = stride == 1 and inp == outp
        hidden = [i * t for i in inp]
        layers = []
        if t != 1:
            layers += [OrigConv(sw, inp, hidden, 1, 1, 0), OrigSBN(sw, hidden), nn.ReLU6()]
        layers += [OrigConv(sw, hidden, hidden, 3, stride, 1, groups_list=hidden),
                   OrigSBN(sw, hidden), nn.ReLU6(),
                   OrigConv(sw, hidden, outp, 1, 1, 0), OrigSBN(sw, outp)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x) + x if self.residual_connection else self.body(x)


class OrigMobileNetV2(nn.Module):
    def __init__(self, sw, num_classes=1000, input_size=224):
        super().__init__()
        ch = [original_round(32 * w) for w in sw.widths]
        top = max(sw.widths)
        self.outp = original_round(1280 * top) if top > 1.0 else 1280
        layers = [nn.Sequential(OrigConv(sw, [3] * len(ch), ch, 3, 2, 1), OrigSBN(sw, ch),
                                nn.ReLU6())]
        for cin, cout, stride, t in original_blocks(sw.widths):
            layers.append(OrigInvertedResidual(sw, cin, cout, stride, t))
        ch = cout
        # the tail: a conv to 1280 at every width and ONE plain BN shared by all widths
        layers.append(nn.Sequential(OrigConv(sw, ch, [self.outp] * len(ch), 1, 1, 0),
                                    nn.BatchNorm2d(self.outp), nn.ReLU6()))
        layers.append(nn.AvgPool2d(input_size // 32))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(self.outp, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).view(-1, self.outp))


def _original(widths=WIDTHS, num_classes=1000):
    return seeded_original(OrigMobileNetV2, widths, num_classes)


def _checkpoint(orig):
    return original_checkpoint(orig.state_dict())


def test_stored_parameters_equal_the_originals():
    # Every width's parameters as stored (shared weights once, each width's BN): the
    # original has one tail BN for all widths, so the count is 3,556,456, not 3,564,136.
    ours = sum(p.numel() for p in s_mobilenet_v2().parameters())
    original = sum(p.numel() for p in OrigMobileNetV2(Switch(WIDTHS)).parameters())
    assert ours == original == 3_556_456


def test_loads_original_checkpoint(tmp_path, tol):
    sw, orig = _original()
    path = tmp_path / "s_mobilenet_v2.pt"
    torch.save(_checkpoint(orig), path)
    model = load_original(s_mobilenet_v2(), path).eval()
    # the original's one tail BN is ours
    tail = orig.features[18][1]
    for bn in model.last_conv.bn.bn:
        torch.testing.assert_close(bn.running_var, tail.running_var, rtol=0, atol=0)
    outs = assert_matches_original(model, orig, sw, WIDTHS, torch.randn(2, 3, 64, 64), tol)
    assert not torch.allclose(outs[0], outs[-1])  # the widths really differ


def test_loads_into_custom_widths(tol):
    widths = (0.1, 0.6, 1.4)  # 0.1: the original's odd 9-channel layers; 1.4: a wider tail
    sw, orig = _original(widths=widths, num_classes=10)
    model = load_original(s_mobilenet_v2(widths, num_classes=10), _checkpoint(orig)).eval()
    assert_matches_original(model, orig, sw, widths, torch.randn(1, 3, 64, 64), tol)


def test_mismatched_checkpoints():
    _, orig = _original()
    ckpt = _checkpoint(orig)
    sd = ckpt["model"]
    key = "module.features.2.body.0.weight"  # block 2's expansion conv: (96, 16, 1, 1)
    bad = dict(sd, **{key: torch.zeros(96, 17, 1, 1)})
    with pytest.raises(CheckpointMismatchError,
                       match=r"features\.2\.body\.0\.weight.*\(96, 16, 1, 1\).*\(96, 17, 1, 1\)"):
        load_original(s_mobilenet_v2(), {"model": bad})
    missing = {k: v for k, v in sd.items() if k != "module.features.18.1.running_mean"}
    with pytest.raises(CheckpointMismatchError, match=r"features\.18\.1\.running_mean"):
        load_original(s_mobilenet_v2(), {"model": missing})
    extra = dict(sd, **{"module.features.19.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'features\.19\.weight'"):
        load_original(s_mobilenet_v2(), {"model": extra})
    with pytest.raises(CheckpointMismatchError):  # trained with other switches
        load_original(s_mobilenet_v2((0.5, 1.0)), ckpt)
