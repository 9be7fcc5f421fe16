"""slimops.models.s_resnet: S-ResNet-50 against the paper's counts (Table 2 and 3), its
channel rules, forward passes at every width, and loading the original implementation's
checkpoints (an independent re-implementation of the original's structure below).

The paper's MACs are printed to 2-3 significant figures (4.1G / 2.3G / 1.1G / 278M); the
original's own profiler (utils/model_profiling.py) counts conv + FC + average pooling, as
``slimops.profile`` does. At 0.5x that count is 1.052G, which the paper prints as "1.1G"
(2 significant figures) but which is 4.3% below 1.1G: the 1% check is an expected failure
there, and every width is checked to round to the printed figure and to equal an analytic
count.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimops.models._original import CheckpointMismatchError, load_original
from slimops.models.s_resnet import Bottleneck, SResNet, s_resnet50
from slimops.nn import SlimmableConv2d
from slimops.profile import profile
from slimops.width import channels, set_width, width

from original_layers import original_checkpoint, randomize_bn_state

WIDTHS = (0.25, 0.5, 0.75, 1.0)
BLOCKS = (3, 4, 6, 3)  # ResNet-50's bottleneck blocks per stage
MID = (64, 128, 256, 512)  # full-width bottleneck channels per stage (outputs: 4x)

# Table 2 (largest width) and Table 3 of the paper.
PAPER_PARAMS = 25_503_912
PAPER_BN_PARAMS = 53_120
PAPER_MACS = {1.0: 4.1e9, 0.75: 2.3e9, 0.5: 1.1e9, 0.25: 278e6}
# The precision each MAC figure is printed with (half a unit of the last digit).
PAPER_MACS_HALF_UNIT = {1.0: 0.05e9, 0.75: 0.05e9, 0.5: 0.05e9, 0.25: 0.5e6}
# Table 3's parameter counts of the individually trained networks (0.1M precision):
# conv + FC at that width, which is what the slimmable model runs at that switch.
PAPER_PARAMS_M = {1.0: 25.5, 0.75: 14.7, 0.5: 6.9, 0.25: 2.0}

SMALL = (2, 3, 64, 64)  # the forward tests' input: keeps ResNet-50 cheap on the CPU


def analytic_counts(w: float, hw: int = 224, num_classes: int = 1000):
    """(conv+FC params, BN params, MACs) of ResNet-50 at width ``w``, from its layer list."""
    c = lambda n: max(1, int(n * w))  # noqa: E731  the ResNet rule: truncate
    s = hw // 2
    c0 = c(64)
    params, bn, macs = 3 * c0 * 49, 2 * c0, 3 * c0 * 49 * s * s
    s, cin = s // 2, c0  # the max pool
    for stage, (n, mid) in enumerate(zip(BLOCKS, MID)):
        cout = c(4 * mid)
        m = cout // 4
        for b in range(n):
            so = s // 2 if b == 0 and stage > 0 else s
            convs = [(cin * m, s), (m * m * 9, so), (m * cout, so)]
            bn += 2 * (m + m + cout)
            if b == 0:
                convs.append((cin * cout, so))
                bn += 2 * cout
            params += sum(p for p, _ in convs)
            macs += sum(p * r * r for p, r in convs)
            s, cin = so, cout
    macs += cin * s * s + cin * num_classes  # average pooling + classifier
    params += cin * num_classes + num_classes
    return params, bn, macs


@pytest.fixture(scope="module")
def model() -> SResNet:
    return s_resnet50()


@pytest.fixture(scope="module")
def rows(model):
    """slimops.profile at 224x224: one forward per width (the expensive part, done once)."""
    return {r.width: r for r in profile(model, (1, 3, 224, 224))}


# ---------------------------------------------------------------------------- fidelity


def test_params_at_full_width_are_the_papers(rows):
    assert rows[1.0].params == PAPER_PARAMS
    assert rows[1.0].bn_params == PAPER_BN_PARAMS
    # ... which is torchvision's ResNet-50 (25,557,032 with BN) minus its BN parameters.
    assert PAPER_PARAMS + PAPER_BN_PARAMS == 25_557_032


def test_total_parameters_of_the_slimmable_model(model):
    # Shared conv + FC once, plus a private BN per width: the paper's "S-ResNet-50 25.6M".
    total = sum(p.numel() for p in model.parameters())
    bn_all = sum(analytic_counts(w)[1] for w in WIDTHS)
    assert bn_all == 2 * PAPER_BN_PARAMS + PAPER_BN_PARAMS // 2  # 1/4 + 2/4 + 3/4 + 4/4
    assert total == PAPER_PARAMS + bn_all
    assert round(total / 1e6, 1) == 25.6


@pytest.mark.parametrize("w", WIDTHS)
def test_counts_per_width_match_the_analytic_count_and_the_paper(rows, w):
    params, bn, macs = analytic_counts(w)
    r = rows[w]
    assert (r.params, r.bn_params, r.macs) == (params, bn, macs)
    assert r.output_shape == (1, 1000)
    assert round(r.params / 1e6, 1) == PAPER_PARAMS_M[w]
    # Rounded to the precision the paper prints, the MACs are the paper's figure.
    assert abs(r.macs - PAPER_MACS[w]) <= PAPER_MACS_HALF_UNIT[w]


@pytest.mark.parametrize("w", [
    1.0, 0.75, 0.25,
    pytest.param(0.5, marks=pytest.mark.xfail(
        strict=True, reason="the paper's 1.1G is 1.052G rounded to 2 significant figures "
                            "(the original's own profiler gives 1,052,361,728): -4.3%")),
])
def test_macs_within_one_percent_of_the_paper(rows, w):
    assert abs(rows[w].macs / PAPER_MACS[w] - 1) <= 0.01


# ---------------------------------------------------------------------------- structure


def _blocks(m: SResNet) -> List[List[Bottleneck]]:
    return [list(getattr(m, name)) for name in m.stage_names]


def test_channel_rules(model):
    ws = model.widths
    assert ws == WIDTHS
    # The image's 3 channels never slim; the stem truncates int(64 w).
    assert model.stem.conv.in_channels_list == [3] * 4
    assert model.stem.conv.out_channels_list == [16, 32, 48, 64]
    # The classifier's outputs never slim; its inputs are the last stage's int(2048 w).
    assert model.classifier.in_features_list == [512, 1024, 1536, 2048]
    assert model.classifier.out_features_list == [1000] * 4
    # Every other channel count of every conv is channels(c, widths) with divisor=None.
    for name, m in model.named_modules():
        if isinstance(m, SlimmableConv2d) and m is not model.stem.conv:
            assert m.in_channels_list == channels(m.in_channels, ws), name
            assert m.out_channels_list == channels(m.out_channels, ws), name
            assert m.groups == 1 and not m.depthwise and m.bias is None, name


def test_block_structure(model):
    stages = _blocks(model)
    assert [len(s) for s in stages] == list(BLOCKS)
    cin = 64
    for s, blocks in enumerate(stages):
        for b, block in enumerate(blocks):
            stride = 2 if b == 0 and s > 0 else 1
            cout = 4 * MID[s]
            convs = [block.conv1.conv, block.conv2.conv, block.conv3.conv]
            assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
            # The stride sits on the 3x3 conv, as in the original.
            assert [c.stride for c in convs] == [(1, 1), (stride, stride), (1, 1)]
            assert [c.padding for c in convs] == [(0, 0), (1, 1), (0, 0)]
            assert (convs[0].in_channels, convs[0].out_channels) == (cin, MID[s])
            assert (convs[2].in_channels, convs[2].out_channels) == (MID[s], cout)
            assert convs[0].out_channels_list == [c // 4 for c in convs[2].out_channels_list]
            assert [block.conv1.activation, block.conv2.activation,
                    block.conv3.activation] == ["relu", "relu", "relu"]
            # Projection shortcut exactly on each stage's first block, at the block's stride.
            if b == 0:
                assert block.shortcut is not None and block.shortcut.activation is None
                sc = block.shortcut.conv
                assert (sc.kernel_size, sc.stride) == ((1, 1), (stride, stride))
                assert (sc.in_channels, sc.out_channels) == (cin, cout)
            else:
                assert block.shortcut is None
            cin = cout
    assert model.stem.conv.kernel_size == (7, 7) and model.stem.conv.stride == (2, 2)


def test_residual_is_fused_into_the_last_conv(model, monkeypatch):
    """The block hands the shortcut to conv3 as ``residual`` (add + ReLU in its epilogue)."""
    block = model.layer2[1]
    seen = {}
    original = type(block.conv3).forward

    def spy(self, x, residual=None):
        seen["residual"] = residual
        return original(self, x, residual)

    monkeypatch.setattr(type(block.conv3), "forward", spy)
    x = torch.randn(1, 512, 4, 4)
    with torch.no_grad():
        block.eval()(x)
    assert seen["residual"] is x


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_feature_channels_truncate_with_the_width(model, train):
    # (the output's shape and the classifier on the pooled stride-32 map: the contract)
    x = torch.randn(*SMALL)
    model.train(train)
    try:
        for w in WIDTHS:
            with width(model, w), torch.no_grad():
                feats = model.forward_features(x)
            assert list(feats) == ["stride8", "stride16", "stride32"]
            for key, full in (("stride8", 512), ("stride16", 1024), ("stride32", 2048)):
                stride = int(key[len("stride"):])
                assert feats[key].shape == (2, int(full * w), 64 // stride, 64 // stride), key
                assert torch.isfinite(feats[key]).all()
    finally:
        model.eval()


def test_backward_reaches_the_shared_weight_prefix():
    m = s_resnet50(widths=(0.25, 1.0), num_classes=10).train()
    set_width(m, 0.25)
    m(torch.randn(*SMALL)).square().mean().backward()
    w = m.layer3[0].conv2.conv.weight  # 256x256x3x3 at full width, 64x64 used at 0.25
    assert torch.isfinite(w.grad).all()
    assert w.grad[:64, :64].abs().sum() > 0
    assert w.grad[64:].abs().sum() == 0 and w.grad[:, 64:].abs().sum() == 0
    assert m.classifier.bias.grad.abs().sum() > 0


def test_custom_width_list():
    m = s_resnet50(widths=(1.0, 0.3, 0.6), num_classes=10).eval()
    assert m.widths == (0.3, 0.6, 1.0)
    assert m.stem.conv.out_channels_list == [19, 38, 64]
    assert m.layer4[0].conv3.conv.out_channels_list == [614, 1228, 2048]
    assert m.layer4[0].conv2.conv.out_channels_list == [153, 307, 512]
    assert m.classifier.out_features_list == [10, 10, 10]
    x = torch.randn(*SMALL)
    for w in m.widths:
        with width(m, w), torch.no_grad():
            assert m(x).shape == (2, 10)
            assert m.forward_features(x)["stride32"].shape == (2, int(2048 * w), 2, 2)


def test_unknown_depth_is_refused():
    with pytest.raises(ValueError, match="depth 18"):
        SResNet(18, WIDTHS, 1000)


# ---------------------------------------------------------------------------- original checkpoints
# A minimal re-implementation of the original's structure and key names (plain torch): every
# conv slices its shared weight, every S-BN is a ModuleList `bn` of per-width BatchNorm2d,
# the active width is an index set on every layer.


class OrigConv(nn.Conv2d):
    def __init__(self, cin: List[int], cout: List[int], k: int, stride: int = 1, pad: int = 0):
        super().__init__(max(cin), max(cout), k, stride, pad, bias=False)
        self.cin, self.cout, self.idx = cin, cout, len(cin) - 1

    def forward(self, x):
        w = self.weight[:self.cout[self.idx], :self.cin[self.idx]]
        return F.conv2d(x, w, None, self.stride, self.padding)


class OrigBN(nn.Module):
    def __init__(self, cs: List[int]):
        super().__init__()
        self.bn = nn.ModuleList(nn.BatchNorm2d(c) for c in cs)
        self.idx = len(cs) - 1

    def forward(self, x):
        return self.bn[self.idx](x)


class OrigLinear(nn.Linear):
    def __init__(self, fin: List[int], fout: List[int]):
        super().__init__(max(fin), max(fout))
        self.fin, self.fout, self.idx = fin, fout, len(fin) - 1

    def forward(self, x):
        i = self.idx
        return F.linear(x, self.weight[:self.fout[i], :self.fin[i]], self.bias[:self.fout[i]])


class OrigBlock(nn.Module):
    def __init__(self, inp: List[int], outp: List[int], stride: int):
        super().__init__()
        mid = [c // 4 for c in outp]
        self.body = nn.Sequential(
            OrigConv(inp, mid, 1), OrigBN(mid), nn.ReLU(),
            OrigConv(mid, mid, 3, stride, 1), OrigBN(mid), nn.ReLU(),
            OrigConv(mid, outp, 1), OrigBN(outp),
        )
        self.identity = stride == 1 and inp == outp
        if not self.identity:
            self.shortcut = nn.Sequential(OrigConv(inp, outp, 1, stride), OrigBN(outp))

    def forward(self, x):
        return F.relu(self.body(x) + (x if self.identity else self.shortcut(x)))


class OrigResNet50(nn.Module):
    def __init__(self, widths, num_classes: int = 1000, input_size: int = 64):
        super().__init__()
        c = [int(64 * w) for w in widths]
        layers = [nn.Sequential(OrigConv([3] * len(widths), c, 7, 2, 3), OrigBN(c), nn.ReLU(),
                                nn.MaxPool2d(3, 2, 1))]
        for stage, n in enumerate(BLOCKS):
            outp = [int(MID[stage] * w * 4) for w in widths]
            for i in range(n):
                layers.append(OrigBlock(c, outp, 2 if i == 0 and stage > 0 else 1))
                c = outp
        layers.append(nn.AvgPool2d(input_size // 32))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(OrigLinear(c, [num_classes] * len(widths)))

    def set_index(self, i: int) -> None:
        for m in self.modules():
            if hasattr(m, "idx"):
                m.idx = i

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(-1, x.shape[1]))


def _randomize(model: nn.Module) -> nn.Module:
    """Random weights and BN state, scaled so 16 residual blocks neither explode nor vanish."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (1.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
                m.bias.normal_()
    return randomize_bn_state(model, gamma=(0.2, 1.0), std=0.2)


