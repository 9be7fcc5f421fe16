"""slimops.kernels.conv2d (Triton) against slimops.reference.conv2d and its autograd.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1), so shapes stay small. fp32 is compared tightly; fp16 against the
reference computed in fp32 from the same fp16 values, with a tolerance for fp16 rounding of
the output. bf16 is covered by the AOT compile only (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

from typing import Dict, Optional

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from slimops import reference  # noqa: E402
from slimops.kernels import _aot  # noqa: E402
from slimops.kernels import conv2d as K  # noqa: E402

ACTS = {0: None, 1: "relu", 2: "relu6"}


def _tols(dtype: torch.dtype, expected: torch.Tensor) -> Dict[str, float]:
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4 * scale)
    return dict(rtol=1e-2, atol=1e-2 * scale)


# (name, N, C_in, out_channels, weight shape [G*Og, Ig, kh, kw], groups, H, W, stride,
#  padding, dilation, epilogue terms, activation)
CASES = [
    ("full_width_3x3_all_terms", 2, 8, 8, (8, 8, 3, 3), 1, 9, 9, 1, 1, 1, "bssr", 2),
    ("prefix_odd_s2", 1, 7, 13, (16, 16, 3, 3), 1, 7, 9, 2, 1, 1, "b", 1),
    ("1x1_tiny", 2, 3, 5, (7, 4, 1, 1), 1, 1, 3, 1, 0, 1, "", 0),
    ("groups2_prefix_dil2_pad2", 2, 6, 8, (12, 4, 3, 3), 2, 9, 7, 1, 2, 2, "ssr", 0),
    ("groups3_s2_pad0", 1, 9, 6, (9, 3, 3, 3), 3, 9, 9, 2, 0, 1, "b", 1),
    ("groups2_1x1_one_channel", 2, 2, 2, (6, 2, 1, 1), 2, 9, 5, 2, 1, 1, "br", 2),
    ("dil2_pad0_residual", 1, 13, 3, (16, 16, 3, 3), 1, 9, 9, 1, 0, 2, "r", 2),
    ("1x3_kernel", 2, 5, 4, (6, 5, 1, 3), 1, 5, 7, 1, (0, 1), 1, "bs", 1),
    ("asym_stride_pad", 1, 4, 6, (8, 4, 3, 3), 1, 8, 6, (2, 1), (1, 0), (1, 2), "bssr", 2),
    # The 1x1 GEMM path (1x1, stride 1, no padding): channels a multiple of BLOCK_K (no
    # channel mask) with two pixel tiles per image and two N tiles; grouped with prefixes;
    # a dilation, which a 1x1 kernel ignores.
    ("1x1_even_k_two_tiles", 2, 32, 40, (48, 32, 1, 1), 1, 5, 7, 1, 0, 1, "bssr", 2),
    ("1x1_groups2_prefix", 3, 6, 8, (12, 4, 1, 1), 2, 4, 5, 1, 0, 1, "b", 1),
    ("1x1_dilation_ignored", 1, 5, 7, (7, 5, 1, 1), 1, 3, 3, 1, 0, 2, "s", 0),
    # More M tiles (5 images x 2 pixel tiles) than the launch order's GROUP_M, and 2 N tiles:
    # the grouped order must still visit every (M, N) tile once.
    ("grouped_order_5_images", 5, 4, 40, (40, 4, 3, 3), 1, 7, 7, 1, 1, 1, "b", 0),
]
# The cases the kernels run on their 1x1 GEMM path (IS_1X1).
GEMM_1X1 = {"1x1_tiny", "1x1_even_k_two_tiles", "1x1_groups2_prefix", "1x1_dilation_ignored"}
CASE_IDS = [c[0] for c in CASES]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _make(case, dtype: torch.dtype):
    _, n, cin, cout, wshape, groups, h, w, s, p, d, terms, act = case
    weight = torch.randn(wshape).to(dtype)
    x = torch.randn(n, cin, h, w).to(dtype)
    bias = torch.randn(wshape[0]).to(dtype) if "b" in terms else None
    scale = (torch.rand(cout) + 0.5).to(dtype) if terms.count("s") >= 1 else None
    shift = torch.randn(cout).to(dtype) if terms.count("s") >= 2 else None
    geo = dict(stride=_pair(s), padding=_pair(p), dilation=_pair(d))
    z = reference.conv2d(x.float(), weight.float(), None, cout, groups=groups, **geo)
    residual = torch.randn(z.shape).to(dtype) if "r" in terms else None
    return dict(x=x, weight=weight, bias=bias, cout=cout, groups=groups, scale=scale,
                shift=shift, residual=residual, act=act, **geo)


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_reference(case, dtype):
    a = _make(case, dtype)
    out = K.conv2d(a["x"], a["weight"], a["bias"], a["cout"], a["stride"], a["padding"],
                   a["dilation"], a["groups"], a["scale"], a["shift"], a["residual"], a["act"])
    expected = reference.conv2d(
        a["x"].float(), a["weight"].float(), _f32(a["bias"]), a["cout"], a["stride"],
        a["padding"], a["dilation"], a["groups"], _f32(a["scale"]), _f32(a["shift"]),
        _f32(a["residual"]), ACTS[a["act"]])
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), expected, **_tols(dtype, expected))


@pytest.mark.parametrize("act", [0, 1, 2], ids=["none", "relu", "relu6"])
def test_each_activation_with_full_epilogue(act):
    # Scale/shift chosen so that the pre-activation straddles both relu6 bounds.
    case = ("acts", 2, 4, 6, (8, 6, 3, 3), 1, 6, 6, 1, 1, 1, "bssr", act)
    a = _make(case, torch.float32)
    a["scale"] = a["scale"] * 3
    out = K.conv2d(a["x"], a["weight"], a["bias"], 6, a["stride"], a["padding"],
                   a["dilation"], 1, a["scale"], a["shift"], a["residual"], act)
    expected = reference.conv2d(a["x"], a["weight"], a["bias"], 6, a["stride"], a["padding"],
                                a["dilation"], 1, a["scale"], a["shift"], a["residual"],
                                ACTS[act])
    torch.testing.assert_close(out, expected, **_tols(torch.float32, expected))
    if act == 2:
        assert (expected == 6).any() and (expected == 0).any()


def _grads(a):
    """Autograd of the reference (fp32) on the sliced weight: grad wrt input and weight."""
    x = a["x"].float().requires_grad_()
    w = a["weight"].float().requires_grad_()
    z = reference.conv2d(x, w, None, a["cout"], a["stride"], a["padding"], a["dilation"],
                         a["groups"])
    gz = torch.randn(z.shape).to(a["x"].dtype)
    gx, gw = torch.autograd.grad(z, (x, w), gz.float())
    return gz, gx, gw


def _prefix_mask(weight: torch.Tensor, groups: int, og: int, ig: int) -> torch.Tensor:
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    mask.view(groups, weight.shape[0] // groups, *weight.shape[1:])[:, :og, :ig] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_autograd(case, dtype):
    a = _make(case, dtype)
    gz, gx, gw = _grads(a)
    geo = (a["stride"], a["padding"], a["dilation"], a["groups"])
    grad_input = K.conv2d_backward_input(gz, a["weight"], list(a["x"].shape), *geo)
    assert grad_input.shape == a["x"].shape and grad_input.dtype == dtype
    torch.testing.assert_close(grad_input.float(), gx, **_tols(dtype, gx))
    grad_weight = K.conv2d_backward_weight(gz, a["x"], a["weight"], *geo)
    assert grad_weight.shape == a["weight"].shape and grad_weight.dtype == dtype
    torch.testing.assert_close(grad_weight.float(), gw, **_tols(dtype, gw))
    # Exactly zero outside each group's active prefix.
    g = a["groups"]
    inside = _prefix_mask(a["weight"], g, a["cout"] // g, a["x"].shape[1] // g)
    assert (grad_weight[~inside] == 0).all()


def test_1x1_cases_take_the_gemm_path():
    """The launchers pick IS_1X1 exactly for 1x1 kernels with stride 1 and no padding (so the
    cases above test that path), and only with dense planes."""
    for case in CASES:
        a = _make(case, torch.float32)
        geo = (*a["stride"], *a["padding"], *a["dilation"])
        assert K._gemm_1x1(a["weight"], geo, a["x"]) == (case[0] in GEMM_1X1), case[0]
    w = torch.randn(4, 4, 1, 1)
    # rows of 5 pixels 10 apart: not one pixel stride
    assert not K._gemm_1x1(w, (1, 1, 0, 0, 1, 1), torch.randn(1, 4, 6, 10)[:, :, :, :5])
    assert not K._gemm_1x1(w, (1, 1, 0, 1, 1, 1), torch.randn(1, 4, 6, 5))  # padded
    assert K._gemm_1x1(w, (1, 1, 0, 0, 1, 1),
                       torch.randn(1, 4, 6, 5).to(memory_format=torch.channels_last))


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 3, 9, 10)],
                         ids=[CASE_IDS[i] for i in (0, 1, 3, 9, 10)])
def test_channels_last_in_and_out(case):
    """An NHWC (channels_last) input gives an NHWC output (and an NHWC grad_z an NHWC
    grad_input), with the values of the NCHW reference; a residual in the other memory
    format is read correctly; the weight gradient reads NHWC activations."""
    a = _make(case, torch.float32)
    cl = torch.channels_last
    x = a["x"].to(memory_format=cl)
    out = K.conv2d(x, a["weight"], a["bias"], a["cout"], a["stride"], a["padding"],
                   a["dilation"], a["groups"], a["scale"], a["shift"], a["residual"], a["act"])
    expected = reference.conv2d(a["x"], a["weight"], a["bias"], a["cout"], a["stride"],
                                a["padding"], a["dilation"], a["groups"], a["scale"],
                                a["shift"], a["residual"], ACTS[a["act"]])
    assert out.is_contiguous(memory_format=cl)
    assert out.shape[2] * out.shape[3] == 1 or not out.is_contiguous()
    torch.testing.assert_close(out, expected, **_tols(torch.float32, expected))
    gz, gx, gw = _grads(a)
    gz = gz.to(memory_format=cl)
    geo = (a["stride"], a["padding"], a["dilation"], a["groups"])
    grad_input = K.conv2d_backward_input(gz, a["weight"], list(x.shape), *geo)
    assert grad_input.is_contiguous(memory_format=cl)
    torch.testing.assert_close(grad_input, gx, **_tols(torch.float32, gx))
    grad_weight = K.conv2d_backward_weight(gz, x, a["weight"], *geo)
    torch.testing.assert_close(grad_weight, gw, **_tols(torch.float32, gw))


@pytest.mark.parametrize("splits", [1, 3])
def test_backward_weight_split_k(monkeypatch, splits):
    # One split writes straight into the full gradient; several go through fp32 partials.
    monkeypatch.setattr(K, "_split_count", lambda tiles, k_tiles, target: min(splits, k_tiles))
    a = _make(("split", 2, 6, 4, (6, 4, 3, 3), 2, 9, 9, 1, 1, 1, "", 0), torch.float32)
    gz, _, gw = _grads(a)
    out = K.conv2d_backward_weight(gz, a["x"], a["weight"], a["stride"], a["padding"],
                                   a["dilation"], 2)
    torch.testing.assert_close(out, gw, **_tols(torch.float32, gw))


@triton.jit
def _weight_tile_probe(out_ptr, m_group, num_mg, taps, num_groups):
    # program (x, y, z) stores, at its place in launch order (x fastest), the tile the weight
    # gradient's program (x, y, z) computes
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1)
                                                    * tl.program_id(2))
    pid_m, t, pid_n, g, split = K._weight_tile(tl.program_id(0), tl.program_id(1),
                                               tl.program_id(2), m_group, num_mg, taps,
                                               num_groups)
    tl.store(out_ptr + 5 * pid, pid_m)
    tl.store(out_ptr + 5 * pid + 1, t)
    tl.store(out_ptr + 5 * pid + 2, pid_n)
    tl.store(out_ptr + 5 * pid + 3, g)
    tl.store(out_ptr + 5 * pid + 4, split)


@pytest.mark.parametrize("num_m,taps,c_blocks,groups,splits,group_m", [
    (5, 9, 3, 1, 1, 2), (3, 1, 7, 2, 1, 8), (17, 3, 1, 1, 2, 8), (1, 9, 1, 3, 2, 8),
    (9, 1, 5, 1, 1, 4), (7, 5, 3, 2, 3, 3)])
def test_weight_tile_order_is_a_grouped_bijection(num_m, taps, c_blocks, groups, splits,
                                                  group_m):
    """The weight gradient's programs, in launch order, against their (output-channel tile,
    tap, channel block, group, split): every tile of every (group, split) exactly once, the
    programs past the last output-channel tile (in a shorter last group) mapped past it;
    groups of ``group_m`` output-channel tiles, each sweeping every (channel block, tap)
    tile with the M tile fastest; the taps of one channel block consecutive (they gather the
    same input planes); then the next group, then the next (group, split)."""
    m_group = min(group_m, num_m)
    num_mg = -(-num_m // m_group)
    grid = (m_group, taps * c_blocks, num_mg * groups * splits)
    out = torch.full((grid[0] * grid[1] * grid[2], 5), -1, dtype=torch.int32)
    _weight_tile_probe[grid](out, m_group, num_mg, taps, groups)
    got = [tuple(r) for r in out.tolist()]
    expected = [(mg * m_group + i, n % taps, n // taps, g, split)
                for split in range(splits) for g in range(groups) for mg in range(num_mg)
                for n in range(taps * c_blocks) for i in range(m_group)]
    assert got == expected
    tiles = sorted(x for x in got if x[0] < num_m)
    assert tiles == [(m, t, b, g, s) for m in range(num_m) for t in range(taps)
                     for b in range(c_blocks) for g in range(groups) for s in range(splits)]
    assert len(got) - len(tiles) == (num_mg * m_group - num_m) * taps * c_blocks * groups * splits


@pytest.mark.parametrize("case", [
    # (name, N, C_in, out_channels, weight shape, groups, H, W, stride, padding, dilation)
    ("3x3_prefix_3_m_tiles", 2, 5, 70, (80, 8, 3, 3), 1, 6, 5, 1, 1, 1),
    ("3x3_groups2_prefix_s2", 1, 6, 130, (144, 4, 3, 3), 2, 7, 7, 2, 1, 1),
    ("1x1_prefix_4_m_tiles", 2, 36, 100, (112, 40, 1, 1), 1, 4, 6, 1, 0, 1),
    ("1x3_groups3_dil2", 1, 9, 195, (210, 3, 1, 3), 3, 5, 7, 1, (0, 2), 2),
], ids=lambda c: c[0])
def test_backward_weight_grouped_order_changes_no_bit(monkeypatch, case):
    """The weight gradient launches in the grouped order (grid x: ``min(GROUP_M, tiles)``
    output-channel tiles) and gives the reference's gradient, bit for bit the same whatever
    the group size (1: the plain order over (channel block, tap) and output-channel tiles;
    2: several groups, with idle programs in a shorter last one; 8: one group), with one K
    split and two: only which program computes which tile changes, not a tile's sum or the
    partials' order. Channel prefixes, grouped convs, 3 or 4 output-channel tiles."""
    name, n, cin, cout, wshape, groups, h, w, s, p, d = case
    a = _make((name, n, cin, cout, wshape, groups, h, w, s, p, d, "", 0), torch.float32)
    gz, _, gw = _grads(a)
    geo = (a["stride"], a["padding"], a["dilation"], groups)
    # more output-channel tiles than a group of 2 (3 or more: the last group shorter or not)
    cfg = K.configs(torch.float32)[0]
    num_m = -(-(cout // groups) // cfg["BLOCK_M"])
    assert 2 < num_m <= 8
    seen = []
    launch = K._backward_weight_launch

    def recorded(*args, **kwargs):
        grid, largs, lkw = launch(*args, **kwargs)
        seen.append(grid)
        return grid, largs, lkw

    monkeypatch.setattr(K, "_backward_weight_launch", recorded)
    got = {}
    for splits in (1, 2):
        monkeypatch.setattr(K, "_split_count",
                            lambda tiles, k_tiles, target, s=splits: min(s, k_tiles))
        for group_m in (1, 2, 8):
            monkeypatch.setattr(K, "GROUP_M", group_m)
            got[splits, group_m] = K.conv2d_backward_weight(gz, a["x"], a["weight"], *geo)
            assert seen[-1][0] == min(group_m, num_m)
            torch.testing.assert_close(got[splits, group_m], gw, **_tols(torch.float32, gw))
    for (splits, group_m), g in got.items():
        assert torch.equal(g, got[splits, 1]), (splits, group_m)
    # the last launch (2 splits, groups of 8 tiles): x the output-channel tiles, y (channel
    # block, tap), z (split, group)
    c_blocks = -(-(cin // groups) // cfg["BLOCK_N"])
    k_tiles = n * -(-gz.shape[2] * gz.shape[3] // cfg["BLOCK_K"])
    assert seen[-1] == (num_m, wshape[2] * wshape[3] * c_blocks, groups * min(2, k_tiles))


@pytest.mark.parametrize("cfg", range(len(K.CONFIGS_FP32)), ids=lambda i: f"config{i}")
def test_every_config(monkeypatch, cfg):
    # Each tuning entry on a shape with several N tiles for the small one (40 output channels)
    # and several M tiles (2 images of 36 pixels).
    monkeypatch.setattr(K, "_pick", lambda pixels, n, dtype, streamed=True: K.configs(dtype)[cfg])
    a = _make(("cfg", 2, 6, 40, (48, 8, 3, 3), 2, 6, 6, 1, 1, 1, "bssr", 2), torch.float32)
    out = K.conv2d(a["x"], a["weight"], a["bias"], 40, a["stride"], a["padding"],
                   a["dilation"], 2, a["scale"], a["shift"], a["residual"], 2)
    expected = reference.conv2d(a["x"], a["weight"], a["bias"], 40, a["stride"], a["padding"],
                                a["dilation"], 2, a["scale"], a["shift"], a["residual"], "relu6")
    torch.testing.assert_close(out, expected, **_tols(torch.float32, expected))
    gz, gx, gw = _grads(a)
    geo = (a["stride"], a["padding"], a["dilation"], 2)
    torch.testing.assert_close(K.conv2d_backward_input(gz, a["weight"], list(a["x"].shape), *geo),
                               gx, **_tols(torch.float32, gx))
    torch.testing.assert_close(K.conv2d_backward_weight(gz, a["x"], a["weight"], *geo), gw,
                               **_tols(torch.float32, gw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4]],
                         ids=[CASE_IDS[i] for i in (0, 1, 3, 4)])
def test_with_stats(case, dtype):
    a = _make(case, dtype)
    bias = a["bias"] if a["bias"] is not None else torch.randn(a["weight"].shape[0]).to(dtype)
    z, moments = K.conv2d_with_stats(a["x"], a["weight"], bias, a["cout"], a["stride"],
                                     a["padding"], a["dilation"], a["groups"])
    expected = reference.conv2d(a["x"].float(), a["weight"].float(), bias.float(), a["cout"],
                                a["stride"], a["padding"], a["dilation"], a["groups"])
    torch.testing.assert_close(z.float(), expected, **_tols(dtype, expected))
    hw = z.shape[2] * z.shape[3]
    block_m = K._pick(hw, a["cout"] // a["groups"], dtype)["BLOCK_M"]
    assert moments.dtype == torch.float32
    # one row per M tile; M tiles stay inside one image
    assert moments.shape == (3, z.shape[0] * -(-hw // block_m), a["cout"])
    # Row i: the moments (count, mean, M2) of z as stored over the i-th M tile: block_m
    # pixels of one image in (h, w) order, images in turn; an image's last tile is shorter
    # when block_m does not divide H * W.
    tiles = [t for img in z.float() for t in img.reshape(a["cout"], hw).split(block_m, dim=1)]
    count = torch.tensor([[t.shape[1]] * a["cout"] for t in tiles], dtype=torch.float32)
    mean = torch.stack([t.mean(1) for t in tiles])
    m2 = torch.stack([((t - t.mean(1, keepdim=True)) ** 2).sum(1) for t in tiles])
    assert torch.equal(moments[0], count)
    torch.testing.assert_close(moments[1], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments[2], m2, rtol=1e-4, atol=1e-4)


def test_stats_several_tiles_deterministic():
    a = _make(CASES[0], torch.float32)
    first = K.conv2d_with_stats(a["x"], a["weight"], None, 8, a["stride"], a["padding"],
                                a["dilation"], 1)
    assert first[1].shape[1] > 1  # 2 images of 9 * 9 = 81 output pixels: several M tiles
    second = K.conv2d_with_stats(a["x"], a["weight"], None, 8, a["stride"], a["padding"],
                                 a["dilation"], 1)
    for u, v in zip(first, second):
        assert torch.equal(u, v)


def test_weight_read_in_place_not_copied(monkeypatch):
    # The launcher never makes the weight contiguous: a weight that is a non-contiguous view
    # (every other row of a bigger tensor) is read through its strides.
    base = torch.randn(16, 4, 3, 3)
    weight = base[::2]
    assert not weight.is_contiguous()
    x = torch.randn(1, 4, 5, 5)
    out = K.conv2d(x, weight, None, 6, (1, 1), (1, 1), (1, 1), 1, None, None, None, 0)
    expected = reference.conv2d(x, weight, None, 6, 1, 1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_non_contiguous_input_and_grad():
    x = torch.randn(2, 9, 9, 4).permute(0, 3, 1, 2)  # channels_last-like strides
    weight = torch.randn(6, 4, 3, 3)
    out = K.conv2d(x, weight, None, 5, (2, 2), (1, 1), (1, 1), 1, None, None, None, 0)
    torch.testing.assert_close(out, reference.conv2d(x, weight, None, 5, 2, 1, 1, 1),
                               rtol=1e-4, atol=1e-4)
    gz = torch.randn(2, 5, 5, 5).transpose(2, 3)
    gx = K.conv2d_backward_input(gz, weight, [2, 4, 9, 9], (2, 2), (1, 1), (1, 1), 1)
    xx = x.detach().clone().requires_grad_()
    z = reference.conv2d(xx, weight, None, 5, 2, 1, 1, 1)
    (ref_gx,) = torch.autograd.grad(z, xx, gz)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(8, 4, 3, 3)
    geo = ((1, 1), (1, 1), (1, 1))
    with pytest.raises(TypeError, match="dtype"):
        K.conv2d(x.half(), w, None, 8, *geo, 1, None, None, None, 0)
    with pytest.raises(TypeError, match="dtype"):
        K.conv2d_backward_weight(torch.randn(1, 8, 5, 5), x, w.half(), *geo, 1)
    with pytest.raises(TypeError, match="dtype"):
        K.conv2d(x.double(), w.double(), None, 8, *geo, 1, None, None, None, 0)
    with pytest.raises(ValueError, match="out_channels"):
        K.conv2d(x, w, None, 9, *geo, 1, None, None, None, 0)
    with pytest.raises(ValueError, match="out_channels"):
        K.conv2d(x, w, None, 3, *geo, 2, None, None, None, 0)  # not a multiple of groups
    with pytest.raises(ValueError, match="input channels"):
        K.conv2d(torch.randn(1, 5, 5, 5), w, None, 8, *geo, 1, None, None, None, 0)
    with pytest.raises(ValueError, match="groups"):
        K.conv2d(x, w, None, 8, *geo, 3, None, None, None, 0)
    with pytest.raises(ValueError, match="residual"):
        K.conv2d(x, w, None, 8, *geo, 1, None, None, torch.randn(1, 8, 4, 4), 0)
    with pytest.raises(ValueError, match="scale"):
        K.conv2d(x, w, None, 8, *geo, 1, torch.ones(7), None, None, 0)
    with pytest.raises(ValueError, match="bias"):
        K.conv2d(x, w, torch.ones(7), 8, *geo, 1, None, None, None, 0)
    with pytest.raises(ValueError, match="activation"):
        K.conv2d(x, w, None, 8, *geo, 1, None, None, None, 3)
    with pytest.raises(ValueError, match="too small"):
        K.conv2d(torch.randn(1, 4, 1, 1), w, None, 8, (1, 1), (0, 0), (1, 1), 1, None, None,
                 None, 0)
    with pytest.raises(ValueError, match="grad_z"):
        K.conv2d_backward_input(torch.randn(1, 8, 4, 4), w, [1, 4, 5, 5], *geo, 1)
    with pytest.raises(ValueError, match="stride"):
        K.conv2d(x, w, None, 8, (0, 1), (1, 1), (1, 1), 1, None, None, None, 0)
    # past the kernels' 32-bit in-plane offsets: an error before anything is allocated or
    # launched, never a wrapped address
    for geo_big in [((1, 2 ** 31), (1, 1), (1, 1)), ((1, 1), (0, 2 ** 30), (1, 1)),
                    ((1, 1), (1, 1), (1, 2 ** 31))]:
        with pytest.raises(ValueError, match="32 bits|too small"):
            K.conv2d(x, w, None, 8, *geo_big, 1, None, None, None, 0)
    # an image past 2^31 elements, as a zero-stride view (no memory behind it)
    huge = torch.empty(1, 1, 1, 1).expand(1, 4, 2 ** 15, 2 ** 14)
    with pytest.raises(ValueError, match="32-bit offsets"):
        K.conv2d(huge, w, None, 8, *geo, 1, None, None, None, 0)


def test_aot_cases_enumerate_fast_and_distinct():
    cases = K.aot_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    for needed in ("_eval", "_res", "_stats", "backward_input", "backward_weight", "_direct",
                   "_partials", "_nhwc", "bfloat16", "float16", "float32_tf32", "stem_224"):
        assert any(needed in n for n in names), needed
    # every tuning entry of every precision is compiled somewhere
    for prec in ("float16", "bfloat16", "float32", "float32_tf32"):
        assert {c.meta["config"] for c in cases if c.meta["prec"] == prec} == {0, 1, 2, 3}, prec
    assert {c.meta["path"] for c in cases} == {"1x1", "general"}
    for c in cases:
        assert set(c.signature) == set(c.fn.arg_names)
        assert all(c.signature[k] == "constexpr" for k in c.constexprs)


def test_aot_representative_case_compiles_without_spills():
    # fp32 (TF32 dot) forward with the largest tile and the scale/shift/relu6 epilogue, the
    # heaviest in registers; aot_cases() hands compilable JITFunctions even under the
    # interpreter.
    case = next(c for c in K.aot_cases()
                if c.meta["kind"] == "forward" and c.meta["prec"] == "float32_tf32"
                and c.meta["config"] == 2 and c.meta["mode"] == "eval")
    r = _aot.compile_case(case, 90)
    assert r.registers > 0 and r.spill_bytes == 0 and r.stack_bytes == 0, r
    assert r.occupancy >= case.min_occupancy, r


def test_image_span_follows_the_strides():
    from slimops.kernels._common import image_span

    x = torch.empty(2, 3, 4, 5)
    assert image_span(x) == 60
    assert image_span(x[:, :, ::2]) == 1 + 2 * 20 + 1 * 10 + 4 * 1
    assert image_span(x.transpose(2, 3)) == 60
    assert image_span(torch.empty(1, 1, 1, 1).expand(1, 4, 7, 7)) == 1
