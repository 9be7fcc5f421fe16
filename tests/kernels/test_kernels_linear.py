"""slimops.kernels.linear (Triton) against slimops.reference.linear and its autograd.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1). fp32 is compared tightly; fp16 against the reference computed in
fp32 from the same fp16 values. bf16 is covered by the AOT compile only (the interpreter's
bf16 dot is wrong).
"""

from __future__ import annotations

from typing import Dict

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from slimops import reference  # noqa: E402
from slimops.kernels import _aot  # noqa: E402
from slimops.kernels import linear as K  # noqa: E402

DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]


def _tols(dtype: torch.dtype, expected: torch.Tensor) -> Dict[str, float]:
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4 * scale)
    return dict(rtol=1e-2, atol=1e-2 * scale)


# (name, input shape (last dim = in_features), full weight [O, I], out_features, bias)
CASES = [
    ("full_width", (4, 16), (16, 16), 16, True),
    ("prefix_odd", (3, 7), (16, 13), 13, True),
    ("one_feature", (1, 1), (3, 3), 1, False),
    ("narrow_out_wide_batch", (70, 13), (20, 16), 3, True),  # several M tiles
    ("wide_out", (2, 5), (150, 8), 140, False),  # several N tiles
    ("long_k", (2, 100), (7, 120), 7, True),  # several K blocks
    ("3d_input", (2, 3, 9), (12, 10), 11, True),
    ("1d_input", (6,), (5, 8), 4, True),
]
CASE_IDS = [c[0] for c in CASES]


def _make(case, dtype):
    _, xshape, wshape, out_features, has_bias = case
    x = torch.randn(xshape).to(dtype)
    w = torch.randn(wshape).to(dtype)
    b = torch.randn(wshape[0]).to(dtype) if has_bias else None
    return x, w, b, out_features


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_reference(case, dtype):
    x, w, b, out_features = _make(case, dtype)
    out = K.linear(x, w, b, out_features)
    expected = reference.linear(x.float(), w.float(), None if b is None else b.float(),
                                out_features)
    assert out.shape == expected.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **_tols(dtype, expected))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_autograd(case, dtype):
    x, w, b, out_features = _make(case, dtype)
    xf = x.float().requires_grad_()
    wf = w.float().requires_grad_()
    y = reference.linear(xf, wf, None, out_features)
    gy = torch.randn(y.shape).to(dtype)
    gx, gw = torch.autograd.grad(y, (xf, wf), gy.float())
    grad_input = K.linear_backward_input(gy, w, x.shape[-1])
    assert grad_input.shape == x.shape and grad_input.dtype == dtype
    torch.testing.assert_close(grad_input.float(), gx, **_tols(dtype, gx))
    grad_weight = K.linear_backward_weight(gy, x, w)
    assert grad_weight.shape == w.shape and grad_weight.dtype == dtype
    torch.testing.assert_close(grad_weight.float(), gw, **_tols(dtype, gw))
    # Zero outside the active prefix.
    outside = torch.ones(w.shape, dtype=torch.bool)
    outside[:out_features, : x.shape[-1]] = False
    assert (grad_weight[outside] == 0).all()