@pytest.fixture(scope="module")
def original() -> OrigResNet50:
    torch.manual_seed(1)
    return _randomize(OrigResNet50(WIDTHS)).eval()


def test_stored_parameters_equal_the_originals(original):
    ours = sum(p.numel() for p in s_resnet50().parameters())
    assert ours == sum(p.numel() for p in original.parameters()) == 25_636_712


@pytest.fixture(scope="module")
def checkpoint(original, tmp_path_factory):
    """The original's checkpoint layout: {'model': DataParallel state_dict}."""
    path = tmp_path_factory.mktemp("ckpt") / "s_resnet50.pt"
    torch.save(original_checkpoint(original.state_dict(), last_epoch=99), path)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint) -> SResNet:
    return load_original(s_resnet50(), checkpoint).eval()


def _original_features(original: OrigResNet50, x) -> Dict[str, torch.Tensor]:
    # features: 0 stem, 1-3 stage 1, 4-7 stage 2, 8-13 stage 3, 14-16 stage 4.
    out = {}
    hooks = [original.features[i].register_forward_hook(
        lambda mod, inp, o, key=key: out.__setitem__(key, o))
        for i, key in ((7, "stride8"), (13, "stride16"), (16, "stride32"))]
    try:
        logits = original(x)
    finally:
        for h in hooks:
            h.remove()
    return {"logits": logits, **out}


