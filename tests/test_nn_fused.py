"""slimops.nn.SlimConvBNAct: fused conv + switchable BN (+ residual) + activation equals the
unfused composition at every width, in training and eval, forward and backward; state dicts
round-trip; torch.compile gives the eager result."""

from __future__ import annotations

import copy
import gc
import io
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F

import slimops
from slimops.nn import SlimConvBNAct, SlimmableLinear
from slimops.width import ChannelRule, channels

from helpers import spy_eval_chain

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
WIDTHS = (0.25, 0.5, 1.0)
ACTS = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6}

# (in_channels, out_channels, groups)
KINDS = {
    "dense": ([1, 7, 13], [3, 7, 13], 1),
    "depthwise": ([3, 7, 13], [3, 7, 13], 13),
    "grouped": ([3, 6, 12], [6, 9, 12], 3),
}


def make_block(kind, dtype, randomize_bn, **kwargs):
    cin, cout, groups = KINDS[kind]
    block = SlimConvBNAct(cin, cout, 3, groups=groups, widths=WIDTHS, dtype=dtype, **kwargs)
    return randomize_bn(block)


def conv_prefix(conv, x, weight):
    """The block's convolution at the active width, by hand (no bias)."""
    cin, cout = conv.active_channels()
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    if conv.depthwise:
        return F.conv2d(x, weight[:cin], None, groups=cin, **geometry)
    g = conv.groups
    rows, og, ig = weight.shape[0] // g, cout // g, cin // g
    w = torch.cat([weight[i * rows: i * rows + og, :ig] for i in range(g)])
    return F.conv2d(x, w, None, groups=g, **geometry)


def unfused(block, x, residual, weight, bn):
    """act(batch_norm(conv(x)) + residual) from stock ops; ``bn`` is a plain nn.BatchNorm2d
    holding the active width's γ, β and running statistics (updated in training)."""
    z = conv_prefix(block.conv, x, weight)
    y = F.batch_norm(
        z, bn.running_mean, bn.running_var, bn.weight, bn.bias,
        block.training, _momentum(bn, block.training), bn.eps,
    )
    if residual is not None:
        y = y + residual
    return ACTS[block.activation](y)


def _momentum(bn, training):
    if training and bn.momentum is None:
        bn.num_batches_tracked.add_(1)
        return 1.0 / float(bn.num_batches_tracked)
    if training:
        bn.num_batches_tracked.add_(1)
    return 0.0 if bn.momentum is None else bn.momentum


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", list(ACTS), ids=["none", "relu", "relu6"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_unfused(kind, activation, with_residual, stride, train, dtype, tol,
                         randomize_bn):
    block = make_block(kind, dtype, randomize_bn, stride=stride, activation=activation)
    block.train(train)
    n_clipped = 0
    for i, w in enumerate(WIDTHS):
        slimops.set_width(block, w)
        block.zero_grad(set_to_none=True)
        before = {k: v.clone() for k, v in block.state_dict().items()}
        bn_ref = copy.deepcopy(block.bn.bn[i])
        bn_ref.zero_grad(set_to_none=True)
        weight = block.conv.weight.detach().clone().requires_grad_()

        cin, cout = block.conv.active_channels()
        x = (torch.randn(2, cin, 7, 5, dtype=dtype) * 3).requires_grad_()
        ho, wo = (7, 5) if stride == 1 else (4, 3)
        r = None
        if with_residual:
            r = (torch.randn(2, cout, ho, wo, dtype=dtype) * 3).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        r_ref = None if r is None else r.detach().clone().requires_grad_()

        y = block(x, r)
        y_ref = unfused(block, x_ref, r_ref, weight, bn_ref)
        assert y.shape == (2, cout, ho, wo)
        torch.testing.assert_close(y, y_ref, **tol(dtype))
        if activation == "relu6":
            n_clipped += int((y_ref == 6).sum())

        # running statistics: the active width's as the unfused path's, the others untouched
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(block.bn.bn[i], name), getattr(bn_ref, name),
                                       **tol(dtype), msg=name)
        for k, v in block.state_dict().items():
            if not k.startswith(f"bn.bn.{i}."):
                torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)

        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype), msg="input grad")
        # a reduction over the batch and positions: atol scales with the gradient's size
        torch.testing.assert_close(block.conv.weight.grad, weight.grad,
                                   **tol(dtype, weight.grad), msg="weight grad")
        torch.testing.assert_close(block.bn.bn[i].weight.grad, bn_ref.weight.grad, **tol(dtype),
                                   msg="gamma grad")
        torch.testing.assert_close(block.bn.bn[i].bias.grad, bn_ref.bias.grad, **tol(dtype),
                                   msg="beta grad")
        if with_residual:
            torch.testing.assert_close(r.grad, r_ref.grad, **tol(dtype), msg="residual grad")
        assert all(block.bn.bn[j].weight.grad is None for j in range(3) if j != i)
    if activation == "relu6":
        assert n_clipped > 0  # the upper clip was exercised


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("kind", ["dense", "depthwise"])
def test_running_stats_over_steps(kind, momentum, tol, randomize_bn):
    dtype = torch.float64
    block = make_block(kind, dtype, randomize_bn, momentum=momentum).train()
    refs = [copy.deepcopy(bn) for bn in block.bn.bn]
    for step, i in enumerate([2, 2, 0, 1, 0, 2, 1]):
        slimops.set_width(block, WIDTHS[i])
        x = torch.randn(3, block.conv.active_channels()[0], 5, 5, dtype=dtype) + step
        with torch.no_grad():
            block(x)
            unfused(block, x, None, block.conv.weight, refs[i])
    for bn, ref in zip(block.bn.bn, refs):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bn, name), getattr(ref, name), **tol(dtype))
    # and eval mode then uses those statistics
    block.eval()
    for i, w in enumerate(WIDTHS):
        slimops.set_width(block, w)
        x = torch.randn(2, block.conv.active_channels()[0], 4, 4, dtype=dtype)
        torch.testing.assert_close(block(x), unfused(block, x, None, block.conv.weight, refs[i]),
                                   **tol(dtype))


