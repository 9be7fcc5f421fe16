"""slimops.ops.linear (the compiled kernel behind it) against slimops.reference.linear:
1-D, 2-D and 3-D inputs, prefixes W[:out, :in], bias on and off, empty batches, layouts;
float64 gradcheck; torch.library.opcheck of the op and its backward ops; torch.compile."""

from __future__ import annotations

import re

import pytest
import torch

import slimops
from slimops import reference

from helpers import OPCHECK_UTILS, leaf

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
    ),
]

F32, F64 = torch.float32, torch.float64
DTYPES = [pytest.param(F32, id="f32"), pytest.param(F64, id="f64")]
O_FULL, I_FULL = 13, 7
# (out_features, in_features): full, 1x1, mixed
PREFIXES = [(13, 7), (1, 1), (7, 3), (3, 7), (13, 1)]
LEADING = {"1d": (), "2d": (5,), "3d": (3, 4), "2d_one_row": (1,), "3d_empty": (2, 0)}


def run_and_compare(x, weight, bias, out_features, tol, grad_out=None):
    args = [leaf(x), leaf(weight), None if bias is None else leaf(bias)]
    ref_args = [leaf(x), leaf(weight), None if bias is None else leaf(bias)]
    out = slimops.ops.linear(*args, out_features)
    ref = reference.linear(*ref_args, out_features)
    assert out.shape == ref.shape == (*x.shape[:-1], out_features)
    dtype = x.dtype
    torch.testing.assert_close(out, ref, **tol(dtype, ref))
    g = torch.randn_like(ref) if grad_out is None else grad_out
    live = [a for a in args if a is not None]
    grads = torch.autograd.grad(out, live, g)
    ref_grads = torch.autograd.grad(ref, [a for a in ref_args if a is not None], g)
    for name, a, got, exp in zip(("input", "weight", "bias"), live, grads, ref_grads):
        assert got.shape == a.shape, name
        torch.testing.assert_close(got, exp, **tol(dtype, exp), msg=lambda m: f"{name}: {m}")
    gw = grads[1]
    used = torch.zeros_like(gw, dtype=torch.bool)
    used[:out_features, : x.shape[-1]] = True
    assert torch.equal(gw[~used], torch.zeros_like(gw[~used])), "weight grad outside the prefix"
    if bias is not None:
        assert torch.equal(grads[2][out_features:], torch.zeros_like(grads[2][out_features:]))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("leading", list(LEADING.values()), ids=list(LEADING))
def test_matches_reference(leading, with_bias, dtype, tol):
    weight = torch.randn(O_FULL, I_FULL, dtype=dtype)
    bias = torch.randn(O_FULL, dtype=dtype) if with_bias else None
    for o, i in PREFIXES:
        run_and_compare(torch.randn(*leading, i, dtype=dtype), weight, bias, o, tol)


def test_default_out_features_is_full(tol):
    w, b = torch.randn(6, 4, dtype=F64), torch.randn(6, dtype=F64)
    x = torch.randn(3, 2, dtype=F64)
    torch.testing.assert_close(slimops.ops.linear(x, w, b), x @ w[:, :2].T + b, **tol(F64))


def test_bias_is_added():
    w = torch.randn(6, 4, dtype=F64)
    x = torch.randn(3, 4, dtype=F64)
    b = torch.arange(6, dtype=F64)
    torch.testing.assert_close(slimops.ops.linear(x, w, b, 3) - slimops.ops.linear(x, w, None, 3),
                               b[:3].expand(3, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 3, 257], ids=lambda r: f"M{r}")
def test_threaded(rows, all_threads, tol):
    """Bigger GEMMs with BLAS threads on, and the bias-seeding loop (grain 64) split."""
    weight = torch.randn(64, 48, dtype=F64)
    for o, i in [(64, 48), (33, 17), (1, 48)]:
        run_and_compare(torch.randn(rows, i, dtype=F64), weight, torch.randn(64, dtype=F64), o,
                        tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["transposed", "sliced", "expanded"])
