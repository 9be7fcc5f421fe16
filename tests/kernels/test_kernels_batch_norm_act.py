"""Switchable batch norm's Triton kernels (``slimops.kernels.batch_norm_act``) against
``slimops.reference.batch_norm_act``, autograd of it, and the registered CPU op.

Without a GPU they run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). bf16 runs too, as storage (these kernels compute in fp32 and use no
tl.dot, whose bf16 interpreter result is wrong), at a tolerance that allows for the
interpreter's bf16 conversions, which need not round like the GPU's; bf16 is also compiled.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slimops import reference  # noqa: E402
from slimops.ops import _backend  # noqa: E402
from slimops.kernels import _aot  # noqa: E402
from slimops.kernels import batch_norm_act as K  # noqa: E402
from slimops.ops._common import ACTIVATION_NAMES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 runs in the interpreter here: these kernels use no tl.dot (only its dot is wrong).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
EPS = 1e-5
# 4-D, 2-D (HW = 1), 3-D, odd sizes; (2, 3, 16, 16) splits into several tiles per channel.
SHAPES = [(2, 5, 9, 7), (7, 13), (2, 3, 7), (1, 1, 3, 3), (2, 16, 9, 9), (2, 3, 16, 16)]
CPU_OP = _backend.HAS_C and DEVICE == "cpu"


def _params(c: int, full: int, dtype=torch.float32):
    """γ, β, running mean, running var of the active width: prefix views of full-width
    buffers (``full > c``) or whole ones, read in place through their strides."""
    def vec(make):
        return make(full).to(DEVICE, dtype)[:c]

    return (vec(lambda n: torch.rand(n) * 2 + 0.5), vec(torch.randn), vec(torch.randn),
            vec(lambda n: torch.rand(n) + 0.5))


def _ref_forward(x, w, b, rm, rv, training, residual, act):
    """Reference output and statistics, in fp32 (running stats cloned: the reference
    updates them in place)."""
    f = lambda t: None if t is None else t.float()  # noqa: E731
    rm_c, rv_c = f(rm).clone(), f(rv).clone()
    out = reference.batch_norm_act(f(x), f(w), f(b), rm_c, rv_c, training, 0.1, EPS, f(residual),
                                   ACTIVATION_NAMES[act])
    if training:
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.float().mean(dims), x.float().var(dims, unbiased=False)
    else:
        mean, var = f(rm), f(rv)
    return out, mean, var


@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape, training, activation, residual):
    c = shape[1]
    x = torch.randn(shape, device=DEVICE) * 2 + 1
    w, b, rm, rv = _params(c, c + 3 if c % 2 else c)
    res = torch.randn(shape, device=DEVICE) if residual else None
    out, mean, var = K.batch_norm_act(x, w, b, rm, rv, training, EPS, res, activation)
    e_out, e_mean, e_var = _ref_forward(x, w, b, rm, rv, training, res, activation)
    assert out.dtype == x.dtype and mean.dtype == x.dtype and var.dtype == x.dtype
    assert mean.shape == (c,) and var.shape == (c,)
    torch.testing.assert_close(out, e_out, **TOL[torch.float32])
    torch.testing.assert_close(mean, e_mean, **TOL[torch.float32])
    torch.testing.assert_close(var, e_var, **TOL[torch.float32])
    if CPU_OP:
        cpu = torch.ops.slimops.batch_norm_act(x, w, b, rm, rv, training, EPS, res, activation)
        for got, want in zip((out, mean, var), cpu):
            torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("affine", [False, True], ids=["no_affine", "affine"])
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 5, 9, 7), (7, 13), (2, 3, 16, 16)], ids=str)
def test_backward_matches_autograd_and_cpu_op(shape, training, activation, affine):
    c = shape[1]
    x = torch.randn(shape, device=DEVICE) * 2 + 1
    w, b, rm, rv = _params(c, c + 2)
    if not affine:
        w = b = None
    res = torch.randn(shape, device=DEVICE)
    out, mean, var = K.batch_norm_act(x, w, b, rm, rv, training, EPS, res, activation)
    grad_out = torch.randn(shape, device=DEVICE)
    grad_input, grad_weight, grad_bias = K.batch_norm_act_backward(
        grad_out, x, out, w, mean, var, EPS, training, activation)
    assert grad_weight.shape == (c,) and grad_bias.shape == (c,)

    xr = x.clone().requires_grad_()
    wr = None if w is None else w.detach().clone().requires_grad_()
    br = None if b is None else b.detach().clone().requires_grad_()
    reference.batch_norm_act(xr, wr, br, rm.clone(), rv.clone(), training, 0.1, EPS, res,
                             ACTIVATION_NAMES[activation]).backward(grad_out)
    tol = TOL[torch.float32]
    torch.testing.assert_close(grad_input, xr.grad, **tol)
    if affine:
        torch.testing.assert_close(grad_weight, wr.grad, **tol)
        torch.testing.assert_close(grad_bias, br.grad, **tol)
    if CPU_OP:
        cpu = torch.ops.slimops.batch_norm_act_backward(
            grad_out, x, out, w, mean, var, EPS, training, activation)
        for got, want in zip((grad_input, grad_weight, grad_bias), cpu):
            torch.testing.assert_close(got, want, **tol)


def _moments(pieces):
    """fp32 [3, R, C] moments (count, mean, M2) of a list of [C, n_i] pieces (n_i may be 0:
    an empty row), computed in float64: the format a statistics epilogue hands over."""
    rows = []
    for p in pieces:
        p = p.double()
        n = p.shape[1]
        mean = p.mean(1) if n else torch.zeros(p.shape[0], dtype=torch.float64)
        m2 = ((p - mean[:, None]) ** 2).sum(1)
        rows.append(torch.stack([torch.full_like(mean, float(n)), mean, m2]))
    return torch.stack(rows, 1).float().contiguous()


def _tile_partials(z: torch.Tensor, tiles: int):
    """Per-tile moments, [3, tiles, C] fp32, of each channel's values split into ``tiles``
    near-equal pieces, and the count per channel."""
    c = z.shape[1]
    per_channel = z.float().transpose(0, 1).reshape(c, -1)
    return _moments(per_channel.tensor_split(tiles, dim=1)).to(z.device), per_channel.shape[1]


@pytest.mark.parametrize("tiles", [1, 3, 13])
@pytest.mark.parametrize("activation", [0, 2])
@pytest.mark.parametrize("shape", [(2, 7, 9, 9), (13, 3)], ids=str)
def test_from_partials_matches_batch_statistics(shape, activation, tiles):
    c = shape[1]
    z = torch.randn(shape, device=DEVICE) * 1.5 - 0.5
    w, b, _, _ = _params(c, c + 1)
    res = torch.randn(shape, device=DEVICE) if activation else None
    moments, count = _tile_partials(z, tiles)
    out, mean, var = K.batch_norm_act_from_partials(z, moments, count, w, b, EPS, res,
                                                    activation)
    expected = F.batch_norm(z, None, None, w, b, True, 0.0, EPS)
    if res is not None:
        expected = expected + res
    expected = reference.activate(expected, ACTIVATION_NAMES[activation])
    dims = [0] + list(range(2, z.dim()))
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    torch.testing.assert_close(mean, z.mean(dims), **TOL[torch.float32])
    torch.testing.assert_close(var, z.var(dims, unbiased=False), **TOL[torch.float32])
    # the same as the op's own two-stage statistics
    out2, _, _ = K.batch_norm_act(z, w, b, None, None, True, EPS, res, activation)
    torch.testing.assert_close(out, out2, **TOL[torch.float32])


def _tree_case(counts, c=3, seed=0):
    """Pieces of the given sizes per channel (far from zero mean, spread means per piece),
    their moments, and all the values as a float64 [C, total] tensor."""
    g = torch.Generator().manual_seed(seed)
    pieces = [torch.randn(c, n, generator=g, dtype=torch.float64) * (1 + i % 5)
              + 50.0 + (i % 7) for i, n in enumerate(counts)]
    pieces = [p.float().double() for p in pieces]  # values exactly representable in fp32
    return _moments(pieces), torch.cat(pieces, 1)


def _merged(moments):
    """The merge tree and the finalize's merge, in the kernels: merged [3, 1, C] moments
    (the finalize's last merge is the same _chan_merge_rows as the tree's)."""
    m = K.merge_moments(moments.to(DEVICE))
    assert m.shape[1] <= K.MERGE_ROWS
    if m.shape[1] > 1:  # one more merge launch, as the finalize would do in its program
        dst = torch.empty((3, 1, m.shape[2]), dtype=torch.float32, device=m.device)
        K._bn_merge_kernel[(1, -(-m.shape[2] // K.MERGE_BLOCK_C))](
            m, dst, m.shape[2], m.shape[1], 1, ROWS=K.MERGE_ROWS, BLOCK_C=K.MERGE_BLOCK_C)
        m = dst
    return m[:, 0].cpu()


@pytest.mark.parametrize("counts", [
    [37],                                    # 1 row: nothing to merge
    [5] * 64,                                # exactly one group
    [5] * 65,                                # one row over: two levels
    [1 + (7 * i) % 11 for i in range(4097)],  # 4097 uneven rows: three levels
    [9, 0, 4, 0, 0, 1, 30] * 10,             # empty rows mixed in
    [0] * 63 + [12],                         # all but one empty
], ids=["1", "64", "65", "4097_uneven", "empty_rows", "one_nonempty"])
def test_merge_tree_matches_float64(counts):
    moments, values = _tree_case(counts)
    n, mean, m2 = _merged(moments)
    total = values.shape[1]
    assert torch.equal(n, torch.full_like(n, float(total)))
    want_mean = values.mean(1)
    want_m2 = ((values - want_mean[:, None]) ** 2).sum(1)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(m2.double(), want_m2, rtol=1e-5, atol=0)


def test_merge_tree_levels_and_determinism():
    moments, _ = _tree_case([3] * 4097)
    assert K.merge_plan(4097) == [4097, 65, 2]
    a, b = _merged(moments), _merged(moments.clone())
    assert torch.equal(a, b)


def test_merge_plan_and_finalize_rows_per_program():
    assert K.merge_plan(1) == [1]
    assert K.merge_plan(64) == [64]
    assert K.merge_plan(65) == [65, 2]
    assert K.merge_plan(64 * 64) == [4096, 64]
    assert K.merge_plan(64 * 64 + 1) == [4097, 65, 2]
    # The stem of S-MobileNet v2 at batch 256 (112 x 112 output, 32 channels, 32-row conv
    # tiles): the serial finalize walked 100,352 rows 8 at a time; the tree reads at most 64
    # rows per program, in 3 launches.
    rows = 256 * 112 * 112 // 32
    assert K.serial_finalize_iterations(rows) == 12544
    assert K.finalize_rows_per_program(rows) == 64
    assert len(K.merge_plan(rows)) == 3
    for r in (1, 7, 64, 65, 100352, 10 ** 7):
        plan = K.merge_plan(r)
        assert plan[0] == r and plan[-1] <= K.MERGE_ROWS
        assert all(b == -(-a // K.MERGE_ROWS) for a, b in zip(plan, plan[1:]))
        assert K.finalize_rows_per_program(r) == min(r, K.MERGE_ROWS)


def test_fp16_variance_at_mean_over_std_100():
    """Issue 17: |mean| / std = 100 in fp16, relative variance error < 1e-5 against float64
    statistics of the same stored fp16 values: the merge tree and finalize from per-tile
    moments (here exact ones rounded to fp32; tests/kernels/test_kernels_conv_bn_train.py
    takes them from a convolution's statistics epilogue), and the unfused op from its own
    statistics kernel; fp32 statistics returned by both."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 40, 40, generator=g) * 8.0 + 800.0).to(torch.float16).to(DEVICE)
    xd = x.double()
    dims = [0, 2, 3]
    want_var = xd.var(dims, unbiased=False)
    want_mean = xd.mean(dims)
    ratio = (want_mean.abs() / want_var.sqrt()).min()
    assert ratio > 90  # the regime the issue names
    # 301 tiles of uneven size
    per_channel = x.float().transpose(0, 1).reshape(3, -1)
    moments = _moments(per_channel.tensor_split(301, dim=1)).to(DEVICE)
    _, mean, var = K.batch_norm_act_from_partials(x, moments, per_channel.shape[1], None,
                                                  None, EPS, None, 0)
    assert mean.dtype == var.dtype == torch.float32
    assert float(((var.double() - want_var) / want_var).abs().max()) < 1e-5
    assert float(((mean.double() - want_mean) / want_mean).abs().max()) < 1e-6
    # The op (the unfused path) returns fp32 statistics too: stats_dtype, the contract of
    # the CPU op, the CUDA C++ kernel and the fake. In fp16 the variance alone would be
    # off by up to 4.9e-4 (rounding), the mean by up to 0.25 (fp16's step at 800 is 0.5).
    _, mean_op, var_op = K.batch_norm_act(x, None, None, None, None, True, EPS, None, 0)
    assert mean_op.dtype == var_op.dtype == torch.float32
    assert float(((var_op.double() - want_var) / want_var).abs().max()) < 1e-5
    assert float(((mean_op.double() - want_mean) / want_mean).abs().max()) < 1e-6


def test_op_statistics_kernel_matches_float64_before_rounding():
    """The unfused op's per-tile moments (``_bn_stats_kernel``: chunks merged with Chan's
    pairwise formula) at |mean| / std = 100, tiles of a size chosen here: the variance from
    the merged moments to < 1e-5 relative of float64."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 2, 50, 50, generator=g) * 4.0 + 400.0).to(torch.float16).to(DEVICE)
    n, c, hw = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    count = n * hw
    block = K._reduce_config(count)["BLOCK"]
    tiles, per_tile = 3, -(-count // (3 * block)) * block
    moments = torch.empty((3, tiles, c), dtype=torch.float32, device=DEVICE)
    K._bn_stats_kernel[(tiles, c)](x, moments, c, hw, count, per_tile, tiles, BLOCK=block)
    merged = _merged(moments)
    xd = x.double().transpose(0, 1).reshape(c, -1)
    assert torch.equal(merged[0], torch.full((c,), float(count)))
    want = xd.var(1, unbiased=False)
    assert float(((merged[2].double() / count - want) / want).abs().max()) < 1e-5


def test_variance_survives_a_large_mean():
    # |mean| / std = 1e3: E[x^2] - E[x]^2 in fp32 would lose every digit; the shifted sums
    # (module docstring) keep the variance to fp32 accuracy.
    x = torch.randn(2, 4, 16, 16, device=DEVICE, dtype=torch.float64) * 0.5 + 500.0
    x32 = x.float()
    _, mean, var = K.batch_norm_act(x32, None, None, None, None, True, EPS, None, 0)
    dims = [0, 2, 3]
    want = x32.double().var(dims, unbiased=False)
    torch.testing.assert_close(var.double(), want, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), x32.double().mean(dims), rtol=1e-6, atol=0)


def test_statistics_are_deterministic():
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    a = K.batch_norm_act(x, None, None, None, None, True, EPS, None, 1)
    b = K.batch_norm_act(x, None, None, None, None, True, EPS, None, 1)
    g = torch.randn_like(x)
    ga = K.batch_norm_act_backward(g, x, a[0], None, a[1], a[2], EPS, True, 1)
    gb = K.batch_norm_act_backward(g, x, b[0], None, b[1], b[2], EPS, True, 1)
    for u, v in zip(a + ga, b + gb):
        assert torch.equal(u, v)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 5, 9, 7), (7, 13)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_fp32_reference(dtype, shape, training):
    c = shape[1]
    x = (torch.randn(shape, device=DEVICE) * 2 + 1).to(dtype)
    w, b, rm, rv = _params(c, c + 2, dtype)
    res = torch.randn(shape, device=DEVICE).to(dtype)
    out, mean, var = K.batch_norm_act(x, w, b, rm, rv, training, EPS, res, 2)
    e_out, e_mean, e_var = _ref_forward(x, w, b, rm, rv, training, res, 2)
    # fp32 statistics for a 16-bit input (batch ones, or the running ones read back), not
    # rounded to the input's dtype: fp32 accuracy against the fp32 reference on the same
    # stored values.
    assert out.dtype == dtype and mean.dtype == var.dtype == torch.float32
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), e_out.to(dtype).float(), **tol)
    torch.testing.assert_close(mean, e_mean, **TOL[torch.float32])
    torch.testing.assert_close(var, e_var, **TOL[torch.float32])

    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    gi, gw, gb = K.batch_norm_act_backward(grad_out, x, out, w, mean, var, EPS, training, 2)
    assert gi.dtype == dtype and gw.dtype == dtype
    # Reference backward in fp32 through the fp16 kernel's own mask (out in (0, 6)): rounding
    # the output to fp16 can move it onto a clamp edge.
    xr = x.float().requires_grad_()
    wr = w.float().requires_grad_()
    br = b.float().requires_grad_()
    y = reference.batch_norm_act(xr, wr, br, rm.float().clone(), rv.float().clone(), training,
                                 0.1, EPS, res.float(), None)
    o = out.float()
    y.backward(grad_out.float() * ((o > 0) & (o < 6)))
    torch.testing.assert_close(gi.float(), xr.grad.to(dtype).float(), **tol)
    torch.testing.assert_close(gw.float(), wr.grad.to(dtype).float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gb.float(), br.grad.to(dtype).float(), **tol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_statistics_dtype_is_stats_dtype(dtype, training):
    """Issue 17: the op's ``mean``/``var`` are ``stats_dtype(input.dtype)``, fp32 for every
    dtype these kernels take (fp16/bf16 too), in training and eval; ``out`` and the
    gradients keep the input's dtype; the backward takes the statistics as returned."""
    x = (torch.randn(2, 5, 9, 7, device=DEVICE) * 2 + 1).to(dtype)
    w, b, rm, rv = _params(5, 7, dtype)
    out, mean, var = K.batch_norm_act(x, w, b, rm, rv, training, EPS, None, 1)
    assert reference.stats_dtype(dtype) == torch.float32
    assert out.dtype == dtype
    assert mean.dtype == var.dtype == torch.float32
    gi, gw, gb = K.batch_norm_act_backward(torch.randn_like(x), x, out, w, mean, var, EPS,
                                           training, 1)
    assert gi.dtype == gw.dtype == gb.dtype == dtype


def test_backward_uses_fp32_statistics_at_mean_over_std_100():
    """Issue 17: the backward of an fp16 layer at |mean| / std = 100 reads the fp32 mean/var
    the op returned. ``grad_weight = sum(g (x - mean)) / std`` is then within 1e-3 of float64
    autograd over the same stored values; with the statistics rounded to fp16 (the op's
    earlier contract) the mean is off by up to 0.25 (fp16's step at 800 is 0.5, std 8) and
    the error is ~2e-2."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(4, 3, 20, 20, generator=g) * 8.0 + 800.0).half().to(DEVICE)
    go = torch.randn(x.shape, generator=g).half().to(DEVICE)
    w = (torch.rand(3, generator=g) + 0.5).half().to(DEVICE)
    out, mean, var = K.batch_norm_act(x, w, None, None, None, True, EPS, None, 0)
    assert mean.dtype == var.dtype == torch.float32
    gi, gw, gb = K.batch_norm_act_backward(go, x, out, w, mean, var, EPS, True, 0)

    xd = x.double().cpu().requires_grad_()
    wd = w.double().cpu().requires_grad_()
    bd = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    F.batch_norm(xd, None, None, wd, bd, True, 0.0, EPS).backward(go.double().cpu())

    def err(got, want):  # relative to the largest entry
        return float((got.double().cpu() - want).abs().max() / want.abs().max())

    assert err(gw, wd.grad) < 1e-3
    assert err(gb, bd.grad) < 1e-3
    assert err(gi, xd.grad) < 2e-3  # fp16 output: rounding alone is 4.9e-4 relative
    # The same backward on fp16-rounded statistics misses by far more: the check above
    # tells the two apart.
    _, gw16, _ = K.batch_norm_act_backward(go, x, out, w, mean.half(), var.half(), EPS, True, 0)
    assert err(gw16, wd.grad) > 5e-3


def test_bad_arguments_raise():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError):  # eval needs running stats
        K.batch_norm_act(x, None, None, None, None, False, EPS, None, 0)
    with pytest.raises(ValueError):  # one value per channel cannot be normalised
        K.batch_norm_act(x[:1, :, :1, :1], None, None, None, None, True, EPS, None, 0)
    with pytest.raises(ValueError):
        K.batch_norm_act(x, torch.ones(4, device=DEVICE), None, None, None, True, EPS, None, 0)
    with pytest.raises(ValueError):  # fp32 moments only
        K.batch_norm_act_from_partials(x, torch.zeros(3, 2, 3, dtype=torch.float64,
                                                      device=DEVICE), 32, None, None, EPS,
                                       None, 0)
    with pytest.raises(ValueError):  # [3, rows, C]: three planes
        K.batch_norm_act_from_partials(x, torch.zeros(2, 2, 3, device=DEVICE), 32, None, None,
                                       EPS, None, 0)


def test_aot_representative_case_has_no_spills():
    cases = {c.name: c for c in K.aot_cases()}
    for name in ("bn_stats_float32_b512_w4", "bn_finalize_float32_train", "bn_merge",
                 "bn_finalize_float16_train_f32stats"):
        r = _aot.compile_case(cases[name], 90)
        assert r.registers > 0
        assert r.spill_bytes == 0 and r.stack_bytes == 0, name


def test_bf16_compiles():
    # Compile-only: the interpreter's bf16 arithmetic is not the GPU's.
    cases = {c.name: c for c in K.aot_cases()}
    for name in ("bn_stats_bfloat16_b1024_w8", "bn_apply_bfloat16_b1024_w4_res_relu6",
                 "bn_backward_stats_bfloat16_b1024_w8_relu6",
                 "bn_backward_finalize_bfloat16_train",
                 "bn_backward_apply_bfloat16_b1024_w8_relu6_train",
                 "bn_finalize_bfloat16_train_f32stats",
                 "bn_backward_stats_bfloat16_b1024_w8_relu6_f32stats"):
        r = _aot.compile_case(cases[name], 90)
        assert r.registers > 0 and r.spill_bytes == 0 and r.stack_bytes == 0, name


def test_past_32_bit_offsets_raises_before_launch():
    """Issue 14, item 2: the statistics and backward kernels walk a channel's N*H*W values
    with one 32-bit index; past 2^31 they raise before copying or launching anything (a
    zero-stride view: no memory behind it)."""
    x = torch.empty(1, 1, 1, 1, device=DEVICE).expand(2 ** 16, 2, 2 ** 8, 2 ** 8)
    w, b = torch.ones(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match="values_per_channel .* 32-bit offsets"):
        K.batch_norm_act(x, w, b, None, None, True, 1e-5, None, 0)
    stats = torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match="values_per_channel .* 32-bit offsets"):
        K.batch_norm_act_backward(x, x, x, w, stats, stats + 1, 1e-5, True, 0)


def test_reduction_split_fills_the_resident_blocks_within_64_rows():
    """The reductions' grid on a GPU (``reduction_split``): for S-MobileNet v2's BN shapes
    at batch 1 to 256 on an H100 and an A100, never more programs than the SMs hold at once
    (SMs x the binary's blocks per SM) but at least half of that where the work allows, never
    more than 64 rows for a finalize, the same split for the same arguments. The batch-256
    stem (32 x 112 x 112) is one full wave (before: 4 x SMs programs, half of it)."""
    shapes = [(16, 112), (32, 112), (96, 112), (24, 56), (144, 56), (32, 28), (192, 28),
              (64, 14), (384, 14), (576, 14), (160, 7), (960, 7), (1280, 7)]
    for sms in (132, 108):
        for batch in (1, 8, 32, 256):
            for c, hw in shapes:
                count = batch * hw * hw
                cfg = K._reduce_config_gpu(count)
                resident = sms * K.REDUCE_BLOCKS_PER_SM[(cfg["BLOCK"], cfg["num_warps"])]
                tiles, per_tile = K.reduction_split(count, c, cfg, sms)
                assert (tiles, per_tile) == K.reduction_split(count, c, cfg, sms)
                assert tiles * per_tile >= count > (tiles - 1) * per_tile
                assert per_tile % cfg["BLOCK"] == 0
                assert 1 <= tiles <= K.MERGE_ROWS and K.merge_plan(tiles) == [tiles]
                assert tiles == 1 or tiles * c <= resident
                # At least half the resident slots busy, unless the channels alone fill
                # more than half, the 64-row cap binds or tiles of one block do.
                blocks = -(-count // cfg["BLOCK"])
                assert (2 * tiles * c > resident or 2 * c > resident
                        or tiles == K.MERGE_ROWS or 2 * tiles > blocks), (sms, batch, c, hw)
        cfg = K._reduce_config_gpu(256 * 112 * 112)
        tiles, _ = K.reduction_split(256 * 112 * 112, 32, cfg, sms)
        assert tiles * 32 == sms * K.REDUCE_BLOCKS_PER_SM[(cfg["BLOCK"], cfg["num_warps"])]


# ---------------------------------------------------------------------------------------
# update_running_stats: the running statistics' update, one launch


def _expected_running(rm, rv, mean, var, count, momentum):
    """``F.batch_norm``'s update in float64."""
    rm64, rv64 = rm.double(), rv.double()
    return ((1 - momentum) * rm64 + momentum * mean.double(),
            (1 - momentum) * rv64 + momentum * var.double() * count / (count - 1))


@pytest.mark.parametrize("stats", [torch.float32, None], ids=["f32stats", "same"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [1, 7, 1025])
def test_update_running_stats_matches_float64(c, dtype, stats):
    """Prefix views of full-width buffers (and a strided statistic) updated in place, the
    rest of the buffers untouched; fp32 statistics fold into fp16/bf16 buffers unrounded:
    the result is within an ulp of the float64 update (fp32 arithmetic, one rounding to the
    buffer's dtype)."""
    torch.manual_seed(c)
    full_m = torch.randn(c + 5, device=DEVICE).to(dtype)
    full_v = (torch.rand(c + 5, device=DEVICE) + 0.5).to(dtype)
    rm, rv = full_m[:c], full_v[:c]
    mean = torch.randn(c, device=DEVICE).to(stats or dtype)
    var = (torch.rand(2 * c, device=DEVICE) + 0.1).to(stats or dtype)[::2]  # stride 2
    em, ev = _expected_running(rm, rv, mean, var, 37, 0.3)
    tail = full_m[c:].clone(), full_v[c:].clone()
    K.update_running_stats(rm, rv, mean, var, 37, 0.3)
    # fp32: an ulp or two of the float64 value; fp16/bf16: within one ulp of it (fp32
    # arithmetic, one rounding to the buffer's dtype)
    ulp = 3e-7 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(rm.double(), em, rtol=ulp, atol=ulp)
    torch.testing.assert_close(rv.double(), ev, rtol=ulp, atol=ulp)
    assert torch.equal(full_m[c:], tail[0]) and torch.equal(full_v[c:], tail[1])


@pytest.mark.skipif(not CPU_OP, reason="compares with the C++ CPU op")
def test_update_running_stats_matches_the_cpu_op():
    torch.manual_seed(0)
    ours = torch.randn(33), torch.rand(33) + 0.5
    theirs = ours[0].clone(), ours[1].clone()
    mean, var = torch.randn(33), torch.rand(33)
    K.update_running_stats(*ours, mean, var, 10, 0.1)
    torch.ops.slimops.update_running_stats(*theirs, mean, var, 10, 0.1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_update_running_stats_propagates_nan_and_inf_as_torch():
    """A non-finite batch statistic reaches the running one as F.batch_norm's update sends
    it (NaN stays NaN, +Inf stays +Inf)."""
    mean = torch.tensor([float("nan"), float("inf"), 1.0, -float("inf")], device=DEVICE)
    var = torch.tensor([1.0, float("nan"), float("inf"), 2.0], device=DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    erm, erv = rm.clone(), rv.clone()
    K.update_running_stats(rm, rv, mean, var, 8, 0.1)
    erm.lerp_(mean, 0.1)
    erv.mul_(0.9).add_(var, alpha=0.1 * 8 / 7)
    torch.testing.assert_close(rm, erm, equal_nan=True)
    torch.testing.assert_close(rv, erv, equal_nan=True)


def test_update_running_stats_rejects_bad_arguments():
    v = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="count must be above 1"):
        K.update_running_stats(v, v.clone(), v, v, 1, 0.1)
    with pytest.raises(ValueError, match="var must be a vector of length 4"):
        K.update_running_stats(v, v.clone(), v, torch.zeros(5, device=DEVICE), 8, 0.1)
    with pytest.raises(ValueError, match="running_mean must be a vector"):
        K.update_running_stats(torch.zeros(2, 2, device=DEVICE), v, v, v, 8, 0.1)
    with pytest.raises(ValueError, match="float64"):
        K.update_running_stats(v.double(), v, v, v, 8, 0.1)


def test_update_running_stats_compiles_spill_free():
    cases = {c.name: c for c in K.aot_cases()}
    for name in ("bn_running_stats_float32", "bn_running_stats_float16_f32stats",
                 "bn_running_stats_bfloat16_f32stats"):
        r = _aot.compile_case(cases[name], 90)
        assert r.registers > 0 and r.spill_bytes == 0 and r.stack_bytes == 0, name