def test_default_padding_is_same():
    for k, d in [(1, 1), (3, 1), (5, 1), (3, 2)]:
        block = SlimConvBNAct([2, 4], [3, 5], k, dilation=d, widths=(0.5, 1.0))
        assert block(torch.randn(2, 4, 9, 7)).shape == (2, 5, 9, 7)
        slimops.set_width(block, 0.5)
        assert block(torch.randn(2, 2, 9, 7)).shape == (2, 3, 9, 7)
    assert block.conv.bias is None


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        SlimConvBNAct(3, 4, 3, activation="gelu")


def test_wrong_input():
    block = SlimConvBNAct([1, 7, 13], [3, 7, 13], 3, widths=WIDTHS)
    for train in (True, False):
        block.train(train)
        slimops.set_width(block, 0.5)
        with pytest.raises(ValueError, match=r"at width 0\.5.*\(0\.25, 0\.5, 1\.0\)"):
            block(torch.randn(2, 13, 5, 5))
        with pytest.raises(TypeError, match="dtype"):
            block(torch.randn(2, 7, 5, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="residual"):
            block(torch.randn(2, 7, 5, 5), torch.randn(2, 13, 5, 5))


@pytest.mark.parametrize("residual_shape", [(2, 7, 1, 1), (7, 5, 5), (1, 7, 5, 5)],
                         ids=["broadcast-plane", "3d", "broadcast-batch"])
def test_fast_path_refuses_a_residual_that_would_broadcast(residual_shape):
    # The inference fast path hands the residual to the op unchecked; one that torch would
    # broadcast (a silent wrong answer on the reference path) must take the checked path.
    block = SlimConvBNAct([1, 7, 13], [3, 7, 13], 3, widths=WIDTHS).eval()
    slimops.set_width(block, 0.5)
    with torch.inference_mode(), pytest.raises(ValueError, match="residual"):
        block(torch.randn(2, 7, 5, 5), torch.randn(*residual_shape))


def test_inference_fast_path_errors_are_the_checked_paths(monkeypatch):
    # On CPU the fast path leaves the residual and vector checks to the kernel and, when it
    # rejects one, takes the checked path: the error is the layer's, not the kernel's. Both
    # fast entries (the compiled plan, then the Python one) decline the bad calls.
    answers = []
    kernel, planned = slimops.ops.conv2d_cpu_kernel, slimops.ops.eval_plan_call

    def spy(name, entry):
        def call(*args):
            out = entry(*args)
            answers.append((name, isinstance(out, torch.Tensor)))
            return out
        return call

    monkeypatch.setattr(slimops.ops, "conv2d_cpu_kernel", spy("python", kernel))
    monkeypatch.setattr(slimops.ops, "eval_plan_call", spy("compiled", planned))
    block = SlimConvBNAct([1, 7, 13], [3, 7, 13], 3, widths=WIDTHS).eval()
    slimops.set_width(block, 0.5)
    x = torch.randn(2, 7, 5, 5)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="residual"):
            block(x, torch.randn(2, 13, 5, 5))
        with pytest.raises(TypeError, match="residual has dtype"):
            block(x, torch.randn(2, 7, 5, 5, dtype=torch.float64))
        with pytest.raises(TypeError, match="residual must be a Tensor"):
            block(x, 1.0)
        r = torch.randn(2, 7, 5, 5)
        torch.testing.assert_close(block(x, r), _slow(block, x, r), rtol=0, atol=0)
    if slimops.ops.backend_info()["cpu"] == "C++":
        # The first call builds the plans (Python entry); later ones try the compiled plan
        # first; only the last, good call is answered, by the compiled plan.
        assert answers == [("python", False), ("compiled", False), ("python", False),
                           ("compiled", False), ("python", False), ("compiled", True)]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_noncontiguous_input_and_residual(train, tol, randomize_bn):
    dtype = torch.float64
    block = make_block("dense", dtype, randomize_bn).train(train)
    slimops.set_width(block, 0.5)
    bn_ref = copy.deepcopy(block.bn.bn[1])
    x = torch.randn(2, 7, 5, 6, dtype=dtype).to(memory_format=torch.channels_last)
    r = torch.randn(2, 7, 6, 5, dtype=dtype).transpose(2, 3)
    y = block(x, r)
    y_ref = unfused(block, x.contiguous(), r.contiguous(), block.conv.weight, bn_ref)
    torch.testing.assert_close(y, y_ref, **tol(dtype))


