"""S-ShuffleNet (models/s_shufflenet.py): fidelity to the paper's counts, channel rules,
forward at every width, and loading checkpoints of the original implementation.

The original's layout is re-implemented below (``Orig*``) in plain PyTorch from reading
github.com/JiahuiYu/slimmable_networks ``models/s_shufflenet.py`` and ``slimmable_ops.py``:
each group of a grouped 1x1 conv is its own slimmable conv slicing ``w[:out, :in]``, every BN
is a ``ModuleList`` ``bn`` of per-width ``nn.BatchNorm2d``, group outputs are concatenated.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimops
from slimops.models._original import CheckpointMismatchError, load_original
from slimops.models.s_shufflenet import ShuffleNetV1, s_shufflenet, unit_channels
from slimops.nn import SlimConvBNAct, SlimmableConv2d
from slimops.width import set_width

from original_layers import original_checkpoint, randomize_bn_state

# The paper's widths (its parameter and MAC counts: tests/test_models_contract.py).
PAPER_WIDTHS = (0.5, 1.0, 2.0)
# The original's block_setting: (channels at 1.0x, stride) of its 16 units.
ORIGINAL_BLOCK_SETTING = ([(240, 2)] + [(240, 1)] * 3 + [(480, 2)] + [(480, 1)] * 7
                          + [(960, 2)] + [(960, 1)] * 3)


# --------------------------------------------------------------------------------------------
# channel rules

def original_plan(widths):
    """The original's channel arithmetic, per unit: (inp, midp, block_outp, outp, first_group)."""
    ws = sorted(widths)
    inp = [int(24 * w) for w in ws]
    plan = []
    for c, s in ORIGINAL_BLOCK_SETTING:
        outp = [int(c * w) for w in ws]
        residual = s == 1 and inp == outp
        block_outp = outp if residual else [o - i for o, i in zip(outp, inp)]
        first_group = 1 if s == 2 and max(inp) == 24 * max(ws) else 3
        plan.append((inp, [o // 4 for o in outp], block_outp, outp, first_group))
        inp = outp
    return plan


def original_stored_parameters(widths, num_classes=1000):
    """The parameters the original's S-ShuffleNet stores, counted from its structure: three
    stem convs (3 -> int(24w)/3, 3x3) with switchable BNs; per unit three group convs
    (inp/first_group -> midp/3, 1x1) + S-BNs, a depthwise 3x3 over midp + S-BN, three group
    convs (midp/3 -> block_outp/3) + S-BNs; a linear classifier with bias. Each conv is
    sized for the largest width, each S-BN holds γ and β for every width."""
    ws = sorted(widths)

    def sbn(counts):
        return sum(2 * c for c in counts)

    stem = [int(24 * w) // 3 for w in ws]
    total = 3 * (3 * 9 * max(stem) + sbn(stem))
    for inp, midp, block_outp, _, first_group in original_plan(ws):
        first = [m // 3 for m in midp]
        last = [b // 3 for b in block_outp]
        total += 3 * (max(inp) // first_group * max(first) + sbn(first))
        total += 9 * max(midp) + sbn(midp)
        total += 3 * (max(midp) // 3 * max(last) + sbn(last))
    channels = int(960 * max(ws))
    return total + channels * num_classes + num_classes


def test_stored_parameters_equal_the_originals():
    ours = sum(p.numel() for p in s_shufflenet().parameters())
    assert ours == original_stored_parameters(PAPER_WIDTHS) == 5_487_496


@pytest.mark.parametrize("widths", [PAPER_WIDTHS, (0.25, 0.75, 1.0)])
def test_channels_follow_the_original_arithmetic(widths):
    plan = unit_channels(widths)
    for ours, (inp, midp, block_outp, outp, first_group) in zip(plan, original_plan(widths)):
        assert ours.cin == inp
        assert [3 * g for g in ours.mid_group] == midp
        assert [3 * g for g in ours.out_group] == block_outp
        assert ours.cout == outp
        assert ours.dense_first == (first_group == 1)


def test_layer_channel_lists_at_paper_widths():
    m = s_shufflenet()
    # stem: the image's 3 channels never slim (repeated once per output group), 3 groups of
    # int(24 w) / 3 outputs
    assert m.stem.conv.in_channels_list == [9, 9, 9]
    assert m.stem.conv.out_channels_list == [12, 24, 48]
    assert m.stem.conv.groups == 3 and m.stem.conv.weight.shape == (48, 3, 3, 3)
    # first unit: dense first conv (input repeated per group), concat of the pooled input
    u = m.stage2[0]
    assert u.dense_first and u.a.conv.in_channels_list == [36, 72, 144]
    assert u.a.conv.out_channels_list == [30, 60, 120]
    assert u.b.conv.depthwise and u.b.conv.out_channels_list == [30, 60, 120]
    assert u.c.conv.out_channels_list == [108, 216, 432]  # outp - inp
    # stage outputs: int(c * w)
    for stage, c in ((m.stage2, 240), (m.stage3, 480), (m.stage4, 960)):
        assert stage[-1].c.conv.out_channels_list == [int(c * w) for w in PAPER_WIDTHS]
    assert m.classifier.in_features_list == [480, 960, 1920]
    assert m.classifier.out_features_list == [1000, 1000, 1000]  # never slims


def test_grouped_1x1_convs_are_single_grouped_ops():
    m = s_shufflenet()
    convs = [mod for mod in m.modules() if isinstance(mod, SlimmableConv2d)]
    # stem + 3 convs per unit, 16 units: one op per original group triple
    assert len(convs) == 1 + 3 * 16
    units = [u for s in (m.stage2, m.stage3, m.stage4) for u in s]
    for u in units:
        assert u.a.conv.groups == 3 and not u.a.conv.depthwise
        assert u.c.conv.groups == 3 and not u.c.conv.depthwise
        assert u.a.conv.kernel_size == u.c.conv.kernel_size == (1, 1)
        assert u.b.activation is None  # no ReLU after the depthwise conv
    assert all(isinstance(mod, SlimConvBNAct) for u in units for mod in (u.a, u.b, u.c))


def test_group_prefixes_get_gradients_only_in_their_block():
    """At 0.5x each group of the stem uses the first 4 of its 16 rows: per-group prefixes."""
    m = s_shufflenet(num_classes=10).train()
    set_width(m, 0.5)
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    used = m.stem.conv.weight.grad.flatten(1).abs().sum(1) != 0
    expect = torch.zeros(48, dtype=torch.bool)
    for g in range(3):
        expect[16 * g:16 * g + 4] = True
    assert torch.equal(used, expect)
    # the first unit's first conv: 3 blocks of 40 rows, 10 used each, all 12 input columns
    grad = m.stage2[0].a.conv.weight.grad.flatten(1)
    assert torch.equal(grad.abs().sum(1) != 0,
                       torch.cat([torch.arange(40) < 10] * 3))
    assert torch.equal(grad.abs().sum(0) != 0, torch.arange(48) < 12)


def test_eval_residual_is_fused_into_the_conv_epilogue():
    m = s_shufflenet(num_classes=10).eval()
    # The op calls as they happen (the inference fast path calls the op directly), with
    # their argument shapes: the residual is argument 10, empty when absent.
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        m(torch.randn(1, 3, 64, 64))
    calls = [e for e in prof.events() if e.name == "slimops::conv2d"]
    assert len(calls) == 1 + 2 * 16  # stem + two grouped 1x1 convs per unit
    assert sum(bool(e.input_shapes[10]) for e in calls) == 13  # the 16 - 3 stride-1 units


# --------------------------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("size", [64, 96])
def test_forward_features(size):
    m = s_shufflenet(num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    plan = unit_channels(PAPER_WIDTHS)
    last = {"stride8": plan[3], "stride16": plan[11], "stride32": plan[15]}
    with torch.no_grad():
        for i, w in enumerate(PAPER_WIDTHS):
            with slimops.width(m, w):
                feats = m.forward_features(x)
            assert list(feats) == ["stride8", "stride16", "stride32"]
            for key, unit in last.items():
                s = int(key[len("stride"):])
                assert feats[key].shape == (2, unit.cout[i], size // s, size // s), (w, key)


@pytest.mark.parametrize("widths", [(0.25, 0.75, 1.0), (1.3, 0.3), (1.0,)])
def test_custom_width_list(widths):
    m = s_shufflenet(widths, num_classes=10)
    assert isinstance(m, ShuffleNetV1)
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        m.train(mode)
        with torch.no_grad():
            for w in widths:
                with slimops.width(m, w):
                    assert m(x).shape == (2, 10)


# --------------------------------------------------------------------------------------------
# the original implementation's structure (for the loader)

class Switch:
    """The original's global FLAGS: the width list and the index of the active width."""

    def __init__(self, widths):
        self.widths = sorted(widths)
        self.idx = len(self.widths) - 1


class OrigConv(nn.Module):
    def __init__(self, sw, ins, outs, k, stride=1, padding=0, depthwise=False):
        super().__init__()
        self.sw, self.ins, self.outs = sw, ins, outs
        self.stride, self.padding, self.depthwise = stride, padding, depthwise
        fan_in = k * k * (1 if depthwise else max(ins))
        self.weight = nn.Parameter(
            torch.randn(max(outs), 1 if depthwise else max(ins), k, k) * (2.0 / fan_in) ** 0.5)

    def forward(self, x):
        o, i = self.outs[self.sw.idx], self.ins[self.sw.idx]
        w = self.weight[:o, :i]
        return F.conv2d(x, w, None, self.stride, self.padding, 1, o if self.depthwise else 1)


class OrigBN(nn.Module):
    def __init__(self, sw, features):
        super().__init__()
        self.sw = sw
        self.bn = nn.ModuleList(nn.BatchNorm2d(c) for c in features)

    def forward(self, x):
        return self.bn[self.sw.idx](x)


class OrigLinear(nn.Module):
    def __init__(self, sw, ins, outs):
        super().__init__()
        self.sw, self.ins, self.outs = sw, ins, outs
        self.weight = nn.Parameter(torch.randn(max(outs), max(ins)) / max(ins) ** 0.5)
        self.bias = nn.Parameter(torch.randn(max(outs)))

    def forward(self, x):
        o, i = self.outs[self.sw.idx], self.ins[self.sw.idx]
        return F.linear(x, self.weight[:o, :i], self.bias[:o])


class OrigShuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, 3, c // 3, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class OrigBlock(nn.Module):
    def __init__(self, sw, inp, outp, stride):
        super().__init__()
        self.residual = stride == 1 and inp == outp
        block_outp = outp if self.residual else [o - i for o, i in zip(outp, inp)]
        if not self.residual:
            self.concat_branch = nn.AvgPool2d(3, 2, 1)
        self.first_group = 1 if stride == 2 and max(inp) == 24 * max(sw.widths) else 3
        midp = [o // 4 for o in outp]
        firstp = [m // 3 for m in midp]
        lastp = [b // 3 for b in block_outp]
        for g in range(3):
            setattr(self, f"a_{g}", nn.Sequential(
                OrigConv(sw, [i // self.first_group for i in inp], firstp, 1),
                OrigBN(sw, firstp), nn.ReLU()))
            setattr(self, f"c_{g}", nn.Sequential(
                OrigConv(sw, [m // 3 for m in midp], lastp, 1), OrigBN(sw, lastp)))
        self.b = nn.Sequential(OrigShuffle(), OrigConv(sw, midp, midp, 3, stride, 1, True),
                               OrigBN(sw, midp))

    def forward(self, x):
        if self.first_group == 1:
            parts = [x] * 3
        else:
            parts = torch.split(x, x.shape[1] // 3, 1)
        y = torch.cat([getattr(self, f"a_{g}")(parts[g]) for g in range(3)], 1)
        y = self.b(y)
        parts = torch.split(y, y.shape[1] // 3, 1)
        y = torch.cat([getattr(self, f"c_{g}")(parts[g]) for g in range(3)], 1)
        if self.residual:
            return F.relu(y + x)
        return torch.cat([F.relu(y), self.concat_branch(x)], 1)


class OrigShuffleNet(nn.Module):
    def __init__(self, widths, num_classes, input_size):
        super().__init__()
        self.sw = sw = Switch(widths)
        ch = [int(24 * w) for w in sw.widths]
        per_group = [c // 3 for c in ch]
        for g in range(3):
            setattr(self, f"head_{g}", nn.Sequential(
                OrigConv(sw, [3] * len(ch), per_group, 3, 2, 1), OrigBN(sw, per_group),
                nn.ReLU(), nn.MaxPool2d(3, 2)))
            blocks = []
        for c, s in ORIGINAL_BLOCK_SETTING:
            outp = [int(c * w) for w in sw.widths]
            blocks.append(OrigBlock(sw, ch, outp, s))
            ch = outp
        self.features = nn.Sequential(*blocks, nn.AvgPool2d(input_size // 32))
        self.classifier = nn.Sequential(OrigLinear(sw, ch, [num_classes] * len(ch)))

    def forward(self, x):
        x = torch.cat([getattr(self, f"head_{g}")(x) for g in range(3)], 1)
        x = self.features(x)
        return self.classifier(x.view(-1, x.shape[1]))


def random_original(widths, num_classes=1000, input_size=64):
    torch.manual_seed(1)
    return randomize_bn_state(OrigShuffleNet(widths, num_classes, input_size),
                              gamma=(0.5, 1.5), std=0.2)


def save_checkpoint(path, sd):
    torch.save(original_checkpoint(sd), path)
    return path


@pytest.fixture(scope="module")
def original_sd():
    return random_original(PAPER_WIDTHS).state_dict()


def test_original_reimplementation_has_the_original_key_layout(original_sd):
    keys = set(original_sd)
    for key in ("head_2.0.weight", "head_0.1.bn.2.running_var", "features.0.a_1.0.weight",
                "features.0.b.1.weight", "features.0.b.2.bn.0.weight",
                "features.15.c_2.1.bn.1.num_batches_tracked", "classifier.0.weight",
                "classifier.0.bias"):
        assert key in keys
    assert original_sd["features.0.a_0.0.weight"].shape == (40, 48, 1, 1)
    assert original_sd["features.1.a_0.0.weight"].shape == (40, 160, 1, 1)
    assert original_sd["features.0.c_0.0.weight"].shape == (144, 40, 1, 1)
    assert original_sd["features.0.b.1.weight"].shape == (120, 1, 3, 3)


@pytest.mark.parametrize("widths", [PAPER_WIDTHS, (0.25, 0.75, 1.0)])
def test_load_original_matches_at_every_width(tmp_path, widths):
    size = 64
    orig = random_original(widths, num_classes=1000, input_size=size).eval()
    path = save_checkpoint(tmp_path / "ckpt.pt", orig.state_dict())
    model = load_original(s_shufflenet(widths), path).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for i, w in enumerate(sorted(widths)):
            orig.sw.idx = i
            expected = orig(x)
            with slimops.width(model, w):
                got = model(x)
            scale = float(expected.abs().max())
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale,
                                       msg=lambda m: f"width {w}: {m}")


def test_load_original_matches_in_training_mode(tmp_path, original_sd):
    """Batch statistics (and the running-stat update of the active width only) agree too."""
    orig = random_original(PAPER_WIDTHS).train()
    model = load_original(s_shufflenet(), save_checkpoint(tmp_path / "c.pt", orig.state_dict()))
    model.train()
    x = torch.randn(4, 3, 64, 64)
    orig.sw.idx = 1
    with torch.no_grad():
        expected = orig(x)
        with slimops.width(model, 1.0):
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    # the running stats of the middle width moved, identically, in the fused stem BN
    ours = model.stem.bn.bn[1].running_mean
    theirs = torch.cat([orig.get_submodule(f"head_{g}.1").bn[1].running_mean for g in range(3)])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    loaded = torch.cat([original_sd[f"head_{g}.1.bn.1.running_mean"] for g in range(3)])
    assert not torch.allclose(ours, loaded)
    # the other widths' stats are untouched
    untouched = torch.cat([original_sd[f"head_{g}.1.bn.0.running_mean"] for g in range(3)])
    assert torch.equal(model.stem.bn.bn[0].running_mean, untouched)


def test_mismatched_shape_names_key_and_shapes(tmp_path, original_sd):
    sd = dict(original_sd)
    sd["features.5.c_1.0.weight"] = torch.zeros(80, 40, 1, 1)
    path = save_checkpoint(tmp_path / "bad.pt", sd)
    with pytest.raises(CheckpointMismatchError) as err:
        load_original(s_shufflenet(), path)
    msg = str(err.value)
    assert "'features.5.c_1.0.weight'" in msg
    assert "(320, 80, 1, 1)" in msg and "(80, 40, 1, 1)" in msg


def test_mismatched_shape_of_ungrouped_tensor(tmp_path, original_sd):
    sd = dict(original_sd)
    sd["classifier.0.bias"] = torch.zeros(10)
    with pytest.raises(CheckpointMismatchError, match=r"classifier\.0\.bias.*\(1000,\).*\(10,\)"):
        load_original(s_shufflenet(), save_checkpoint(tmp_path / "bad.pt", sd))


def test_missing_key_is_named(tmp_path, original_sd):
    sd = dict(original_sd)
    del sd["features.2.b.2.bn.1.running_var"]
    with pytest.raises(CheckpointMismatchError, match=r"features\.2\.b\.2\.bn\.1\.running_var"):
        load_original(s_shufflenet(), save_checkpoint(tmp_path / "bad.pt", sd))


def test_unexpected_key_is_named(tmp_path, original_sd):
    sd = dict(original_sd)
    sd["features.16.a_0.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"features\.16\.a_0\.0\.weight"):
        load_original(s_shufflenet(), save_checkpoint(tmp_path / "bad.pt", sd))


def test_checkpoint_of_other_widths_is_rejected(tmp_path):
    sd = random_original((0.25, 0.75, 1.0)).state_dict()
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_original(s_shufflenet(), save_checkpoint(tmp_path / "bad.pt", sd))


def test_runs_at_its_listed_widths_only():
    # Its grouped channel plan is per listed width (lists, not channel rules): the sandwich
    # rule draws listed widths, and a width in between is a clear error.
    from slimops.width import width_range

    model = s_shufflenet()
    assert width_range(model) is None
    with pytest.raises(ValueError, match=r"unknown width 0\.75"):
        set_width(model, 0.75)