def test_layouts(how, dtype, tol):
    """Non-contiguous inputs, bias and gradients (the weight must stay contiguous, below)."""
    weight = torch.randn(O_FULL, I_FULL, dtype=dtype)
    bias = torch.randn(2 * O_FULL, dtype=dtype)[::2]
    if how == "transposed":
        x = torch.randn(5, 4, dtype=dtype).t()  # [4, 5]: in_features 5
    elif how == "sliced":
        x = torch.randn(3, 4, 10, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(1, 5, dtype=dtype).expand(6, 5)
    assert not x.is_contiguous() and not bias.is_contiguous()
    g = torch.randn(*x.shape[:-1], 2 * 9, dtype=dtype)[..., ::2]
    run_and_compare(x, weight, bias, 9, tol, grad_out=g)


def test_non_contiguous_weight_falls_back_to_reference(tol, monkeypatch):
    from slimops.ops import _backend

    monkeypatch.setattr(_backend, "_warned_layout", False)
    w = torch.randn(7, 9, dtype=F64).t()  # [9, 7], transposed storage
    x = torch.randn(4, 5, dtype=F64)
    with pytest.warns(RuntimeWarning, match="not contiguous"):
        out = slimops.ops.linear(x, w, None, 6)
    torch.testing.assert_close(out, x @ w[:6, :5].T, **tol(F64))


GRADCHECK_CASES = {
    "1d_bias": ((5,), 5, 6, 4, True, False),
    "2d_prefix": ((3, 4), 5, 6, 2, True, False),
    "3d_nobias": ((2, 3, 3), 4, 6, 5, False, False),
    "2d_full_fast": ((7, 6), 6, 9, 9, True, True),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(case):
    shape, i_full, o_full, o, with_bias, fast = GRADCHECK_CASES[case]
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    w = torch.randn(o_full, i_full, dtype=F64, requires_grad=True)
    b = torch.randn(o_full, dtype=F64, requires_grad=True) if with_bias else None
    if with_bias:
        fn, args = (lambda x, w, b: slimops.ops.linear(x, w, b, o)), (x, w, b)
    else:
        fn, args = (lambda x, w: slimops.ops.linear(x, w, None, o)), (x, w)
    assert torch.autograd.gradcheck(fn, args, fast_mode=fast)


OPCHECK_SAMPLES = {
    "1d_no_grad": lambda: (torch.randn(5, dtype=F64), torch.randn(9, 6, dtype=F64),
                           torch.randn(9, dtype=F64), 4),
    "3d_grad_bias": lambda: (leaf(torch.randn(2, 3, 4, dtype=F64)),
                             leaf(torch.randn(9, 6, dtype=F64)), leaf(torch.randn(9, dtype=F64)),
                             7),
    "2d_grad_nobias_f32": lambda: (leaf(torch.randn(5, 6)), leaf(torch.randn(9, 6)), None, 9),
}


@pytest.mark.parametrize("make", list(OPCHECK_SAMPLES.values()), ids=list(OPCHECK_SAMPLES))
def test_opcheck_linear(make):
    torch.library.opcheck(torch.ops.slimops.linear.default, make(), test_utils=OPCHECK_UTILS)


def test_opcheck_backward_ops():
    w = torch.randn(9, 6, dtype=F64)
    x = torch.randn(2, 3, 4, dtype=F64)
    g = torch.randn(2, 3, 7, dtype=F64)
    torch.library.opcheck(torch.ops.slimops.linear_backward_input.default, (g, w, 4),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.slimops.linear_backward_weight.default, (g, x, w),
                          test_utils=OPCHECK_UTILS)


def test_backward_ops_match_reference(tol):
    w = torch.randn(9, 6, dtype=F64)
    x = torch.randn(2, 3, 4, dtype=F64)
    g = torch.randn(2, 3, 7, dtype=F64)
    gi = torch.ops.slimops.linear_backward_input(g, w, 4)
    gw = torch.ops.slimops.linear_backward_weight(g, x, w)
    torch.testing.assert_close(gi, g @ w[:7, :4], **tol(F64))
    expected = torch.zeros_like(w)
    expected[:7, :4] = g.reshape(-1, 7).T @ x.reshape(-1, 4)
    torch.testing.assert_close(gw, expected, **tol(F64, expected))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("leading", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
def test_compile(leading, with_bias, fresh_dynamo, tol):
    tensors = dict(input=torch.randn(*leading, 5), weight=torch.randn(O_FULL, I_FULL))
    if with_bias:
        tensors["bias"] = torch.randn(O_FULL)
    g = torch.randn(*leading, 9)

    def fn(**t):
        y = slimops.ops.linear(out_features=9, **t)
        return (y * g).sum(), y

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = {k: leaf(v.clone()) for k, v in tensors.items()}
        loss, y = f(**leaves)
        results.append((y, torch.autograd.grad(loss, list(leaves.values()))))
    (y_e, g_e), (y_c, g_c) = results
    torch.testing.assert_close(y_c, y_e, **tol(F32, y_e))
    for name, a, b in zip(tensors, g_c, g_e):
        torch.testing.assert_close(a, b, **tol(F32, b), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("out_features", [True, 3.0, "3"])
def test_non_integer_out_features_is_a_type_error(out_features):
    with pytest.raises(TypeError, match="out_features must be an int"):
        slimops.ops.linear(torch.randn(2, 4), torch.randn(5, 4), None, out_features)


W_5x7 = torch.randn(5, 7)  # O_full = 5 output features, I_full = 7 input features
BAD_FEATURES = {
    "input_too_wide": (lambda: torch.ops.slimops.linear(torch.randn(2, 8), W_5x7, None, 3),
                       "slimops::linear: input has 8 features but the weight has only 7 input "
                       "features"),
    "out_features_too_large": (
        lambda: torch.ops.slimops.linear(torch.randn(2, 4), W_5x7, None, 6),
        "slimops::linear: out_features must be in [0, 5], got 6"),
    "out_features_negative": (
        lambda: torch.ops.slimops.linear(torch.randn(2, 4), W_5x7, None, -1),
        "slimops::linear: out_features must be in [0, 5], got -1"),
    "grad_out_too_wide": (
        lambda: torch.ops.slimops.linear_backward_input(torch.randn(2, 6), W_5x7, 3),
        "slimops::linear_backward_input: grad_out has 6 features but the weight has only 5 "
        "output features"),
    "in_features_too_large": (
        lambda: torch.ops.slimops.linear_backward_input(torch.randn(2, 4), W_5x7, 8),
        "slimops::linear_backward_input: in_features must be in [0, 7], got 8"),
    "weight_grad_input_too_wide": (
        lambda: torch.ops.slimops.linear_backward_weight(torch.randn(2, 4), torch.randn(2, 8),
                                                         W_5x7),
        "slimops::linear_backward_weight: input has 8 features but the weight has only 7 input "
        "features"),
    "weight_grad_grad_out_too_wide": (
        lambda: torch.ops.slimops.linear_backward_weight(torch.randn(2, 6), torch.randn(2, 4),
                                                         W_5x7),
        "slimops::linear_backward_weight: grad_out has 6 features but the weight has only 5 "
        "output features"),
}


@pytest.mark.parametrize("case", list(BAD_FEATURES.values()), ids=list(BAD_FEATURES))
def test_feature_counts_outside_the_weight_are_errors(case):
    # The kernel's own checks (csrc/cpu/linear.cpp), message and all: the ops are called
    # directly, past slimops.ops.linear's Python checks.
    call, message = case
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call()