def test_empty_batch_eval(randomize_bn):
    block = make_block("dense", torch.float32, randomize_bn).eval()
    slimops.set_width(block, 0.5)
    x = torch.randn(0, 7, 5, 5, requires_grad=True)
    y = block(x)
    assert y.shape == (0, 7, 5, 5)
    y.sum().backward()
    assert torch.all(block.conv.weight.grad == 0)


# --------------------------------------------------------------------------- state_dict


def _outputs(model, x):
    out = {}
    with torch.no_grad():
        for w in WIDTHS:
            with slimops.width(model, w):
                out[w] = model(x)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_round_trip(dtype, make_cnn):
    torch.manual_seed(1)
    a = make_cnn(dtype)
    # train the statistics of every width a little
    a.train()
    for w in WIDTHS:
        slimops.set_width(a, w)
        for _ in range(2):
            a(torch.randn(4, 3, 9, 9, dtype=dtype))
    a.eval()
    keys = set(a.state_dict())
    for i in range(3):
        assert f"0.bn.bn.{i}.running_mean" in keys and f"0.bn.bn.{i}.weight" in keys
    assert "0.conv.weight" in keys and "1.weight" in keys and "4.weight" in keys

    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(2)
    b = make_cnn(dtype).eval()
    x = torch.randn(2, 3, 9, 9, dtype=dtype)
    before = _outputs(b, x)
    expected = _outputs(a, x)
    assert not torch.allclose(before[1.0], expected[1.0])  # b really started different
    b.load_state_dict(torch.load(buffer, weights_only=True))
    got = _outputs(b, x)
    for w in WIDTHS:
        torch.testing.assert_close(got[w], expected[w], rtol=0, atol=0)
    # training-mode outputs agree too (batch statistics, same γ/β)
    a.train()
    b.train()
    for w in WIDTHS:
        slimops.set_width(a, w)
        slimops.set_width(b, w)
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# ------------------------------------------------------------------------- torch.compile


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check_compiled_eval(model, compiled, x, tol):
    for w in (0.25, 1.0):
        slimops.set_width(model, w)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), **tol)
    slimops.set_width(model, 1.0)
    with slimops.width(model, 0.5), torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), **tol)
    with torch.no_grad():  # and back to the default after the scope
        torch.testing.assert_close(compiled(x), model(x), **tol)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_eval(backend, make_cnn, dynamo_reset):
    model = make_cnn().eval()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 9, 9)
    _check_compiled_eval(model, compiled, x, dict(rtol=1e-5, atol=1e-6))
    # the widths really differ (so a stale compiled width would be caught)
    with torch.no_grad():
        slimops.set_width(model, 0.25)
        small = compiled(x)
        slimops.set_width(model, 1.0)
        assert not torch.allclose(small, compiled(x))


def test_compile_follows_scoped_widths_per_thread(make_cnn, dynamo_reset):
    """A compiled model reads `with slimops.width(...)` (through width.py's per-thread mirror
    of the ContextVar Dynamo cannot trace): inside a block, after it, and in a thread whose
    block differs from the main thread's."""
    model = make_cnn().eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = {}
        for w in (0.25, 1.0):
            slimops.set_width(model, w)
            expected[w] = model(x)
        slimops.set_width(model, 1.0)
        with slimops.width(model, 0.25):
            torch.testing.assert_close(compiled(x), expected[0.25])
            seen = []
            thread = threading.Thread(target=lambda: seen.append(compiled(x)))
            thread.start()
            thread.join()
            torch.testing.assert_close(seen[0], expected[1.0])  # no block in that thread
        torch.testing.assert_close(compiled(x), expected[1.0])


@pytest.mark.slow
def test_compile_eval_inductor(make_cnn, dynamo_reset):
    model = make_cnn().eval()
    compiled = torch.compile(model, fullgraph=True)  # the default backend, inductor
    x = torch.randn(2, 3, 9, 9)
    _check_compiled_eval(model, compiled, x, dict(rtol=1e-4, atol=1e-5))


class _ResidualNet(torch.nn.Module):
    """A stem, then a block with a residual and relu6 (the epilogue's backward), then a
    classifier."""

    def __init__(self, dtype):
        super().__init__()
        c = channels(16, WIDTHS)
        self.stem = SlimConvBNAct(3, c, 3, stride=2, widths=WIDTHS, dtype=dtype)
        self.block = SlimConvBNAct(c, c, 3, widths=WIDTHS, activation="relu6", dtype=dtype)
        self.head = SlimmableLinear(c, 10, widths=WIDTHS, dtype=dtype)

    def forward(self, x):
        h = self.stem(x)
        h = self.block(h, residual=h)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "net, train",
    [pytest.param("cnn", True, id="cnn-train"),
     pytest.param("cnn", False, id="cnn-eval"),
     pytest.param("residual", True, id="residual-train"),
     pytest.param("residual", False, id="residual-eval")],
)
def test_compile_forward_backward(net, train, dtype, make_cnn, randomize_bn, dynamo_reset,
                                  tol):
    """Training, and fine-tuning with frozen BN statistics (eval mode, gradients through the
    fused epilogue's scale and shift), compiled in one graph, match eager."""
    eager = make_cnn(dtype) if net == "cnn" else randomize_bn(_ResidualNet(dtype))
    eager.train(train)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for step, w in enumerate((0.25, 1.0, 0.25, 0.5)):
        slimops.set_width(eager, w)
        slimops.set_width(model, 1.0 if w == 0.5 else w)
        x = torch.randn(4, 3, 9, 9, dtype=dtype) + step
        g = torch.randn(4, 10, dtype=dtype)
        x_e = x.clone().requires_grad_()
        x_c = x.clone().requires_grad_()
        eager.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        y_e = eager(x_e)
        if w == 0.5:  # the last step through a scoped width
            with slimops.width(model, w):
                y_c = compiled(x_c)
        else:
            y_c = compiled(x_c)
        torch.testing.assert_close(y_c, y_e, **tol(dtype))
        y_e.backward(g)
        y_c.backward(g)
        torch.testing.assert_close(x_c.grad, x_e.grad, **tol(dtype))
        for (name, p_e), (_, p_c) in zip(eager.named_parameters(), model.named_parameters()):
            if p_e.grad is None:
                assert p_c.grad is None, name
            else:
                torch.testing.assert_close(p_c.grad, p_e.grad, **tol(dtype), msg=name)
        for (name, b_e), (_, b_c) in zip(eager.named_buffers(), model.named_buffers()):
            torch.testing.assert_close(b_c, b_e, **tol(dtype), msg=name)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["dense", "depthwise"])
