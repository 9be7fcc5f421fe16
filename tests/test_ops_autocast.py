"""Autocast (``slimops.ops.autocast``): which ops get an autocast kernel and where, the cast
rules, and the whole path run without a GPU.

No GPU here, so the CUDA registration is checked in the dispatcher's table
(``AutocastCUDA``), and the path a CUDA tensor takes under ``torch.autocast("cuda")`` is run
on the CPU instead: the fixture ``amp_on_cpu`` registers the ops' Triton launchers for the
CPU key (``cuda_registration.apply``, the code that registers them for CUDA; they run under
``TRITON_INTERPRET=1``, which tests/conftest.py sets) and the same autocast kernels for
``AutocastCPU``, and lets float16/bfloat16 CPU tensors reach the ops (as they do on CUDA);
it undoes all three afterwards. The interpreter's bf16 dot product is wrong
(docs/GPU_KERNELS.md), so bf16 values are compared for the ops without one (depthwise,
batch norm) and bf16 conv2d / linear are checked for dtypes and routing only.
"""

from __future__ import annotations

import pytest
import torch

import slimops
from slimops import reference
from slimops.op_families import FAMILY_OF, IN_PLACE_OPS
from slimops.ops import _backend, autocast


F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
needs_c = pytest.mark.skipif(not _backend.HAS_C, reason="needs the compiled extension (the ops)")
FUSED = ("conv2d_bn_act_train", "depthwise_conv2d_bn_act_train")


# --------------------------------------------------------------------------------------
# the registration table


def test_policies_cover_every_forward_op_and_no_backward_op():
    forward = {op for op in FAMILY_OF if "backward" not in op and op not in IN_PLACE_OPS}
    assert set(autocast.POLICIES) == forward | set(FUSED)
    # the statistics returned as float32 are the ops' mean / var outputs
    assert autocast.POLICIES["batch_norm_act"] == (1, 2)
    assert all(autocast.POLICIES[op] == (2, 3) for op in FUSED)
    assert all(autocast.POLICIES[op] == () for op in ("conv2d", "depthwise_conv2d", "linear"))


@needs_c
@pytest.mark.parametrize("op", sorted(set(FAMILY_OF) | set(FUSED)))
def test_cuda_autocast_kernels_registered_for_forward_ops_only(op):
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"slimops::{op}", "AutocastCUDA")
    assert has == (op in autocast.POLICIES), op
    # CPU autocast is not registered: the C++ CPU kernels implement float32/float64 only
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"slimops::{op}", "AutocastCPU")
    assert set(autocast.registered("cuda")) == set(autocast.POLICIES)
    assert autocast.registered("cpu") == ()


@needs_c
def test_register_is_idempotent():
    assert autocast.register("cuda") == {op: True for op in autocast.POLICIES}
    assert set(autocast.registered("cuda")) == set(autocast.POLICIES)


