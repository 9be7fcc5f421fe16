"""slimops.ops.batch_norm_act (the compiled kernel behind it) against
slimops.reference.batch_norm_act, in training and eval: outputs, the updated running
statistics, gradients; residual, activations, weight/bias None, momentum, 2-D/3-D/4-D inputs;
float64 gradcheck; torch.library.opcheck of the (functional) op and its backward; compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimops
from slimops import reference

from helpers import OPCHECK_UTILS, leaf

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
    ),
]

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [pytest.param(F32, id="f32"), pytest.param(F64, id="f64")]
ACTS = [pytest.param(None, id="none"), pytest.param("relu", id="relu"),
        pytest.param("relu6", id="relu6")]
# The kernel's paths (csrc/cpu/batch_norm_act.cpp): planes below 64 positions, and below 256
# when N * 32 >= H * W, take the row path, whose column blocks are 512 positions wide
# ("4d_wide": 630 positions per image, two blocks); other planes take the per-plane path,
# whose float sums run in blocks of 32 elements and finish in double ("4d_few_images": 3
# images of 9x11, 99 elements; "4d_big_plane": 272).
# Paths (csrc/cpu/batch_norm_act.cpp, row_path): 2d, 3d, 4d, 4d_wide take the row path; the
# others the per-plane loops, whose float sums run in whole steps, single vectors and a scalar
# tail (4d_one_image: 35 positions, 4d_7x7: 49).
SHAPES = {"2d": (16, 5), "3d": (3, 5, 7), "4d": (3, 5, 4, 3), "4d_wide": (3, 70, 3, 3),
          "4d_big_plane": (2, 3, 17, 16), "4d_few_images": (3, 6, 9, 11),
          "4d_one_image": (1, 6, 5, 7), "4d_7x7": (2, 5, 7, 7)}
AFFINE = {"affine": (True, True), "none": (False, False), "weight": (True, False),
          "bias": (False, True)}


def make_case(shape, dtype, *, with_weight=True, with_bias=True, with_residual=False,
              spread=3.0):
    """Inputs with a per-channel offset and scale (so the statistics matter), γ, β, running
    statistics and an optional residual."""
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    x = torch.randn(*shape, dtype=dtype) * (torch.rand(c, dtype=dtype) * 2 + 0.5).view(view)
    x = x + (torch.randn(c, dtype=dtype) * spread).view(view)
    return dict(
        input=x,
        weight=torch.rand(c, dtype=dtype) * 4 + 1 if with_weight else None,
        bias=torch.randn(c, dtype=dtype) * 2 if with_bias else None,
        running_mean=torch.randn(c, dtype=dtype),
        running_var=torch.rand(c, dtype=dtype) + 0.5,
        residual=torch.randn(*shape, dtype=dtype) * 2 if with_residual else None,
    )


def run_and_compare(case, training, momentum, activation, tol, *, grad_out=None, eps=1e-5):
    """Both implementations on independent leaves and running-stat clones: outputs, the
    running statistics after the call, and input/γ/β/residual gradients."""
    def args(contiguous_vectors=False):
        a = {k: (None if v is None else
                 (v.clone() if k.startswith("running") else leaf(v)))
             for k, v in case.items()}
        if contiguous_vectors:
            # torch's own CPU batch_norm backward gives a wrong input gradient for a
            # channels_last input and gradient with a non-contiguous weight (torch 2.13), so
            # the oracle gets contiguous copies of γ and β (same values)
            for k in ("weight", "bias"):
                if a[k] is not None:
                    a[k] = leaf(a[k].contiguous())
        return a

    mine, ref_args = args(), args(contiguous_vectors=True)
    out = slimops.ops.batch_norm_act(training=training, momentum=momentum, eps=eps,
                                     activation=activation, **mine)
    ref = reference.batch_norm_act(training=training, momentum=momentum, eps=eps,
                                   activation=activation, **ref_args)
    dtype = case["input"].dtype
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol(dtype, ref))
    for k in ("running_mean", "running_var"):
        if case[k] is not None:
            torch.testing.assert_close(mine[k], ref_args[k], **tol(dtype, ref_args[k]),
                                       msg=lambda m: f"{k}: {m}")
    names = [k for k in ("input", "weight", "bias", "residual") if case[k] is not None]
    if out.numel() == 0:
        return out, ref, mine
    g = torch.randn_like(ref) if grad_out is None else grad_out
    grads = torch.autograd.grad(out, [mine[k] for k in names], g)
    ref_grads = torch.autograd.grad(ref, [ref_args[k] for k in names], g)
    for name, got, exp in zip(names, grads, ref_grads):
        assert got.shape == case[name].shape, name
        torch.testing.assert_close(got, exp, **tol(dtype, exp), msg=lambda m: f"{name}: {m}")
    return out, ref, mine


# --------------------------------------------------------------------------------------
# training and eval against the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(training, shape, affine, with_residual, activation, dtype, tol):
    with_weight, with_bias = AFFINE[affine]
    case = make_case(SHAPES[shape], dtype, with_weight=with_weight, with_bias=with_bias,
                     with_residual=with_residual)
    before = case["running_mean"].clone(), case["running_var"].clone()
    _, ref, mine = run_and_compare(case, training, 0.1, activation, tol)
    changed = not torch.equal(mine["running_mean"], before[0])
    assert changed == training  # only training updates the running statistics
    assert torch.equal(case["running_var"], before[1])  # the clones were updated, not these
    if activation is not None:
        assert (ref == 0).any() and (ref > 0).any()
    if activation == "relu6" and with_weight:  # γ up to 5: the upper clip is reached
        assert (ref == 6).any()


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_momentum(momentum, tol):
    """Several training steps in a row: the exponential averages follow F.batch_norm's."""
    case = make_case((4, 6, 3, 3), F64)
    ours = case["running_mean"].clone(), case["running_var"].clone()
    theirs = case["running_mean"].clone(), case["running_var"].clone()
    for step in range(3):
        x = case["input"] * (step + 1) + step
        slimops.ops.batch_norm_act(x, case["weight"], case["bias"], *ours, True, momentum)
        reference.batch_norm_act(x, case["weight"], case["bias"], *theirs, True, momentum)
        torch.testing.assert_close(ours[0], theirs[0], **tol(F64))
        torch.testing.assert_close(ours[1], theirs[1], **tol(F64, theirs[1]))
    if momentum == 0.0:
        assert torch.equal(ours[0], case["running_mean"])