def test_medium_shapes(kind, train, tol, randomize_bn):
    """Sizes past any kernel's block/vector width, with ragged tails."""
    widths = (0.25, 0.5, 0.75, 1.0)
    cout = [12, 24, 36, 48]
    cin, groups = ([9, 18, 27, 36], 1) if kind == "dense" else (cout, 48)
    block = randomize_bn(SlimConvBNAct(cin, cout, 3, groups=groups, widths=widths,
                                       activation="relu6")).train(train)
    for i, w in enumerate(widths):
        slimops.set_width(block, w)
        block.zero_grad(set_to_none=True)
        bn_ref = copy.deepcopy(block.bn.bn[i])
        weight = block.conv.weight.detach().clone().requires_grad_()
        x = (torch.randn(3, cin[i], 17, 21) * 2).requires_grad_()
        r = torch.randn(3, cout[i], 17, 21, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        r_ref = r.detach().clone().requires_grad_()
        y, y_ref = block(x, r), unfused(block, x_ref, r_ref, weight, bn_ref)
        torch.testing.assert_close(y, y_ref, **tol(torch.float32, y_ref))
        torch.testing.assert_close(block.bn.bn[i].running_var, bn_ref.running_var,
                                   **tol(torch.float32, bn_ref.running_var))
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol(torch.float32, x_ref.grad))
        torch.testing.assert_close(r.grad, r_ref.grad, **tol(torch.float32, r_ref.grad))
        torch.testing.assert_close(block.conv.weight.grad, weight.grad,
                                   **tol(torch.float32, weight.grad))
        torch.testing.assert_close(block.bn.bn[i].weight.grad, bn_ref.weight.grad,
                                   **tol(torch.float32, bn_ref.weight.grad))


# ------------------------------------------------------------ the inference fast path


def _slow(block, x, residual=None):
    """The checked path: with autograd on, every call recomputes the BN scale/shift."""
    with torch.enable_grad():
        return block(x, residual).detach()


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fast_path_equals_the_checked_path(kind, with_residual, randomize_bn):
    block = make_block(kind, torch.float64, randomize_bn, activation="relu6", stride=1).eval()
    for w in WIDTHS:
        with slimops.width(block, w):
            cin, cout = block.conv.active_channels()
            x = torch.randn(2, cin, 6, 5, dtype=torch.float64)
            r = torch.randn(2, cout, 6, 5, dtype=torch.float64) if with_residual else None
            for mode in (torch.no_grad, torch.inference_mode):
                with mode():
                    assert torch.equal(block(x, r), _slow(block, x, r))
    assert sorted(block._eval_plans) == list(WIDTHS)
    # what is kept per width: the scale/shift vectors, the size of its BN's γ/β
    for i, w in enumerate(WIDTHS):
        plan = block._eval_plans[w]
        assert plan.scale.shape == plan.shift.shape == (block.bn.num_features_list[i],)


def test_fast_path_follows_every_bn_change(randomize_bn):
    block = make_block("dense", torch.float64, randomize_bn).eval()
    x = torch.randn(2, 13, 6, 5, dtype=torch.float64)

    def check():
        with torch.no_grad():
            assert torch.equal(block(x), _slow(block, x))

    check()
    with torch.no_grad():  # in-place writes: running stats, γ, β
        block.bn.bn[2].running_mean.add_(1.0)
    check()
    with torch.no_grad():
        block.bn.bn[2].weight.mul_(2.0)
    check()
    block.bn.bn[2].eps = 0.5
    check()
    block.load_state_dict(randomize_bn(copy.deepcopy(block)).state_dict())
    check()
    block.train()  # a training step updates the running stats
    block(x)
    block.eval()
    check()
    block.bn.bn[2] = randomize_bn(torch.nn.BatchNorm2d(13, dtype=torch.float64))  # replaced
    check()
    block.float()  # another dtype
    x = x.float()
    with torch.no_grad():
        assert block(x).dtype == torch.float32
    check()