@needs_c
def test_cpu_autocast_leaves_the_ops_in_float32():
    """Under CPU autocast the ops keep running their float32 C++ kernels (no cast, no
    error), bit for bit what they give outside autocast."""
    x, w, b = torch.randn(2, 6, 7, 7), torch.randn(12, 4, 3, 3), torch.randn(12)
    plain = slimops.ops.conv2d(x, w, b, 9, 1, 1, 1, 3, activation="relu")
    xl, wl = torch.randn(3, 5), torch.randn(7, 6)
    with torch.autocast("cpu", dtype=BF16):
        out = slimops.ops.conv2d(x, w, b, 9, 1, 1, 1, 3, activation="relu")
        lin = slimops.ops.linear(xl, wl, None, 4)
        # mixed dtypes are still an error where slimops does not cast
        with pytest.raises(TypeError, match="weight has dtype torch.float32"):
            slimops.ops.conv2d(x.to(BF16), w, None, 9, 1, 1, 1, 3)
    assert out.dtype == F32 and lin.dtype == F32
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(lin, slimops.ops.linear(xl, wl, None, 4), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# the cast rules


def test_cast_arg_casts_floating_tensors_of_the_device_only():
    half = autocast.cast_arg(torch.ones(2), "cpu", F16)
    assert half.dtype == F16
    for keep in (torch.ones(2, dtype=F64), torch.ones(2, dtype=torch.int64),
                 torch.ones(2, dtype=F16), None, 3, 0.5, "relu"):
        out = autocast.cast_arg(keep, "cpu", F16)
        assert out is keep
    meta = torch.ones(2, device="meta")
    assert autocast.cast_arg(meta, "cpu", F16) is meta  # another device: untouched
    lst = autocast.cast_arg([torch.ones(1), 2, (torch.ones(1, dtype=F64),)], "cpu", BF16)
    assert lst[0].dtype == BF16 and lst[1] == 2 and lst[2][0].dtype == F64


def test_statistics_as_float32():
    out = (torch.ones(2, dtype=F16), torch.ones(2, dtype=F16), torch.ones(2, dtype=BF16))
    got = autocast.statistics_as_float32(out, (1, 2))
    assert [t.dtype for t in got] == [F16, F32, F32]
    same = torch.ones(2, dtype=F16)
    assert autocast.statistics_as_float32(same, ()) is same
    f64 = (torch.ones(1), torch.ones(1, dtype=F64))
    assert autocast.statistics_as_float32(f64, (1,))[1].dtype == F64


def test_make_kernel_casts_to_the_current_autocast_dtype_and_excludes_itself():
    seen = []

    class FakeOp:
        __name__ = "fake.default"

        def __call__(self, *args):
            # autocast's own key is excluded while the op runs (no recursion)
            seen.append((tuple(getattr(a, "dtype", a) for a in args),
                         torch._C._dispatch_tls_is_dispatch_key_excluded(
                             torch._C.DispatchKey.AutocastCPU)))
            return args[0], args[0] * 2, args[0] * 3

    kernel = autocast.make_kernel(FakeOp(), "cpu", (1, 2))
    for dtype in (F16, BF16):
        with torch.autocast("cpu", dtype=dtype):
            out, mean, var = kernel(None, torch.ones(3), None, 2, torch.ones(3, dtype=F64))
        assert seen[-1] == ((dtype, None, 2, F64), True)
        assert out.dtype == dtype and mean.dtype == F32 and var.dtype == F32


def test_dtypes_match_only_where_slimops_casts():
    x16, w32 = torch.ones(1, dtype=F16), torch.ones(1)
    assert autocast.dtypes_match(w32, w32)
    assert not autocast.dtypes_match(x16, w32)
    with torch.autocast("cpu", dtype=F16):
        assert not autocast.casts(x16)  # no CPU autocast kernels registered
        assert not autocast.dtypes_match(x16, w32)


# --------------------------------------------------------------------------------------
# the CUDA path, run on the CPU


@pytest.fixture
def amp_on_cpu():
    """The ops on their Triton launchers and with autocast kernels, for the CPU key."""
    from slimops import kernels
    from slimops.ops import cuda_registration as cr

    if not (_backend.HAS_C and kernels.available()):
        pytest.skip("needs the compiled extension and triton")
    called = []  # (op, the dtype of its first argument) for every launcher call

    def recording(op):
        launch = cr._lazy(op)

        def fn(*args):
            called.append((op, args[0].dtype))
            return launch(*args)
        return fn

    launchers = {op: recording(op) for op in cr.OP_FAMILIES}
    with pytest.MonkeyPatch.context() as mp:
        # float16/bfloat16 CPU tensors reach the ops, as CUDA tensors do
        mp.setattr(_backend, "NATIVE_CPU_DTYPES", _backend.NATIVE_CUDA_DTYPES)
        try:
            assert set(cr.apply(launchers, False, True, dispatch_key="CPU").values()) == {"triton"}
            autocast.register("cpu")
            yield called
        finally:
            autocast.unregister("cpu")
            # prefer the "C++" kernel: removes the Triton launchers, the CPU kernels run again
            assert set(cr.apply(launchers, True, True, dispatch_key="CPU").values()) == {"cuda"}
    assert not autocast.casts(torch.ones(1))


def _leaves(*tensors):
    return [t.clone().requires_grad_() if t is not None else None for t in tensors]


CASES = {
    # name: (make inputs, call(op inputs...) -> out, reference(inputs in dtype...) -> out)
    "conv2d": (
        lambda: (torch.randn(2, 6, 7, 7), torch.randn(12, 4, 3, 3), torch.randn(12),
                 torch.rand(9) + 0.5, torch.randn(9), torch.randn(2, 9, 4, 4)),
        lambda x, w, b, s, h, r: slimops.ops.conv2d(x, w, b, 9, 2, 1, 1, 3, s, h, r, "relu"),
        lambda x, w, b, s, h, r: reference.conv2d(x, w, b, 9, 2, 1, 1, 3, s, h, r, "relu"),
    ),
    "depthwise_conv2d": (
        lambda: (torch.randn(2, 5, 7, 7), torch.randn(8, 1, 3, 3), torch.randn(8),
                 torch.randn(2, 5, 7, 7)),
        lambda x, w, b, r: slimops.ops.depthwise_conv2d(x, w, b, 1, 1, 1, residual=r,
                                                        activation="relu6"),
        lambda x, w, b, r: reference.depthwise_conv2d(x, w, b, 1, 1, 1, residual=r,
                                                      activation="relu6"),
    ),
    "linear": (
        lambda: (torch.randn(3, 5), torch.randn(9, 7), torch.randn(9)),
        lambda x, w, b: slimops.ops.linear(x, w, b, 6),
        lambda x, w, b: reference.linear(x, w, b, 6),
    ),
}
# the interpreter's bf16 dot product is wrong: bf16 values only for the ops without one
VALUES = {F16: set(CASES), BF16: {"depthwise_conv2d"}}
TOL = {F16: dict(rtol=2e-3, atol=2e-3), BF16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_ops_run_in_the_autocast_dtype(amp_on_cpu, case, dtype):
    make, call, ref = CASES[case]
    inputs = make()
    leaves = _leaves(*inputs)
    with torch.autocast("cpu", dtype=dtype):
        out = call(*leaves)
    assert out.dtype == dtype, case
    assert amp_on_cpu == [(case, dtype)]  # the op's low-precision kernel ran
    grad = torch.randn(out.shape)
    out.backward(grad.to(dtype))
    backward_ops = {op for op, _ in amp_on_cpu[1:]}
    assert backward_ops and all(op.startswith(case) or op == "epilogue_backward"
                                for op in backward_ops), backward_ops
    assert {d for _, d in amp_on_cpu} == {dtype}  # the backward in the same dtype
    for leaf in leaves:  # gradients reach the float32 leaves in float32, through the casts
        assert leaf.grad is not None and leaf.grad.dtype == F32
    if case not in VALUES[dtype]:
        return
    # the same op in the low dtype, outside autocast, on the reference: what autocast means
    low = _leaves(*(t.to(dtype) for t in inputs))
    expected = ref(*low)
    expected.backward(grad.to(dtype))
    torch.testing.assert_close(out, expected, **TOL[dtype])
    for leaf, e in zip(leaves, low):
        torch.testing.assert_close(leaf.grad, e.grad.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_act_statistics_stay_float32(amp_on_cpu, dtype, training):
    x = torch.randn(4, 5, 3, 3) * 2 + 1
    gamma, beta, res = _leaves(torch.rand(5) + 0.5, torch.randn(5), torch.randn(4, 5, 3, 3))
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    erm, erv = rm.to(dtype), rv.to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = slimops.ops.batch_norm_act(x, gamma, beta, rm, rv, training, 0.3, residual=res,
                                         activation="relu")
    assert out.dtype == dtype
    assert rm.dtype == F32 and rv.dtype == F32  # updated in place, still float32
    expected = reference.batch_norm_act(x.to(dtype), gamma.detach().to(dtype),
                                        beta.detach().to(dtype), erm, erv, training, 0.3,
                                        residual=res.detach().to(dtype), activation="relu")
    torch.testing.assert_close(out, expected, **TOL[dtype])
    torch.testing.assert_close(rm, erm.float(), **TOL[dtype])
    torch.testing.assert_close(rv, erv.float(), **TOL[dtype])
    out.float().sum().backward()
    assert gamma.grad.dtype == F32 and res.grad.dtype == F32


@pytest.mark.parametrize("depthwise", [False, True], ids=["conv", "depthwise"])
def test_fused_training_ops_return_float32_statistics(amp_on_cpu, depthwise):
    x = torch.randn(2, 4, 6, 6)
    gamma, beta = _leaves(torch.rand(4) + 0.5, torch.randn(4))
    with torch.autocast("cpu", dtype=F16):
        if depthwise:
            w = torch.randn(6, 1, 3, 3, requires_grad=True)
            out, mean, var = slimops.ops.depthwise_conv2d_bn_act_train(
                x, w, None, [1, 1], [1, 1], [1, 1], gamma, beta, 1e-5, None, 2)
            z = reference.depthwise_conv2d(x.half(), w.detach().half(), None, 1, 1, 1)
        else:
            w = torch.randn(6, 4, 3, 3, requires_grad=True)
            out, mean, var = slimops.ops.conv2d_bn_act_train(
                x, w, None, 4, [1, 1], [1, 1], [1, 1], 1, gamma, beta, 1e-5, None, 2)
            z = reference.conv2d(x.half(), w.detach().half(), None, 4, 1, 1, 1, 1)
    assert out.dtype == F16 and mean.dtype == F32 and var.dtype == F32
    zf = z.float()
    torch.testing.assert_close(mean, zf.mean((0, 2, 3)), **TOL[F16])
    torch.testing.assert_close(var, zf.var((0, 2, 3), unbiased=False), **TOL[F16])
    out.float().sum().backward()
    assert w.grad.dtype == F32 and gamma.grad.dtype == F32


def test_float64_is_not_cast(amp_on_cpu):
    x, w = torch.randn(2, 4, 5, 5, dtype=F64), torch.randn(6, 4, 3, 3, dtype=F64)
    with torch.autocast("cpu", dtype=F16):
        out = slimops.ops.conv2d(x, w, None, 6, 1, 1)
    assert out.dtype == F64
    torch.testing.assert_close(out, reference.conv2d(x, w, None, 6, 1, 1))


def test_slimmable_model_trains_and_evaluates_under_autocast(amp_on_cpu):
    """A slimmable model (conv + S-BN + act, depthwise, linear) under autocast float16:
    layers accept the float16 activations with their float32 parameters, the output is
    float16, every gradient and running statistic float32, close to the float32 model."""
    import copy

    from slimops.nn import SlimConvBNAct, SlimmableConv2d, SlimmableLinear

    widths = (0.5, 1.0)
    model = torch.nn.Sequential(
        SlimConvBNAct(3, [4, 8], 3, stride=2, widths=widths),
        SlimConvBNAct([4, 8], [4, 8], 3, padding=1, groups=8, widths=widths,
                      activation="relu6"),
        SlimmableConv2d([4, 8], [6, 12], 1, widths=widths),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        SlimmableLinear([6, 12], 5, widths=widths),
    )
    fp32 = copy.deepcopy(model)
    x = torch.randn(2, 3, 9, 9)
    for w in widths:
        slimops.set_width(model, w)
        slimops.set_width(fp32, w)
        for training in (True, False):
            model.train(training)
            fp32.train(training)
            with torch.autocast("cpu", dtype=F16):
                out = model(x)
            assert out.dtype == F16, (w, training)
            expected = fp32(x)
            torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
            if training:
                out.float().square().sum().backward()
                expected.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(g.dtype == F32 for g in grads.values())
    for name, p in fp32.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=5e-2, atol=5e-2,
                                       msg=lambda m: f"{name}: {m}")
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == F32, name


def test_autocast_kernel_traces_under_torch_compile(amp_on_cpu):
    """torch.compile (aot_eager, one graph) traces through the autocast kernel: the same
    float16 result and float32 weight gradient as eager."""
    x = torch.randn(2, 6, 7, 7)
    w = torch.randn(12, 6, 3, 3, requires_grad=True)

    def f(x, w):
        with torch.autocast("cpu", dtype=F16):
            return torch.ops.slimops.conv2d(x, w, None, 10, [1, 1], [1, 1], [1, 1], 1, None,
                                            None, None, 1)

    eager = f(x, w)
    (g_eager,) = torch.autograd.grad(eager.float().sum(), [w])
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    assert compiled.dtype == F16
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    (g,) = torch.autograd.grad(compiled.float().sum(), [w])
    assert g.dtype == F32
    torch.testing.assert_close(g, g_eager, rtol=1e-3, atol=1e-3)
    torch._dynamo.reset()