def test_training_without_running_stats(tol):
    case = make_case((5, 4, 3), F64, with_residual=True)
    case["running_mean"] = case["running_var"] = None
    run_and_compare(case, True, 0.1, "relu", tol)


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_eps(eps, tol):
    case = make_case((4, 3, 5), F64)
    for training in (True, False):
        run_and_compare(case, training, 0.1, None, tol, eps=eps)


def test_eval_is_affine_in_the_running_stats(tol):
    """Eval mode uses the running statistics, not the batch's."""
    case = make_case((4, 3, 2, 2), F64)
    out = slimops.ops.batch_norm_act(case["input"], case["weight"], case["bias"],
                                     case["running_mean"], case["running_var"], False)
    view = (1, 3, 1, 1)
    expected = ((case["input"] - case["running_mean"].view(view))
                / (case["running_var"].view(view) + 1e-5).sqrt()
                * case["weight"].view(view) + case["bias"].view(view))
    torch.testing.assert_close(out, expected, **tol(F64, expected))


@pytest.mark.parametrize("n", [0, 1], ids=["N0", "N1"])
def test_eval_small_batches(n, tol):
    case = make_case((n, 4, 3, 3), F64, with_residual=True)
    run_and_compare(case, False, 0.1, "relu6", tol)


def test_training_single_value_per_channel_raises():
    case = make_case((1, 4), F64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        slimops.ops.batch_norm_act(case["input"], None, None, None, None, True)


def test_eval_without_running_stats_raises():
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        slimops.ops.batch_norm_act(x, None, None, None, None, False)


# --------------------------------------------------------------------------------------
# threads and layouts


@pytest.mark.parametrize("shape", [(64, 33), (3, 17, 9, 11), (1, 5, 40, 40), (64, 96, 6, 6)],
                         ids=["2d_wide", "4d", "4d_one_image", "4d_small_planes"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_threaded(training, shape, all_threads, tol):
    assert torch.get_num_threads() >= 2
    case = make_case(shape, F32, with_residual=True)
    run_and_compare(case, training, 0.1, "relu", tol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("how", ["channels_last", "sliced"])
def test_layouts(how, training, tol, all_threads):
    """Non-contiguous input, residual, gradient, and strided 1-D parameters and statistics
    (read through their strides; the statistics updated in place through them)."""
    case = make_case((3, 6, 5, 4), F64, with_residual=True)

    def relayout(t):
        if how == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]

    def strided(v):
        wide = torch.zeros(2 * v.shape[0], dtype=v.dtype)
        wide[::2] = v
        return wide[::2]

    case["input"], case["residual"] = relayout(case["input"]), relayout(case["residual"])
    for k in ("weight", "bias", "running_mean", "running_var"):
        case[k] = strided(case[k])
    assert not case["input"].is_contiguous() and not case["running_var"].is_contiguous()
    g = relayout(torch.randn(3, 6, 5, 4, dtype=F64))
    run_and_compare(case, training, 0.3, "relu6", tol, grad_out=g)


# --------------------------------------------------------------------------------------
# gradcheck (float64)


def _away_from_kinks(pre):
    target = torch.where(pre.abs() < 0.5, pre.sign() * 0.5 + (pre == 0) * 0.5, pre)
    target = torch.where((target - 6).abs() < 0.5, 6 + (target - 6).sign() * 0.5, target)
    return target - pre


GRADCHECK_CASES = {
    # name: (shape, training, affine, activation, fast_mode)
    "train_4d_affine": ((2, 3, 3, 2), True, True, None, False),
    "train_2d_relu": ((6, 4), True, True, "relu", False),
    "train_3d_noaffine_relu6": ((3, 2, 4), True, False, "relu6", False),
    "eval_4d_affine_relu6": ((2, 3, 3, 2), False, True, "relu6", False),
    "eval_2d_noaffine": ((5, 3), False, False, None, False),
    "train_4d_bigger_fast": ((3, 5, 4, 4), True, True, "relu", True),
}


@pytest.mark.parametrize("case_name", list(GRADCHECK_CASES))
def test_gradcheck(case_name):
    shape, training, affine, act, fast = GRADCHECK_CASES[case_name]
    case = make_case(shape, F64, with_weight=affine, with_bias=affine)
    rm, rv = case["running_mean"], case["running_var"]
    with torch.no_grad():
        pre = reference.batch_norm_act(case["input"], case["weight"], case["bias"], rm.clone(),
                                       rv.clone(), training)
        residual = torch.randn_like(pre)
        residual += _away_from_kinks(pre + residual)
    tensors = [leaf(case["input"]), leaf(residual)]
    if affine:
        tensors += [leaf(case["weight"]), leaf(case["bias"])]

    def fn(x, r, w=None, b=None):
        # running stats as fresh clones: the op updates them in training
        return slimops.ops.batch_norm_act(x, w, b, rm.clone(), rv.clone(), training,
                                          residual=r, activation=act)

    assert torch.autograd.gradcheck(fn, tuple(tensors), fast_mode=fast)


# --------------------------------------------------------------------------------------
# torch.library.opcheck: the op is functional (returns the statistics it used)


def _bn_sample(shape, training, grad, *, stats=True, affine=True, residual=True, act=0,
               dtype=F64):
    case = make_case(shape, dtype, with_weight=affine, with_bias=affine,
                     with_residual=residual)
    opt = lambda t: None if t is None else leaf(t, grad)
    return (leaf(case["input"], grad), opt(case["weight"]), opt(case["bias"]),
            case["running_mean"].clone() if stats else None,
            case["running_var"].clone() if stats else None, training, 1e-5,
            opt(case["residual"]), act)


OPCHECK_SAMPLES = {
    "train_no_stats_no_grad": lambda: _bn_sample((3, 4, 2, 2), True, False, stats=False, act=1),
    "train_stats_grad": lambda: _bn_sample((3, 4, 2, 2), True, True),
    "train_2d_grad_relu_no_residual": lambda: _bn_sample((6, 3), True, True, residual=False,
                                                         act=1),
    "eval_grad_noaffine_f32": lambda: _bn_sample((3, 4, 5), False, True, affine=False,
                                                 dtype=F32),
    "eval_grad_relu6_no_residual": lambda: _bn_sample((2, 3, 3, 3), False, True, residual=False,
                                                      act=2),
    "train_grad_relu_residual": lambda: _bn_sample((3, 4, 2, 2), True, True, act=1),
}


@pytest.mark.parametrize("make", list(OPCHECK_SAMPLES.values()), ids=list(OPCHECK_SAMPLES))
def test_opcheck_batch_norm_act(make):
    torch.library.opcheck(torch.ops.slimops.batch_norm_act.default, make(),
                          test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_backward(training):
    case = make_case((3, 4, 2, 3), F64)
    out, mean, var = torch.ops.slimops.batch_norm_act(
        case["input"], case["weight"], case["bias"], case["running_mean"], case["running_var"],
        training, 1e-5, None, 1)
    args = (torch.randn_like(out), case["input"], out, case["weight"], mean, var, 1e-5,
            training, 1)
    torch.library.opcheck(torch.ops.slimops.batch_norm_act_backward.default, args,
                          test_utils=OPCHECK_UTILS)


# --------------------------------------------------------------------------------------
# the statistics' dtype (issue 17): stats_dtype(input.dtype) from the fake and every
# implementation, saved as such for the backward


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64], ids=str)
def test_fake_statistics_dtype_is_stats_dtype(dtype, training):
    """The fake promises ``mean``/``var`` in ``stats_dtype``: fp32 for fp16/bf16 (and fp32)
    inputs, fp64 for fp64; ``out`` in the input's dtype. Where the CPU op runs (fp32, fp64)
    it returns the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert reference.stats_dtype(dtype) == (F64 if dtype == F64 else F32)
    case = make_case((3, 4, 2, 2), dtype)
    args = (case["input"], case["weight"], case["bias"], case["running_mean"],
            case["running_var"], training, 1e-5, None, 0)
    with FakeTensorMode() as mode:
        fake = torch.ops.slimops.batch_norm_act.default(
            *(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert [t.dtype for t in fake] == [dtype, reference.stats_dtype(dtype),
                                       reference.stats_dtype(dtype)]
    if dtype in (F32, F64):
        real = torch.ops.slimops.batch_norm_act.default(*args)
        assert [t.dtype for t in real] == [t.dtype for t in fake]


@pytest.fixture
def triton_on_cpu():
    """The ops on their Triton launchers for the CPU key (the code a CUDA tensor runs; under
    ``TRITON_INTERPRET=1``, which tests/conftest.py sets; autograd's backward of a residual
    is ``epilogue_backward``), with fp16/bf16 CPU tensors let through the op layer, as CUDA
    ones are. Yields the dtypes of the ``mean``/``var`` every ``batch_norm_act_backward``
    call received; undone afterwards."""
    from slimops import kernels
    from slimops.ops import _backend
    from slimops.ops import cuda_registration as cr

    if not kernels.available():
        pytest.skip("needs triton")
    seen = []
    backward = cr._lazy("batch_norm_act_backward")

    def recording_backward(*args):
        seen.append((args[4].dtype, args[5].dtype))
        return backward(*args)

    launchers = {op: cr._lazy(op) for op in cr.OP_FAMILIES}
    launchers["batch_norm_act_backward"] = recording_backward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_backend, "NATIVE_CPU_DTYPES", _backend.NATIVE_CUDA_DTYPES)
        try:
            assert set(cr.apply(launchers, False, True, dispatch_key="CPU").values()) == {"triton"}
            yield seen
        finally:
            # prefer the "C++" kernel: removes the launchers, the CPU kernels run again
            assert set(cr.apply(launchers, True, True, dispatch_key="CPU").values()) == {"cuda"}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_opcheck_triton_half_precision(triton_on_cpu, dtype, training):
    """The Triton implementation returns fp32 statistics for fp16/bf16 inputs and agrees
    with the fake (opcheck's fake-tensor and AOT-dispatch tests compare them); its backward
    takes those fp32 statistics."""
    args = _bn_sample((3, 4, 2, 2), training, True, act=1, dtype=dtype)
    out, mean, var = torch.ops.slimops.batch_norm_act.default(*args)
    assert out.dtype == dtype and mean.dtype == var.dtype == F32
    torch.library.opcheck(torch.ops.slimops.batch_norm_act.default, args,
                          test_utils=OPCHECK_UTILS)
    x, w = args[0].detach(), args[1].detach()
    bargs = (torch.randn_like(out), x, out.detach(), w, mean, var, 1e-5, training, 1)
    torch.library.opcheck(torch.ops.slimops.batch_norm_act_backward.default, bargs,
                          test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_half_precision_training_saves_fp32_statistics(triton_on_cpu, dtype):
    """Through the op layer and the C++ autograd kernel: the backward receives the fp32
    statistics the forward returned (autograd's saved tensors), the gradients match float64
    autograd over the same stored values, and the running statistics (buffers of the
    input's dtype, as after ``model.half()``) are updated in their own dtype."""
    case = make_case((4, 3, 5, 5), F32, with_residual=True)
    x, w, b, res = (leaf(case[k].to(dtype)) for k in ("input", "weight", "bias", "residual"))
    rm, rv = case["running_mean"].to(dtype), case["running_var"].to(dtype)
    rm0, rv0 = rm.double(), rv.double()
    momentum = 0.3
    out = slimops.ops.batch_norm_act(x, w, b, rm, rv, True, momentum, residual=res,
                                     activation="relu")
    assert out.dtype == dtype and rm.dtype == rv.dtype == dtype
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, w, b, res], g)
    assert triton_on_cpu == [(F32, F32)]
    assert [t.dtype for t in grads] == [dtype] * 4

    xd, wd, bd, rd = (leaf(t.detach().double()) for t in (x, w, b, res))
    ref = reference.batch_norm_act(xd, wd, bd, None, None, True, residual=rd, activation="relu")
    ref_grads = torch.autograd.grad(ref, [xd, wd, bd, rd], g.double())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == BF16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.double(), ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=tol["rtol"],
                                   atol=tol["atol"] * max(1.0, float(want.abs().max())))
    dims = (0, 2, 3)  # F.batch_norm's update: the unbiased batch variance
    want_rm = rm0 * (1 - momentum) + xd.detach().mean(dims) * momentum
    want_rv = rv0 * (1 - momentum) + xd.detach().var(dims) * momentum
    torch.testing.assert_close(rm.double(), want_rm, **tol)
    torch.testing.assert_close(rv.double(), want_rv, **tol)


def test_functional_op_returns_statistics_and_leaves_stats_alone(tol):
    case = make_case((4, 3, 5), F64)
    rm, rv = case["running_mean"].clone(), case["running_var"].clone()
    out, mean, var = torch.ops.slimops.batch_norm_act(case["input"], None, None, rm, rv, True,
                                                      1e-5, None, 0)
    torch.testing.assert_close(mean, case["input"].mean((0, 2)), **tol(F64))
    torch.testing.assert_close(var, case["input"].var((0, 2), unbiased=False), **tol(F64))
    assert torch.equal(rm, case["running_mean"]) and torch.equal(rv, case["running_var"])
    _, mean_e, var_e = torch.ops.slimops.batch_norm_act(case["input"], None, None, rm, rv, False,
                                                        1e-5, None, 0)
    assert torch.equal(mean_e, rm) and torch.equal(var_e, rv)


# --------------------------------------------------------------------------------------
# update_running_stats: the running statistics' fold, one op on CPU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_update_running_stats_matches_batch_norm(momentum, dtype, tol):
    """The op's fold equals F.batch_norm's own update of its running statistics; the
    version counters move, as for any in-place op (eval-plan caches key on them)."""
    x = torch.randn(7, 5, 3, dtype=dtype)
    theirs = torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.5
    ours = theirs[0].clone(), theirs[1].clone()
    F.batch_norm(x, *theirs, training=True, momentum=momentum)
    versions = [t._version for t in ours]
    torch.ops.slimops.update_running_stats(*ours, x.mean((0, 2)), x.var((0, 2), unbiased=False),
                                           x.numel() // 5, momentum)
    torch.testing.assert_close(ours[0], theirs[0], **tol(dtype))
    torch.testing.assert_close(ours[1], theirs[1], **tol(dtype, theirs[1]))
    assert [t._version for t in ours] == [v + 1 for v in versions]


def test_update_running_stats_prefix_views_and_wrapper(tol):
    """Prefix views of a shared BN's buffers (the naive baseline's widths) are updated in
    place, the rest untouched; ``slimops.ops.update_running_stats`` takes the op on CPU and
    the aten ops for a dtype the kernel lacks, with the same result."""
    full = torch.zeros(9, dtype=F64), torch.ones(9, dtype=F64)
    mean, var = torch.arange(4, dtype=F64), torch.full((4,), 3.0, dtype=F64)
    slimops.ops.update_running_stats(full[0][:4], full[1][:4], mean, var, 4, 0.5)
    assert torch.equal(full[0], torch.cat([mean * 0.5, torch.zeros(5, dtype=F64)]))
    assert torch.equal(full[1], torch.cat([torch.full((4,), 0.5 + 0.5 * 4.0, dtype=F64),
                                           torch.ones(5, dtype=F64)]))
    half = torch.zeros(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)
    slimops.ops.update_running_stats(*half, mean.bfloat16(), var.bfloat16(), 4, 0.5)
    assert torch.equal(half[0], (mean * 0.5).bfloat16())


def test_update_running_stats_rejects_bad_arguments():
    rm, rv = torch.zeros(4), torch.ones(4)
    op = torch.ops.slimops.update_running_stats
    with pytest.raises(RuntimeError, match="count must be above 1"):
        op(rm, rv, torch.zeros(4), torch.ones(4), 1, 0.1)
    with pytest.raises(RuntimeError, match="vector of running_mean's 4 values"):
        op(rm, rv, torch.zeros(5), torch.ones(4), 8, 0.1)
    with pytest.raises(RuntimeError, match="var is Double"):
        op(rm, rv, torch.zeros(4), torch.ones(4, dtype=F64), 8, 0.1)
    with pytest.raises(RuntimeError, match="no gradient"):
        op(rm, rv, torch.zeros(4, requires_grad=True), torch.ones(4), 8, 0.1)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_update_running_stats_on_its_triton_kernel(triton_on_cpu, dtype):
    """The op on its Triton launcher (what ``cuda_registration`` registers for CUDA), through
    the dispatcher: the Autograd kernel bumps the versions, fp32 statistics fold into
    buffers of the model's dtype (a ``.half()`` model's) without a cast."""
    torch.manual_seed(0)
    rm, rv = torch.randn(6).to(dtype), (torch.rand(6) + 0.5).to(dtype)
    mean, var = torch.randn(6), torch.rand(6)
    expected = ((0.8 * rm.double() + 0.2 * mean.double()),
                (0.8 * rv.double() + 0.2 * var.double() * 12 / 11))
    versions = rm._version, rv._version
    torch.ops.slimops.update_running_stats(rm, rv, mean, var, 12, 0.2)
    assert (rm._version, rv._version) == (versions[0] + 1, versions[1] + 1)
    ulp = 3e-7 if dtype == F32 else torch.finfo(dtype).eps
    for got, want in zip((rm, rv), expected):
        torch.testing.assert_close(got.double(), want, rtol=ulp, atol=ulp)
    torch.library.opcheck(torch.ops.slimops.update_running_stats.default,
                          (rm, rv, mean.to(dtype), var.to(dtype), 12, 0.2),
                          test_utils=OPCHECK_UTILS)


def test_opcheck_update_running_stats():
    args = (torch.randn(6, dtype=F64), torch.rand(6, dtype=F64) + 1, torch.randn(6, dtype=F64),
            torch.rand(6, dtype=F64), 12, 0.1)
    torch.library.opcheck(torch.ops.slimops.update_running_stats.default, args,
                          test_utils=OPCHECK_UTILS)


# --------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


COMPILE_CASES = {
    "train_relu": (True, "relu", False),
    "train_residual_none": (True, None, True),
    "eval_relu6": (False, "relu6", False),
    "train_residual_relu": (True, "relu", True),
}


@pytest.mark.parametrize("training,act,with_residual", list(COMPILE_CASES.values()),
                         ids=list(COMPILE_CASES))
def test_compile(training, act, with_residual, fresh_dynamo, tol):
    case = make_case((4, 5, 3, 3), F32, with_residual=with_residual)
    g = torch.randn(4, 5, 3, 3)
    names = [k for k in ("input", "weight", "bias", "residual") if case[k] is not None]

    def fn(input, weight, bias, running_mean, running_var, residual=None):
        y = slimops.ops.batch_norm_act(input, weight, bias, running_mean, running_var, training,
                                       0.2, residual=residual, activation=act)
        return (y * g).sum(), y

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        a = {k: (v.clone() if k.startswith("running") else leaf(v.clone()))
             for k, v in case.items() if v is not None}
        loss, y = f(**a)
        grads = torch.autograd.grad(loss, [a[k] for k in names])
        results.append((y, grads, a["running_mean"], a["running_var"]))
    (y_e, g_e, rm_e, rv_e), (y_c, g_c, rm_c, rv_c) = results
    torch.testing.assert_close(y_c, y_e, **tol(F32, y_e))
    torch.testing.assert_close(rm_c, rm_e, **tol(F32, rm_e))
    torch.testing.assert_close(rv_c, rv_e, **tol(F32, rv_e))
    if training:
        assert not torch.equal(rm_c, case["running_mean"])
    for name, a, b in zip(names, g_c, g_e):
        torch.testing.assert_close(a, b, **tol(F32, b), msg=lambda m: f"{name}: {m}")