def test_fast_path_follows_recalibration_between_widths():
    from slimops.train import calibrate_bn
    from slimops.width import ChannelRule

    block = SlimConvBNAct(3, ChannelRule(16), 3, widths=(0.25, 1.0), dtype=torch.float64)
    xs = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    calibrate_bn(block, xs[:1], widths=[0.5])
    block.eval()
    with torch.no_grad(), slimops.width(block, 0.5):
        first = block(xs[0])
        calibrate_bn(block, xs[1:], widths=[0.5])  # new statistics module for 0.5
        block.eval()
        again = block(xs[0])
        assert not torch.equal(first, again)
        assert torch.equal(again, _slow(block, xs[0]))


def test_fast_path_records_the_bn_arithmetic_when_traced(randomize_bn):
    block = make_block("dense", torch.float32, randomize_bn).eval()
    x = torch.randn(1, 13, 5, 5)
    with torch.no_grad():
        block(x)  # a cached plan exists
        traced = torch.jit.trace(block, x)
    graph = str(traced.inlined_graph)
    assert "aten::rsqrt" in graph  # scale/shift computed in the graph, not baked in
    with torch.no_grad():
        block.bn.bn[2].running_var.mul_(4.0)
        torch.testing.assert_close(traced(x), block(x))


def test_fast_path_first_eval_prepares_every_listed_width(randomize_bn):
    block = make_block("dense", torch.float32, randomize_bn).eval()
    with torch.no_grad(), slimops.width(block, 0.5):
        block(torch.randn(1, 7, 5, 5))
    assert sorted(block._eval_plans) == list(WIDTHS)  # one forward prepared all widths
    plans = dict(block._eval_plans)
    with torch.no_grad(), slimops.width(block, 0.25):
        block(torch.randn(1, 1, 5, 5))
    assert all(block._eval_plans[w] is plans[w] for w in WIDTHS)  # a switch rebuilds none
    with torch.no_grad():
        block.bn.bn[0].running_var.mul_(2.0)  # the BN changed: the next miss refreshes all
    with torch.no_grad(), slimops.width(block, 0.25):
        out = block(torch.randn(1, 1, 5, 5))
    assert all(block._eval_plans[w] is not plans[w] for w in WIDTHS)
    assert out.shape == (1, 3, 5, 5)


@pytest.mark.parametrize("how", ["data_assignment", "load_state_dict_assign",
                                 "buffer_reassigned", "parameter_reassigned",
                                 "set_on_same_storage", "inference_data_assignment"])