@pytest.mark.parametrize("cfg", range(len(K.CONFIGS)), ids=lambda i: f"config{i}")
def test_every_config(monkeypatch, cfg):
    monkeypatch.setattr(K, "_pick", lambda m, n: K.CONFIGS[cfg])
    x = torch.randn(40, 37)
    w = torch.randn(150, 40)
    b = torch.randn(150)
    torch.testing.assert_close(K.linear(x, w, b, 140), reference.linear(x, w, b, 140),
                               rtol=1e-4, atol=1e-4)
    gy = torch.randn(40, 140)
    torch.testing.assert_close(K.linear_backward_input(gy, w, 37), gy @ w[:140, :37],
                               rtol=1e-4, atol=1e-4)
    expected = torch.zeros_like(w)
    expected[:140, :37] = gy.t() @ x
    torch.testing.assert_close(K.linear_backward_weight(gy, x, w), expected, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("group_m", [1, 2, 3])
def test_grouped_launch_order_changes_no_bit(monkeypatch, group_m):
    """The GEMM launches its (M, N) tiles in the grouped order of ``GROUP_M`` M tiles (grid
    x: a group's M tiles, y: N tiles, z: the group): with 5 M tiles x 3 N tiles (groups of 2
    and 3 leave idle programs in the last group) all three ops give the reference's values,
    bit for bit those of the plain order (``GROUP_M`` = 1); only which program computes
    which tile changes."""
    launch = K._gemm_launch
    grids = []

    def recorded(*args):
        grid, largs, kwargs = launch(*args)
        grids.append(grid)
        return grid, largs, kwargs

    monkeypatch.setattr(K, "_gemm_launch", recorded)
    x, w, b = torch.randn(150, 37), torch.randn(150, 40), torch.randn(150)
    gy = torch.randn(150, 140)

    def run():
        return (K.linear(x, w, b, 140), K.linear_backward_input(gy, w, 37),
                K.linear_backward_weight(gy, x, w))

    monkeypatch.setattr(K, "GROUP_M", 1)
    plain = run()
    monkeypatch.setattr(K, "GROUP_M", group_m)
    grouped = run()
    # the forward (the interpreter's 32 x 64 tile): 150 rows x 140 outputs = 5 x 3 tiles, in
    # groups of group_m M tiles
    assert (K.CONFIGS[0]["BLOCK_M"], K.CONFIGS[0]["BLOCK_N"]) == (32, 64)
    assert grids[0] == (1, 3, 5)
    assert grids[3] == (group_m, 3, -(-5 // group_m))
    for got, ref in zip(grouped, plain):
        assert torch.equal(got, ref)
    torch.testing.assert_close(grouped[0], reference.linear(x, w, b, 140), rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(grouped[1], gy @ w[:140, :37], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grouped[2][:140, :37], gy.t() @ x, rtol=1e-4, atol=1e-4)


def test_strided_views_read_in_place():
    # A transposed weight view and a non-contiguous input: both read through their strides
    # (the launchers never make the weight contiguous).
    w = torch.randn(12, 10).t()  # [10, 12], strides (1, 10)
    x = torch.randn(5, 20)[:, ::2]  # [5, 10], stride 2 along features
    torch.testing.assert_close(K.linear(x, w, None, 9), reference.linear(x, w, None, 9),
                               rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise():
    x = torch.randn(3, 8)
    w = torch.randn(6, 8)
    with pytest.raises(TypeError, match="dtype"):
        K.linear(x.half(), w, None, 6)
    with pytest.raises(TypeError, match="dtype"):
        K.linear(x, w, torch.randn(6).half(), 6)
    with pytest.raises(TypeError, match="dtype"):
        K.linear_backward_weight(torch.randn(3, 6), x.half(), w)
    with pytest.raises(TypeError, match="dtype"):
        K.linear(x.double(), w.double(), None, 6)
    with pytest.raises(ValueError, match="out_features"):
        K.linear(x, w, None, 7)
    with pytest.raises(ValueError, match="features"):
        K.linear(torch.randn(3, 9), w, None, 6)
    with pytest.raises(ValueError, match="bias"):
        K.linear(x, w, torch.randn(5), 6)
    with pytest.raises(ValueError, match="2-D"):
        K.linear(x, w.view(6, 8, 1), None, 6)
    with pytest.raises(ValueError, match="rows"):
        K.linear_backward_weight(torch.randn(4, 6), x, w)
    with pytest.raises(ValueError, match="widths"):
        K.linear_backward_input(torch.randn(3, 6), w, 9)


def test_aot_cases_enumerate_fast_and_distinct():
    cases = K.aot_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    for needed in ("bfloat16", "float16", "float32", "tf32", "_bias"):
        assert any(needed in n for n in names), needed
    for c in cases:
        assert set(c.signature) == set(c.fn.arg_names)


def test_aot_representative_case_compiles_without_spills():
    # The largest tile, fp32 on the exact (FMA) dot path with bias: the heaviest in registers.
    # aot_cases() hands compilable JITFunctions even under the interpreter.
    case = next(c for c in K.aot_cases()
                if c.name.startswith("linear_gemm_float32_m128") and c.name.endswith("_bias"))
    r = _aot.compile_case(case, 90)
    assert r.registers > 0 and r.spill_bytes == 0 and r.stack_bytes == 0, r