def test_original_state_dict_layout(original):
    keys = original.state_dict().keys()
    assert "features.0.0.weight" in keys and "features.0.1.bn.3.running_var" in keys
    assert "features.1.shortcut.0.weight" in keys and "features.2.shortcut.0.weight" not in keys
    assert "features.16.body.7.bn.0.num_batches_tracked" in keys
    assert "classifier.0.bias" in keys


def test_loaded_checkpoint_matches_the_original_at_every_width(original, loaded):
    x = torch.randn(*SMALL)
    for i, w in enumerate(WIDTHS):
        original.set_index(i)
        with torch.no_grad():
            ref = _original_features(original, x)
            with width(loaded, w):
                feats = loaded.forward_features(x)
                out = loaded(x)
        assert ref["logits"].abs().max() > 0.1  # a meaningful comparison, not all ~0
        torch.testing.assert_close(out, ref["logits"], rtol=1e-4,
                                   atol=1e-4 * float(ref["logits"].abs().max()))
        for key, got in feats.items():
            torch.testing.assert_close(got, ref[key], rtol=1e-4,
                                       atol=1e-4 * float(ref[key].abs().max()))


def test_loaded_checkpoint_trains_like_the_original(checkpoint):
    """Training mode (batch statistics, running-stat updates of the active width only) on a
    fresh copy of both: same outputs, and the same state afterwards."""
    torch.manual_seed(2)
    orig = _randomize(OrigResNet50(WIDTHS)).train()
    ours = load_original(s_resnet50(), {"model": orig.state_dict()}).train()
    x = torch.randn(*SMALL)
    for i, w in enumerate(WIDTHS):
        orig.set_index(i)
        with torch.no_grad(), width(ours, w):
            ref, out = orig(x), ours(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    expected = ours.convert_original_state_dict(orig.state_dict())
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_mismatched_shape_names_the_key_and_shapes(original):
    sd = dict(original.state_dict())
    sd["features.5.body.3.weight"] = torch.zeros(128, 64, 3, 3)
    with pytest.raises(CheckpointMismatchError,
                       match=r"layer2\.1\.conv2\.conv\.weight.*\(128, 128, 3, 3\).*\(128, 64, 3, 3\)"):
        load_original(s_resnet50(), sd)


def test_missing_key_is_named(original):
    sd = dict(original.state_dict())
    del sd["features.8.shortcut.1.bn.2.running_var"]
    with pytest.raises(CheckpointMismatchError, match=r"features\.8\.shortcut\.1\.bn\.2\.running_var"):
        load_original(s_resnet50(), sd)


def test_unexpected_key_and_wrong_width_count(original):
    sd = dict(original.state_dict())
    sd["features.2.shortcut.0.weight"] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'features\.2\.shortcut"):
        load_original(s_resnet50(), sd)
    # A checkpoint of a 4-width model does not load into a 3-width one (bn.3 left over).
    with pytest.raises(CheckpointMismatchError, match=r"bn\.3"):
        load_original(s_resnet50(widths=(0.25, 0.5, 1.0)), original.state_dict())


def test_old_checkpoints_without_num_batches_tracked_load(original):
    sd = {k: v for k, v in original.state_dict().items() if "num_batches_tracked" not in k}
    m = load_original(s_resnet50(), sd)
    assert int(m.stem.bn.bn[0].num_batches_tracked) == 0
    torch.testing.assert_close(m.stem.bn.bn[2].running_var,
                               original.features[0][1].bn[2].running_var)