def test_fast_path_follows_replaced_bn_state(how, randomize_bn):
    """Ways of replacing BN state that leave version counters behind (a new tensor starts at
    version 0, like the one it replaces may be): the plan is keyed by identity and storage too
    (issue 14: the fast path served the old scale/shift, max error 1.9 on slim_cnn)."""
    block = make_block("dense", torch.float64, randomize_bn).eval()
    x = torch.randn(2, 13, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        before = block(x)  # plans cached for every width
    bn = block.bn.bn[2]
    new = torch.rand(13, dtype=torch.float64) + 2.0
    if how == "data_assignment":
        bn.weight.data = new
    elif how == "load_state_dict_assign":
        other = randomize_bn(copy.deepcopy(block))
        block.load_state_dict(other.state_dict(), assign=True)
    elif how == "buffer_reassigned":
        bn.running_var = new
    elif how == "parameter_reassigned":
        bn.bias = torch.nn.Parameter(new)
    elif how == "inference_data_assignment":  # keeps the version; an inference tensor's data
        with torch.inference_mode():
            made_there = new.clone()
        bn.running_var.data = made_there
    else:  # same storage, written through another view: the version counter is shared
        with torch.no_grad():
            bn.running_mean.view(-1)[:5] += 3.0
    with torch.no_grad():
        after = block(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _slow(block, x))


def test_model_built_under_inference_mode_runs(randomize_bn):
    """Issue 14: a model created inside torch.inference_mode() (its tensors are inference
    tensors, without version counters) runs there, with results equal to the checked path;
    its plans are not cached, since no version counter could tell they went stale."""
    with torch.inference_mode():
        block = make_block("dense", torch.float64, randomize_bn).eval()
        x = torch.randn(2, 13, 6, 5, dtype=torch.float64)
        out = block(x)
        block.bn.bn[2].running_mean.add_(1.0)  # in place, no version counter to bump
        again = block(x)
        expected = _slow(block, x)  # autograd "on": the checked path, BN recomputed
    assert not torch.equal(out, again)
    assert torch.equal(again, expected)
    assert block._eval_plans == {}


# ------------------------------------------------ the compiled plan (slimops.ops.eval_plan)

needs_cpp = pytest.mark.skipif(slimops.ops.backend_info()["cpu"] != "C++",
                               reason="the compiled plan needs the C++ extension")


def _spy_compiled_plan(monkeypatch):
    """Records, per call of ``ops.eval_plan_call``, whether the compiled plan answered."""
    answered = []
    planned = slimops.ops.eval_plan_call

    def call(*args):
        out = planned(*args)
        answered.append(isinstance(out, torch.Tensor))  # not None, not STALE_PLAN
        return out

    monkeypatch.setattr(slimops.ops, "eval_plan_call", call)
    return answered


@needs_cpp
@pytest.mark.parametrize("shared_bn", [False, True], ids=["switchable", "shared"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_plan_answers_eval_calls(kind, with_residual, shared_bn, dtype, randomize_bn,
                                          monkeypatch):
    """After a width's first eval call the compiled plan answers every later one, with the
    checked path's result to the bit (so the tests of the fast path above test it)."""
    answered = _spy_compiled_plan(monkeypatch)
    block = make_block(kind, dtype, randomize_bn, shared_bn=shared_bn).eval()
    for w in WIDTHS:
        with slimops.width(block, w):
            cin, cout = block.conv.active_channels()
            x = torch.randn(2, cin, 6, 5, dtype=dtype)
            r = torch.randn(2, cout, 6, 5, dtype=dtype) if with_residual else None
            for mode in (torch.no_grad, torch.inference_mode, torch.no_grad):
                with mode():
                    assert torch.equal(block(x, r), _slow(block, x, r))
    # The first call built every width's plan (Python); all 8 later calls were compiled.
    assert answered == [True] * (3 * len(WIDTHS) - 1)


@needs_cpp
def test_compiled_plan_answers_between_listed_widths(monkeypatch):
    from slimops.train import calibrate_bn

    answered = _spy_compiled_plan(monkeypatch)
    block = SlimConvBNAct(3, ChannelRule(16), 3, widths=(0.25, 1.0), dtype=torch.float64)
    calibrate_bn(block, [torch.randn(4, 3, 6, 6, dtype=torch.float64)], widths=[0.5])
    block.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad(), slimops.width(block, 0.5):
        outs = [block(x) for _ in range(3)]
        assert all(torch.equal(out, _slow(block, x)) for out in outs)
        assert answered == [True, True]  # the first call built the plan
        block.bn.calibrated[next(iter(block.bn.calibrated))].running_var.mul_(2.0)
        assert torch.equal(block(x), _slow(block, x))
    assert answered[2] is False  # the statistics changed: stale, rebuilt by the Python path


def _replace_conv(block, randomize_bn):
    conv = copy.deepcopy(block.conv)
    with torch.no_grad():
        conv.weight.normal_()
    block.conv = conv


def _write_running_var(block, randomize_bn):
    with torch.no_grad():
        block.bn.bn[1].running_var.mul_(3.0)


# What each case changes after the plans were built (width 0.5: BN index 1, 7 channels).
LAYER_CHANGES = {
    "conv_weight": lambda block, _: setattr(
        block.conv, "weight", torch.nn.Parameter(torch.randn_like(block.conv.weight))),
    "conv": _replace_conv,
    "stride": lambda block, _: setattr(block.conv, "stride", (2, 2)),
    "bn_list": lambda block, randomize_bn: setattr(block.bn, "bn", torch.nn.ModuleList(
        randomize_bn(torch.nn.BatchNorm2d(c, dtype=torch.float64))
        for c in block.bn.num_features_list)),
    "eps": lambda block, _: setattr(block.bn.bn[1], "eps", 0.5),
    "running_var_written": _write_running_var,
    "bn_weight_data": lambda block, _: setattr(
        block.bn.bn[1].weight, "data", torch.rand(7, dtype=torch.float64) + 2.0),
}


def _planned_block(randomize_bn, monkeypatch):
    """A dense float64 block at width 0.5 whose plans are built and answered once, the spy
    on the compiled plan (``[True]`` so far) and its input."""
    answered = _spy_compiled_plan(monkeypatch)
    block = make_block("dense", torch.float64, randomize_bn).eval()
    slimops.set_width(block, 0.5)
    x = torch.randn(2, 7, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        block(x)
        before = block(x)
    assert answered == [True]
    return answered, block, x, before


@needs_cpp
@pytest.mark.parametrize("change", list(LAYER_CHANGES))
def test_compiled_plan_follows_layer_changes(change, randomize_bn, monkeypatch):
    """Each entry the Python path reads on a call (the layer's submodules, the conv's weight
    and geometry, the width's BN modules, tensors and eps) is checked by the compiled plan:
    a change makes it decline, and the Python path rebuilds the plan."""
    answered, block, x, before = _planned_block(randomize_bn, monkeypatch)
    LAYER_CHANGES[change](block, randomize_bn)
    with torch.no_grad():
        after = block(x)
        again = block(x)
    assert not torch.equal(after, before) or after.shape != before.shape
    assert torch.equal(after, _slow(block, x)) and torch.equal(again, after)
    # Declined once (stale), answered again after the Python path's rebuild.
    assert answered == [True, False, True]


@needs_cpp
def test_compiled_plan_follows_a_bn_at_another_width(randomize_bn, monkeypatch):
    """The conv and its BN can be switched apart (``set_width`` on one of them): the plan of
    the conv's width was built with the BN's width then, and declines when that moves."""
    answered, block, x, _ = _planned_block(randomize_bn, monkeypatch)
    slimops.set_width(block.bn, 1.0)  # 13 BN channels for the conv's 7 outputs
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match="7"):
        block(x)
    with pytest.raises(ValueError):
        _slow(block, x)
    assert answered == [True]  # the plan was not tried with the BN at another width
    slimops.set_width(block.bn, 0.5)
    with torch.no_grad():
        assert torch.equal(block(x), _slow(block, x))


@needs_cpp
def test_compiled_plan_leaves_no_reference_cycle(randomize_bn):
    """A dropped layer frees its tensors at once: its cached plans hold module entries but no
    path back to the layer."""
    block = make_block("dense", torch.float32, randomize_bn).eval()
    with torch.no_grad():
        block(torch.randn(1, 13, 5, 5))
        block(torch.randn(1, 13, 5, 5))
    assert all(plan.call is not None for plan in block._eval_plans.values())
    weight = weakref.ref(block.conv.weight)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del block
        assert weight() is None
    finally:
        if was_enabled:
            gc.enable()


@needs_cpp
def test_compiled_plan_declines_unusual_inputs(randomize_bn, monkeypatch):
    """Inputs the compiled check does not take (another dtype, a non-tensor residual, a
    tensor subclass) go to the Python path, which answers or raises as before."""
    answered = _spy_compiled_plan(monkeypatch)
    block = make_block("dense", torch.float32, randomize_bn).eval()
    slimops.set_width(block, 0.5)
    x = torch.randn(2, 7, 6, 5)
    with torch.no_grad():
        block(x)
        with pytest.raises((TypeError, RuntimeError, ValueError)):
            block(x.double())
        with pytest.raises(ValueError):
            block(torch.randn(2, 6, 6, 5))  # the width's input channels are 7

        class Sub(torch.Tensor):
            pass

        out = block(x.as_subclass(Sub))
        assert torch.equal(torch.Tensor(out), block(x))
    assert answered[:3] == [False, False, False] and answered[-1] is True


# --------------------------------------------------------------------------------------
# the training fast path (SlimConvBNAct._fast_train): the general path's ops, fewer checks


def _general_path_only(monkeypatch):
    monkeypatch.setattr(SlimConvBNAct, "_fast_train", lambda self, input, residual: None)


@pytest.mark.parametrize("shared_bn", [False, True], ids=["switchable", "shared"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_training_fast_path_equals_the_general_path(kind, with_residual, shared_bn,
                                                    randomize_bn, monkeypatch):
    """Bit for bit: outputs, every gradient, running statistics and batch counters over
    training steps at changing widths, against the same block on the general path (with
    switchable BN, and with one BN shared by all widths: its prefixes)."""
    fast = make_block(kind, torch.float64, randomize_bn, activation="relu6",
                      shared_bn=shared_bn).train()
    general = copy.deepcopy(fast)
    taken = []
    original = SlimConvBNAct._fast_train

    def spy(self, input, residual):
        out = original(self, input, residual)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(SlimConvBNAct, "_fast_train", spy)
    for step, i in enumerate([2, 0, 1, 2]):
        cin, cout = KINDS[kind][0][i], KINDS[kind][1][i]
        x = torch.randn(3, cin, 6, 5, dtype=torch.float64) + step
        r = torch.randn(3, cout, 6, 5, dtype=torch.float64) if with_residual else None
        outs = []
        for block, patched in ((fast, False), (general, True)):
            if patched:
                _general_path_only(monkeypatch)
            xi = x.clone().requires_grad_()
            ri = None if r is None else r.clone().requires_grad_()
            with slimops.width(block, WIDTHS[i]):
                y = block(xi, ri)
            y.backward(torch.cos(y))
            outs.append((y, xi.grad, None if ri is None else ri.grad))
            monkeypatch.setattr(SlimConvBNAct, "_fast_train", spy)
        for a, b in zip(*outs):
            assert (a is None and b is None) or torch.equal(a, b)
    assert taken and all(taken)
    for (name, a), (_, b) in zip(fast.named_parameters(), general.named_parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name
    for (name, a), (_, b) in zip(fast.named_buffers(), general.named_buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", ["conv hook", "between widths", "cumulative momentum",
                                  "broadcast residual"])
def test_training_fast_path_declines(case, randomize_bn):
    """Where the fast path would skip something the general path does (the conv's module
    hooks, the width rule, cumulative statistics, a residual check), it hands over."""
    block = SlimConvBNAct(ChannelRule(13), ChannelRule(13), 3, widths=WIDTHS,
                          momentum=None if case == "cumulative momentum" else 0.1).train()
    w = 0.75 if case == "between widths" else 0.5
    x, r = torch.randn(2, ChannelRule(13)(w), 5, 5), None
    calls = []
    if case == "conv hook":
        block.conv.register_forward_hook(lambda *a: calls.append("conv"))
    if case == "broadcast residual":
        r = torch.randn(2, x.shape[1], 1, 1)
    with slimops.width(block, w):
        assert block._fast_train(x, r) is None
        if case == "broadcast residual":
            with pytest.raises(ValueError, match="residual"):
                block(x, r)
        else:
            block(x, r)
    if case == "conv hook":
        assert calls == ["conv"]


# ------------------------------------------------ EvalChain: a block's layers in one C call


class _Block(torch.nn.Module):
    """relu(c(b(a(x)) + s(x))): an EvalChain block (a bottleneck with a projection)."""

    chain = slimops.nn.EvalChain([("s", 0, None), ("a", 0, None), ("b", 2, None), ("c", 3, 1)])

    def __init__(self, dtype, randomize_bn):
        super().__init__()
        cin, mid, cout = [3, 7, 13], [2, 5, 9], [4, 8, 16]
        self.a = randomize_bn(SlimConvBNAct(cin, mid, 1, widths=WIDTHS, dtype=dtype))
        self.b = randomize_bn(SlimConvBNAct(mid, mid, 3, 2, groups=9, widths=WIDTHS,
                                            dtype=dtype, activation="relu6"))
        self.c = randomize_bn(SlimConvBNAct(mid, cout, 1, widths=WIDTHS, dtype=dtype))
        self.s = randomize_bn(SlimConvBNAct(cin, cout, 1, 2, widths=WIDTHS, dtype=dtype,
                                            activation=None))

    def layers(self, x):
        return self.c(self.b(self.a(x)), self.s(x))

    def forward(self, x):
        out = self.chain(self, x)
        return self.layers(x) if out is None else out


def test_eval_chain_checks_its_steps():
    EvalChain = slimops.nn.EvalChain
    assert EvalChain([("a", 0, None), ("b", 1, 0)]).links == (0, -1, 1, 0)
    with pytest.raises(ValueError, match="at least one step"):
        EvalChain([])
    with pytest.raises(TypeError, match=r"step 1 must be \(name, source, residual\)"):
        EvalChain([("a", 0, None), ("b", 1)])
    with pytest.raises(ValueError, match=r"step 1's source must be a slot 0\.\.1"):
        EvalChain([("a", 0, None), ("b", 2, None)])
    with pytest.raises(ValueError, match=r"step 0's residual must be a slot 0\.\.0"):
        EvalChain([("a", 0, -1)])
    with pytest.raises(ValueError, match="source"):
        EvalChain([("a", True, None)])


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_chain_is_the_layers_calls_to_the_bit(dtype, randomize_bn, monkeypatch):
    answered = spy_eval_chain(monkeypatch)
    block = _Block(dtype, randomize_bn).eval()
    for w in WIDTHS:
        with slimops.width(block, w):
            x = torch.randn(2, block.a.conv.active_channels()[0], 7, 6, dtype=dtype)
            for mode in (torch.no_grad, torch.inference_mode, torch.no_grad):
                with mode():
                    out, want = block(x), block.layers(x)
                assert torch.equal(out, want), (w, mode)
    # the first call at the first width builds every listed width's plans (module calls, no
    # chain tried: a plan was missing); every later call is the chain's
    assert all(answered) and len(answered) == 3 * len(WIDTHS) - 1


@needs_cpp
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_eval_chain_leaves_it_to_the_layers(randomize_bn, monkeypatch):
    """Where a module call would do more than the plan (training, autograd, hooks, tracing,
    a subclass or a replaced layer), or a plan went stale, the block's layers run."""
    answered = spy_eval_chain(monkeypatch)
    block = _Block(torch.float64, randomize_bn).eval()
    x = torch.randn(2, 13, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        block(x)  # builds the plans
        assert block.chain(block, x) is not None
    answered.clear()
    out = block(x)  # autograd on
    assert out.requires_grad and answered == []
    with torch.no_grad():
        block.b.train()
        assert block.chain(block, x) is None
        block.b.eval()
        calls = []
        handle = block.c.register_forward_hook(lambda m, i, o: calls.append(m))
        assert block.chain(block, x) is None
        block(x)
        assert calls == [block.c]
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda m, i: calls.append(m))
        assert block.chain(block, x) is None
        handle.remove()
        block.a.forward = lambda t, residual=None: t  # replaced on the instance
        assert block.chain(block, x) is None
        del block.a.forward
        assert block.chain(block, x) is not None
        # a stale plan: a BN's running mean written in place
        block.c.bn.bn[2].running_mean.add_(1.0)
        assert block.chain(block, x) is None
        torch.testing.assert_close(block(x), block.layers(x), rtol=0, atol=0)
        assert block.chain(block, x) is not None  # the layers' calls rebuilt it
        original = block.s
        block.s = torch.nn.Identity()
        assert block.chain(block, x) is None
        block.s = original

        class Sub(SlimConvBNAct):
            pass

        sub = Sub([3, 7, 13], [2, 5, 9], 1, widths=WIDTHS, dtype=torch.float64).eval()
        sub.load_state_dict(block.a.state_dict())
        block.a = sub
        block(x)
        assert block.chain(block, x) is None
        with pytest.MonkeyPatch.context() as m:  # a forward patched onto the class
            m.setattr(SlimConvBNAct, "forward", lambda self, t, residual=None: t)
            assert block.chain(block, x) is None
        # a wrong input takes the layers, which name what is wrong
        with pytest.raises(ValueError, match="channels"):
            block(torch.randn(2, 12, 7, 6, dtype=torch.float64))
    with torch.no_grad():  # tracing records the layers' ops, not the chain
        traced = torch.jit.trace(block, x)
        torch.testing.assert_close(traced(x), block.layers(x))


def test_bypassable_needs_a_marked_forward_and_no_hooks():
    class Marked(torch.nn.Module):
        @slimops.nn.runs_eval_chain
        def forward(self, x):
            return x

    class Overridden(Marked):
        def forward(self, x):
            return x + 1

    class MySequential(torch.nn.Sequential):
        pass

    bypassable = slimops.nn.bypassable
    block = Marked()
    assert bypassable(block) and not bypassable(Overridden())
    assert not bypassable(torch.nn.ReLU())
    assert bypassable(torch.nn.Sequential(block)) and not bypassable(MySequential(block))
    for register in (block.register_forward_hook, block.register_forward_pre_hook,
                     block.register_full_backward_hook, block.register_full_backward_pre_hook):
        handle = register(lambda *args: None)
        assert not bypassable(block), register
        handle.remove()
        assert bypassable(block)
    block.forward = lambda x: x
    assert not bypassable(block)
