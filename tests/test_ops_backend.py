"""Backends and argument checking: ``slimops.backend_info()``; the reference path with the
extension disabled (``SLIMOPS_DISABLE_C=1``, in a subprocess) giving the C++ path's results;
dtypes the kernels do not implement (float16/bfloat16 run on the reference, integers are
rejected); clear Python exceptions for bad arguments; and the C++ ``TORCH_CHECK``s, reached by
calling ``torch.ops.slimops.*`` directly, raising RuntimeError instead of crashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import slimops
from slimops import reference
from slimops.ops import _backend

F32, F64 = torch.float32, torch.float64
HAS_C = slimops.backend_info()["cpu"] == "C++"
needs_c = pytest.mark.skipif(not HAS_C, reason="needs the compiled extension slimops._C")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------
# backend_info


def test_backend_info_keys_and_values():
    info = slimops.backend_info()
    assert set(info) == {"cpu", "cpu_isa", "conv_route", "conv_routes_measured", "cuda",
                         "cuda_kernels", "extension_error", "load_policy", "native_dtypes",
                         "torch"}
    assert info["cpu"] in ("C++", "reference")
    if not torch.cuda.is_available():
        assert info["cuda"] == "unavailable"
    else:
        assert info["cuda"] == (info["cuda_kernels"] or "reference")
    assert info["native_dtypes"] == ["float32", "float64"]
    assert info["torch"] == torch.__version__
    if info["cpu"] == "C++":
        assert info["extension_error"] is None
        assert info["cpu_isa"] in ("avx512", "avx2", "base")
        assert info["conv_route"] == os.environ.get("SLIMOPS_CONV_ROUTE", "auto")
        assert set(info["conv_routes_measured"]) == {"onednn", "kernels"}
        assert info["load_policy"] == os.environ.get("SLIMOPS_LOAD_POLICY", "adaptive")
    else:
        assert info["load_policy"] is None
        assert info["cpu_isa"] is None
        assert info["conv_route"] is None and info["conv_routes_measured"] is None
        assert isinstance(info["extension_error"], str) and info["extension_error"]
    json.dumps(info)  # plain data, printable by the CLI


@needs_c
def test_backend_info_with_extension():
    info = slimops.backend_info()
    assert info["cpu"] == "C++" and info["extension_error"] is None
    assert "slimops._C" in sys.modules
    assert hasattr(torch.ops.slimops, "conv2d")


# --------------------------------------------------------------------------------------
# SLIMOPS_DISABLE_C=1: everything on the reference path, same results

# Run both here (C++ path) and in a subprocess with the extension disabled; defines
# compute() -> {name: tensor} (outputs, gradients, running statistics).
COMPUTE = r'''
import torch
import slimops
from slimops.nn import SlimConvBNAct, SlimmableConv2d, SlimmableLinear


def compute():
    torch.manual_seed(0)
    d = torch.float64
    r = {}

    def grads(prefix, out, leaves):
        g = torch.randn_like(out)
        for name, t in zip(leaves, torch.autograd.grad(out, list(leaves.values()), g)):
            r[f"{prefix}.grad.{name}"] = t

    # grouped conv at a prefix, full epilogue
    t = dict(x=torch.randn(2, 6, 7, 6, dtype=d), w=torch.randn(12, 4, 3, 3, dtype=d),
             b=torch.randn(12, dtype=d), s=torch.rand(9, dtype=d) + 0.5,
             h=torch.randn(9, dtype=d), res=torch.randn(2, 9, 4, 6, dtype=d))
    t = {k: v.requires_grad_() for k, v in t.items()}
    out = slimops.ops.conv2d(t["x"], t["w"], t["b"], 9, (2, 1), 1, 1, 3, t["s"], t["h"],
                             t["res"], "relu")
    r["conv2d"] = out
    grads("conv2d", out, t)

    t = dict(x=torch.randn(2, 5, 7, 7, dtype=d), w=torch.randn(8, 1, 5, 5, dtype=d),
             b=torch.randn(8, dtype=d))
    t = {k: v.requires_grad_() for k, v in t.items()}
    out = slimops.ops.depthwise_conv2d(t["x"], t["w"], t["b"], 2, 2, 1, activation="relu6")
    r["depthwise"] = out
    grads("depthwise", out, t)

    t = dict(x=torch.randn(3, 4, 5, dtype=d), w=torch.randn(9, 7, dtype=d),
             b=torch.randn(9, dtype=d))
    t = {k: v.requires_grad_() for k, v in t.items()}
    out = slimops.ops.linear(t["x"], t["w"], t["b"], 6)
    r["linear"] = out
    grads("linear", out, t)

    for training in (True, False):
        t = dict(x=torch.randn(4, 5, 3, 3, dtype=d) * 2 + 1, w=torch.rand(5, dtype=d) + 0.5,
                 b=torch.randn(5, dtype=d), res=torch.randn(4, 5, 3, 3, dtype=d))
        t = {k: v.requires_grad_() for k, v in t.items()}
        rm, rv = torch.randn(5, dtype=d), torch.rand(5, dtype=d) + 0.5
        out = slimops.ops.batch_norm_act(t["x"], t["w"], t["b"], rm, rv, training, 0.3,
                                         residual=t["res"], activation="relu")
        key = "bn_train" if training else "bn_eval"
        r[key], r[key + ".running_mean"], r[key + ".running_var"] = out, rm, rv
        grads(key, out, t)

    # a small slimmable model, train and eval, at every width
    widths = (0.25, 0.5, 1.0)
    model = torch.nn.Sequential(
        SlimConvBNAct(3, [4, 8, 16], 3, stride=2, widths=widths, dtype=d),
        SlimmableConv2d([4, 8, 16], [4, 8, 16], 3, padding=1, groups=16, widths=widths,
                        dtype=d),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        SlimmableLinear([4, 8, 16], 10, widths=widths, dtype=d),
    )
    x = torch.randn(2, 3, 9, 9, dtype=d)
    for training in (True, False):
        model.train(training)
        for wd in widths:
            slimops.set_width(model, wd)
            model.zero_grad()
            out = model(x)
            out.square().sum().backward()
            r[f"model.{training}.{wd}"] = out.detach()
            r[f"model.{training}.{wd}.grad"] = model[0].conv.weight.grad.clone()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            r["model.state." + k] = v.clone()
    return {k: v.detach() for k, v in r.items()}
'''

CHILD = COMPUTE + r'''
import json, sys
info = dict(slimops.backend_info())
info["C_loaded"] = "slimops._C" in sys.modules
info["has_op"] = hasattr(torch.ops.slimops, "conv2d")
torch.save(compute(), sys.argv[1])
print(json.dumps(info))
'''


@pytest.fixture(scope="module")
def disabled_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("disabled") / "results.pt"
    env = dict(os.environ, SLIMOPS_DISABLE_C="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info, torch.load(path), proc.stderr


def test_disabled_extension_imports_on_reference_path(disabled_run):
    info, _, stderr = disabled_run
    assert info["cpu"] == "reference"
    assert info["extension_error"] == "disabled by SLIMOPS_DISABLE_C=1"
    assert info["C_loaded"] is False and info["has_op"] is False
    assert "Traceback" not in stderr


@needs_c
def test_disabled_extension_matches_cpp_path(disabled_run, tol):
    _, theirs, _ = disabled_run
    ns: dict = {}
    exec(compile(COMPUTE, "<compute>", "exec"), ns)
    ours = ns["compute"]()
    assert set(ours) == set(theirs) and len(ours) > 30
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], **tol(F64, theirs[name]),
                                   msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------
# dtypes the kernels do not implement


LOW = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_conv2d_runs_on_reference(dtype):
    x32, w32 = torch.randn(2, 6, 7, 7), torch.randn(12, 4, 3, 3)
    b32, s32, r32 = torch.randn(12), torch.rand(9) + 0.5, torch.randn(2, 9, 4, 4)
    args = lambda t: (x32.to(t), w32.to(t), b32.to(t), 9, 2, 1, 1, 3, s32.to(t), None,
                      r32.to(t), "relu")
    out = slimops.ops.conv2d(*args(dtype))
    assert out.dtype == dtype and out.shape == (2, 9, 4, 4)
    torch.testing.assert_close(out, reference.conv2d(*args(dtype)), rtol=0, atol=0)
    torch.testing.assert_close(out.float(), slimops.ops.conv2d(*args(F32)), rtol=3e-2,
                               atol=0.15)
    # and backward
    x = x32.to(dtype).requires_grad_()
    slimops.ops.conv2d(x, w32.to(dtype), None, 9, 2, 1, 1, 3).sum().backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_other_ops_run_on_reference(dtype):
    x = torch.randn(2, 6, 7, 7).to(dtype)
    w = torch.randn(8, 1, 3, 3).to(dtype)
    torch.testing.assert_close(slimops.ops.depthwise_conv2d(x, w, None, 1, 1),
                               reference.depthwise_conv2d(x, w, None, 1, 1), rtol=0, atol=0)
    xl, wl, bl = torch.randn(3, 5).to(dtype), torch.randn(7, 6).to(dtype), torch.randn(7).to(dtype)
    torch.testing.assert_close(slimops.ops.linear(xl, wl, bl, 4), reference.linear(xl, wl, bl, 4),
                               rtol=0, atol=0)
    ours = (torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype))
    theirs = (torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype))
    torch.testing.assert_close(slimops.ops.batch_norm_act(x, None, None, *ours, True),
                               reference.batch_norm_act(x, None, None, *theirs, True),
                               rtol=0, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


INT_CASES = {
    "conv2d": lambda x: slimops.ops.conv2d(x, torch.randn(8, 4, 3, 3)),
    "depthwise_conv2d": lambda x: slimops.ops.depthwise_conv2d(x, torch.randn(8, 1, 3, 3)),
    "linear": lambda x: slimops.ops.linear(x, torch.randn(8, 6)),
    "batch_norm_act": lambda x: slimops.ops.batch_norm_act(x, None, None, None, None, True),
}


@pytest.mark.parametrize("call", list(INT_CASES.values()), ids=list(INT_CASES))
def test_integer_input_raises_type_error(call):
    x = torch.ones(2, 4, 5, 6, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating"):
        call(x)


# --------------------------------------------------------------------------------------
# mismatched dtypes and devices


def _conv_args(**over):
    a = dict(input=torch.randn(2, 6, 7, 7), weight=torch.randn(12, 4, 3, 3),
             bias=torch.randn(12), out_channels=9, stride=1, padding=1, groups=3,
             scale=torch.rand(9), shift=torch.randn(9), residual=torch.randn(2, 9, 7, 7))
    a.update(over)
    return a


MISMATCH = {
    "conv2d.weight": (slimops.ops.conv2d, _conv_args, "weight", torch.randn(12, 4, 3, 3)),
    "conv2d.bias": (slimops.ops.conv2d, _conv_args, "bias", torch.randn(12)),
    "conv2d.scale": (slimops.ops.conv2d, _conv_args, "scale", torch.rand(9)),
    "conv2d.shift": (slimops.ops.conv2d, _conv_args, "shift", torch.randn(9)),
    "conv2d.residual": (slimops.ops.conv2d, _conv_args, "residual", torch.randn(2, 9, 7, 7)),
    "depthwise.weight": (slimops.ops.depthwise_conv2d,
                         lambda **o: dict(dict(input=torch.randn(2, 6, 7, 7),
                                               weight=torch.randn(8, 1, 3, 3)), **o),
                         "weight", torch.randn(8, 1, 3, 3)),
    "linear.weight": (slimops.ops.linear,
                      lambda **o: dict(dict(input=torch.randn(3, 5), weight=torch.randn(8, 6),
                                            bias=torch.randn(8)), **o),
                      "weight", torch.randn(8, 6)),
    "linear.bias": (slimops.ops.linear,
                    lambda **o: dict(dict(input=torch.randn(3, 5), weight=torch.randn(8, 6),
                                          bias=torch.randn(8)), **o),
                    "bias", torch.randn(8)),
    "bn.running_var": (slimops.ops.batch_norm_act,
                       lambda **o: dict(dict(input=torch.randn(3, 4, 2), weight=None, bias=None,
                                             running_mean=torch.zeros(4),
                                             running_var=torch.ones(4), training=False), **o),
                       "running_var", torch.ones(4)),
    "bn.weight": (slimops.ops.batch_norm_act,
                  lambda **o: dict(dict(input=torch.randn(3, 4, 2), weight=torch.ones(4),
                                        bias=None, running_mean=None, running_var=None,
                                        training=True), **o),
                  "weight", torch.ones(4)),
}


@pytest.mark.parametrize("case", list(MISMATCH))
def test_dtype_mismatch_raises(case):
    op, make, name, good = MISMATCH[case]
    with pytest.raises(TypeError, match=f"{name} has dtype torch.float64 but input has "
                                        "torch.float32"):
        op(**make(**{name: good.double()}))


@pytest.mark.parametrize("case", list(MISMATCH))
def test_device_mismatch_raises(case):
    op, make, name, good = MISMATCH[case]
    with pytest.raises(ValueError, match=f"{name} is on meta but input is on cpu"):
        op(**make(**{name: good.to("meta")}))


def test_input_and_weight_both_float64_is_fine():
    out = slimops.ops.conv2d(**{k: (v.double() if isinstance(v, torch.Tensor) else v)
                                for k, v in _conv_args().items()})
    assert out.dtype == F64


# --------------------------------------------------------------------------------------
# bad arguments: ValueError with a clear message

BAD_ARGS = {
    "conv2d_groups_not_dividing": (lambda: slimops.ops.conv2d(**_conv_args(groups=5)),
                                   r"groups=5 must be a positive int dividing the weight's 12"),
    "conv2d_groups_zero": (lambda: slimops.ops.conv2d(**_conv_args(groups=0)), r"groups=0"),
    "conv2d_out_channels_too_large": (
        lambda: slimops.ops.conv2d(**_conv_args(groups=1, input=torch.randn(2, 4, 7, 7),
                                                out_channels=13, scale=None, shift=None,
                                                residual=None)),
        r"out_channels=13 must be a positive multiple of groups=1 and at most 12"),
    "conv2d_out_channels_not_multiple": (
        lambda: slimops.ops.conv2d(**_conv_args(out_channels=8)), r"out_channels=8"),
    "conv2d_out_channels_zero": (
        lambda: slimops.ops.conv2d(**_conv_args(out_channels=0)), r"out_channels=0"),
    "conv2d_in_channels_too_large": (
        lambda: slimops.ops.conv2d(**_conv_args(input=torch.randn(2, 15, 7, 7))),
        r"input has 15 channels.*at most 12"),
    "conv2d_in_channels_not_multiple": (
        lambda: slimops.ops.conv2d(**_conv_args(input=torch.randn(2, 5, 7, 7))),
        r"input has 5 channels"),
    "conv2d_input_too_small": (
        lambda: slimops.ops.conv2d(**_conv_args(input=torch.randn(2, 6, 1, 7), padding=0,
                                                residual=None)),
        r"too small for kernel \(3, 3\)"),
    "conv2d_scale_length": (lambda: slimops.ops.conv2d(**_conv_args(scale=torch.rand(12))),
                            r"scale must be a vector of length 9, got shape \(12,\)"),
    "conv2d_shift_2d": (lambda: slimops.ops.conv2d(**_conv_args(shift=torch.rand(9, 1))),
                        r"shift must be a vector of length 9"),
    "conv2d_residual_shape": (
        lambda: slimops.ops.conv2d(**_conv_args(residual=torch.randn(2, 12, 7, 7))),
        r"residual has shape \(2, 12, 7, 7\), the output has \(2, 9, 7, 7\)"),
    "conv2d_bias_shape": (lambda: slimops.ops.conv2d(**_conv_args(bias=torch.randn(9))),
                          r"bias must have shape \(12,\)"),
    "conv2d_activation": (lambda: slimops.ops.conv2d(**_conv_args(activation="gelu")),
                          r"unknown activation 'gelu'"),
    "conv2d_stride_zero": (lambda: slimops.ops.conv2d(**_conv_args(stride=0)), r"stride >= 1"),
    "conv2d_negative_padding": (lambda: slimops.ops.conv2d(**_conv_args(padding=(1, -1))),
                                r"padding >= 0"),
    "conv2d_stride_triple": (lambda: slimops.ops.conv2d(**_conv_args(stride=(1, 1, 1))),
                             r"stride must be an int or a pair"),
    "conv2d_3d_input": (lambda: slimops.ops.conv2d(**_conv_args(input=torch.randn(6, 7, 7))),
                        r"4-D input"),
    "conv2d_weight_3d": (lambda: slimops.ops.conv2d(**_conv_args(weight=torch.randn(12, 4, 3))),
                         r"weight must be 4-D"),
    "depthwise_weight_shape": (
        lambda: slimops.ops.depthwise_conv2d(torch.randn(2, 6, 7, 7), torch.randn(8, 2, 3, 3)),
        r"weight must have shape \[C, 1, kh, kw\]"),
    "depthwise_too_many_channels": (
        lambda: slimops.ops.depthwise_conv2d(torch.randn(2, 9, 7, 7), torch.randn(8, 1, 3, 3)),
        r"input has 9 channels; the weight has 8"),
    "depthwise_input_too_small": (
        lambda: slimops.ops.depthwise_conv2d(torch.randn(2, 6, 4, 7), torch.randn(8, 1, 5, 5)),
        r"too small for kernel"),
    "depthwise_scale_length": (
        lambda: slimops.ops.depthwise_conv2d(torch.randn(2, 6, 7, 7), torch.randn(8, 1, 3, 3),
                                             scale=torch.ones(8)),
        r"scale must be a vector of length 6"),
    "depthwise_residual_shape": (
        lambda: slimops.ops.depthwise_conv2d(torch.randn(2, 6, 7, 7), torch.randn(8, 1, 3, 3),
                                             padding=1, residual=torch.randn(2, 6, 5, 5)),
        r"residual has shape \(2, 6, 5, 5\), the output has \(2, 6, 7, 7\)"),
    "depthwise_activation": (
        lambda: slimops.ops.depthwise_conv2d(torch.randn(2, 6, 7, 7), torch.randn(8, 1, 3, 3),
                                             activation="RELU"),
        r"unknown activation 'RELU'"),
    "linear_in_too_large": (lambda: slimops.ops.linear(torch.randn(3, 7), torch.randn(8, 6)),
                            r"input has 7 features; the weight takes at most 6"),
    "linear_out_too_large": (
        lambda: slimops.ops.linear(torch.randn(3, 5), torch.randn(8, 6), None, 9),
        r"out_features=9 must be in \[1, 8\]"),
    "linear_out_zero": (lambda: slimops.ops.linear(torch.randn(3, 5), torch.randn(8, 6), None, 0),
                        r"out_features=0"),
    "linear_weight_3d": (lambda: slimops.ops.linear(torch.randn(3, 5), torch.randn(8, 6, 1)),
                         r"weight must be 2-D"),
    "linear_bias_shape": (
        lambda: slimops.ops.linear(torch.randn(3, 5), torch.randn(8, 6), torch.randn(5)),
        r"bias must have shape \(8,\)"),
    "linear_scalar_input": (lambda: slimops.ops.linear(torch.tensor(1.0), torch.randn(8, 6)),
                            r"at least 1 dim"),
    "bn_weight_length": (
        lambda: slimops.ops.batch_norm_act(torch.randn(3, 4, 2), torch.ones(5), None, None, None,
                                           True),
        r"weight must be a vector of length 4"),
    "bn_running_mean_length": (
        lambda: slimops.ops.batch_norm_act(torch.randn(3, 4, 2), None, None, torch.zeros(3),
                                           torch.ones(4), False),
        r"running_mean must be a vector of length 4"),
    "bn_residual_shape": (
        lambda: slimops.ops.batch_norm_act(torch.randn(3, 4, 2), None, None, None, None, True,
                                           residual=torch.randn(3, 4)),
        r"residual has shape \(3, 4\), the output has \(3, 4, 2\)"),
    "bn_eval_without_stats": (
        lambda: slimops.ops.batch_norm_act(torch.randn(3, 4), None, None, torch.zeros(4), None,
                                           False),
        r"eval mode needs running_mean and running_var"),
    "bn_one_value_per_channel": (
        lambda: slimops.ops.batch_norm_act(torch.randn(1, 4, 1, 1), None, None, None, None,
                                           True),
        r"more than 1 value per channel"),
    "bn_1d_input": (lambda: slimops.ops.batch_norm_act(torch.randn(4), None, None, None, None,
                                                       True),
                    r"at least 2 dims"),
    "bn_activation": (
        lambda: slimops.ops.batch_norm_act(torch.randn(3, 4), None, None, None, None, True,
                                           activation="sigmoid"),
        r"unknown activation 'sigmoid'"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise_value_error(case):
    call, message = BAD_ARGS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_non_tensor_input_raises_type_error():
    for call in (lambda: slimops.ops.conv2d([[1.0]], torch.randn(2, 1, 1, 1)),
                 lambda: slimops.ops.linear([1.0], torch.randn(2, 1)),
                 lambda: slimops.ops.batch_norm_act(None, None, None, None, None, True)):
        with pytest.raises(TypeError, match="must be a Tensor"):
            call()


# --------------------------------------------------------------------------------------
# the C++ checks themselves: torch.ops.slimops.* called directly, bypassing Python's


def _x(*s, dtype=F32):
    return torch.randn(s, dtype=dtype)


def _conv(x, w, o, *, groups=1, stride=(1, 1), padding=(1, 1), bias=None, scale=None,
          residual=None, act=0):
    return torch.ops.slimops.conv2d(x, w, bias, o, list(stride), list(padding), [1, 1], groups,
                                    scale, None, residual, act)


def _dw(x, w, *, stride=(1, 1), padding=(1, 1), residual=None, scale=None):
    return torch.ops.slimops.depthwise_conv2d(x, w, None, list(stride), list(padding), [1, 1],
                                              scale, None, residual, 0)


def _bn(x, *, weight=None, rm=None, rv=None, training=True, residual=None, act=0):
    return torch.ops.slimops.batch_norm_act(x, weight, None, rm, rv, training, 1e-5, residual,
                                            act)


CPP_CHECKS = {
    # conv2d
    "conv2d_3d_input": lambda: _conv(_x(6, 7, 7), _x(12, 6, 3, 3), 12),
    "conv2d_out_channels_too_large": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3, 3), 13),
    "conv2d_out_channels_negative": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3, 3), -3),
    "conv2d_float16": lambda: _conv(_x(2, 6, 7, 7).half(), _x(12, 6, 3, 3).half(), 12),
    "conv2d_in_channels_too_large": lambda: _conv(_x(2, 8, 7, 7), _x(12, 6, 3, 3), 12),
    "conv2d_residual_shape": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3, 3), 12,
                                           residual=_x(2, 12, 5, 5)),
    "conv2d_scale_length": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3, 3), 9, scale=_x(12)),
    "conv2d_bias_length": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3, 3), 9, bias=_x(9)),
    "conv2d_groups_not_dividing": lambda: _conv(_x(2, 6, 7, 7), _x(12, 2, 3, 3), 6, groups=5),
    "conv2d_groups_zero": lambda: _conv(_x(2, 6, 7, 7), _x(12, 2, 3, 3), 6, groups=0),
    "conv2d_out_not_multiple_of_groups": lambda: _conv(_x(2, 6, 7, 7), _x(12, 2, 3, 3), 7,
                                                       groups=3),
    "conv2d_input_too_small": lambda: _conv(_x(2, 6, 1, 7), _x(12, 6, 3, 3), 12,
                                            padding=(0, 0)),
    "conv2d_stride_zero": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3, 3), 12, stride=(0, 1)),
    "conv2d_negative_padding": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3, 3), 12,
                                             padding=(-1, 0)),
    "conv2d_activation_code": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3, 3), 12, act=7),
    "conv2d_dtype_mismatch": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3, 3, dtype=F64), 12),
    "conv2d_weight_not_contiguous": lambda: _conv(
        _x(2, 6, 7, 7), _x(12, 6, 3, 3).contiguous(memory_format=torch.channels_last), 12),
    "conv2d_weight_3d": lambda: _conv(_x(2, 6, 7, 7), _x(12, 6, 3), 12),
    "conv2d_backward_input_grad_shape": lambda: torch.ops.slimops.conv2d_backward_input(
        _x(2, 12, 5, 5), _x(12, 6, 3, 3), [2, 6, 7, 7], [1, 1], [1, 1], [1, 1], 1),
    "conv2d_backward_input_size_3d": lambda: torch.ops.slimops.conv2d_backward_input(
        _x(2, 12, 7, 7), _x(12, 6, 3, 3), [2, 6, 7], [1, 1], [1, 1], [1, 1], 1),
    "conv2d_backward_weight_batch": lambda: torch.ops.slimops.conv2d_backward_weight(
        _x(3, 12, 7, 7), _x(2, 6, 7, 7), _x(12, 6, 3, 3), [1, 1], [1, 1], [1, 1], 1),
    "epilogue_backward_shape": lambda: torch.ops.slimops.epilogue_backward(
        _x(2, 3, 4, 4), _x(2, 3, 4, 5), None, 1),
    "epilogue_backward_scale_length": lambda: torch.ops.slimops.epilogue_backward(
        _x(2, 3, 4, 4), _x(2, 3, 4, 4), _x(4), 0),
    "epilogue_backward_1d": lambda: torch.ops.slimops.epilogue_backward(_x(4), _x(4), None, 1),
    # depthwise
    "depthwise_weight_shape": lambda: _dw(_x(2, 6, 7, 7), _x(8, 2, 3, 3)),
    "depthwise_too_many_channels": lambda: _dw(_x(2, 9, 7, 7), _x(8, 1, 3, 3)),
    "depthwise_float16": lambda: _dw(_x(2, 6, 7, 7).half(), _x(8, 1, 3, 3).half()),
    "depthwise_residual_shape": lambda: _dw(_x(2, 6, 7, 7), _x(8, 1, 3, 3),
                                            residual=_x(2, 6, 5, 5)),
    "depthwise_scale_length": lambda: _dw(_x(2, 6, 7, 7), _x(8, 1, 3, 3), scale=_x(8)),
    "depthwise_input_too_small": lambda: _dw(_x(2, 6, 2, 7), _x(8, 1, 5, 5), padding=(0, 2)),
    "depthwise_3d_input": lambda: _dw(_x(6, 7, 7), _x(8, 1, 3, 3)),
    "depthwise_backward_input_grad_shape": lambda: (
        torch.ops.slimops.depthwise_conv2d_backward_input(
            _x(2, 6, 5, 5), _x(8, 1, 3, 3), [2, 6, 7, 7], [1, 1], [1, 1], [1, 1])),
    "depthwise_backward_weight_grad_shape": lambda: (
        torch.ops.slimops.depthwise_conv2d_backward_weight(
            _x(2, 6, 5, 5), _x(2, 6, 7, 7), _x(8, 1, 3, 3), [1, 1], [1, 1], [1, 1])),
    # linear
    "linear_in_too_large": lambda: torch.ops.slimops.linear(_x(3, 7), _x(8, 6), None, 8),
    "linear_out_too_large": lambda: torch.ops.slimops.linear(_x(3, 5), _x(8, 6), None, 9),
    "linear_out_negative": lambda: torch.ops.slimops.linear(_x(3, 5), _x(8, 6), None, -1),
    "linear_float16": lambda: torch.ops.slimops.linear(_x(3, 5).half(), _x(8, 6).half(), None,
                                                       8),
    "linear_weight_3d": lambda: torch.ops.slimops.linear(_x(3, 5), _x(8, 6, 1), None, 8),
    "linear_bias_length": lambda: torch.ops.slimops.linear(_x(3, 5), _x(8, 6), _x(6), 6),
    "linear_scalar_input": lambda: torch.ops.slimops.linear(_x(), _x(8, 6), None, 8),
    "linear_backward_input_in_too_large": lambda: torch.ops.slimops.linear_backward_input(
        _x(3, 8), _x(8, 6), 7),
    "linear_backward_weight_rows": lambda: torch.ops.slimops.linear_backward_weight(
        _x(4, 8), _x(3, 6), _x(8, 6)),
    # batch_norm_act
    "bn_eval_without_stats": lambda: _bn(_x(3, 4), training=False),
    "bn_one_value_per_channel": lambda: _bn(_x(1, 4)),
    "bn_weight_length": lambda: _bn(_x(3, 4, 2), weight=_x(5)),
    "bn_running_var_length": lambda: _bn(_x(3, 4), rm=_x(4), rv=_x(3), training=False),
    "bn_1d_input": lambda: _bn(_x(4)),
    "bn_residual_shape": lambda: _bn(_x(3, 4, 2), residual=_x(3, 4)),
    "bn_float16": lambda: _bn(_x(3, 4).half()),
    "bn_activation_code": lambda: _bn(_x(3, 4), act=-1),
    "bn_backward_shapes": lambda: torch.ops.slimops.batch_norm_act_backward(
        _x(3, 4), _x(3, 4), _x(3, 5), None, _x(4), _x(4), 1e-5, True, 0),
    "bn_backward_mean_length": lambda: torch.ops.slimops.batch_norm_act_backward(
        _x(3, 4), _x(3, 4), _x(3, 4), None, _x(3), _x(4), 1e-5, True, 0),
}


@needs_c
@pytest.mark.parametrize("case", list(CPP_CHECKS))
def test_cpp_checks_raise_runtime_error(case):
    with pytest.raises(RuntimeError, match="slimops:"):  # our TORCH_CHECK, not a stray error
        CPP_CHECKS[case]()


# --------------------------------------------------------------------------------------
# the direct entries (csrc/python_module.cpp): the op's dispatcher call without torch.ops'
# boxing, NotImplemented where torch.ops has to decide


def _direct_calls():
    """op -> (positional schema arguments): every tensor a plain one."""
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3), torch.randn(8)
    dw = torch.randn(6, 1, 3, 3)
    return {
        "conv2d": (x, w, b, 6, [2, 1], (1, 1), [1, 1], 1, torch.rand(6), torch.randn(6), None,
                   1),
        "depthwise_conv2d": (x, dw, None, (1, 1), [1, 1], [1, 1], None, torch.randn(4),
                             torch.randn(2, 4, 6, 6), 2),
        "linear": (torch.randn(3, 5), torch.randn(7, 6), torch.randn(7), 4),
        "batch_norm_act": (x, torch.rand(4), torch.randn(4), torch.zeros(4), torch.ones(4),
                           True, 1e-5, None, 1),
    }


@needs_c
@pytest.mark.parametrize("op", list(_direct_calls()))
def test_direct_entry_matches_torch_ops(op):
    args = _direct_calls()[op]
    got = _backend.direct_entry(op)(*args)
    exp = getattr(torch.ops.slimops, op).default(*args)
    for g, e in zip(got if isinstance(got, tuple) else [got],
                    exp if isinstance(exp, tuple) else [exp]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@needs_c
def test_direct_update_running_stats_bumps_versions():
    mean, var = torch.zeros(4), torch.ones(4)
    versions = (mean._version, var._version)
    assert _backend.direct_entry("update_running_stats")(
        mean, var, torch.full((4,), 2.0), torch.full((4,), 3.0), 10, 0.5) is None
    torch.testing.assert_close(mean, torch.full((4,), 1.0))
    torch.testing.assert_close(var, torch.full((4,), 0.5 + 0.5 * 3.0 * 10 / 9))
    assert (mean._version, var._version) > versions


class _Tagged(torch.Tensor):
    """A subclass with its own __torch_function__ (records the functions it sees)."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


@needs_c
def test_direct_entry_leaves_subclasses_and_modes_to_torch_ops():
    from torch.overrides import TorchFunctionMode

    args = list(_direct_calls()["conv2d"])
    direct = _backend.direct_entry("conv2d")
    args[0] = args[0].as_subclass(_Tagged)
    assert direct(*args) is NotImplemented
    _Tagged.seen.clear()
    out = slimops.ops.conv2d(args[0], args[1], None, 6, 1, 1)  # through torch.ops
    assert "slimops.conv2d.default" in _Tagged.seen and isinstance(out, _Tagged)
    args[0] = torch.randn(2, 4, 6, 6)

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as mode:
        assert direct(*args) is NotImplemented
        slimops.ops.conv2d(args[0], args[1], None, 6, 1, 1)
    assert any("slimops.conv2d" in f for f in mode.seen)


@needs_c
@pytest.mark.parametrize("bad", [
    ("a float for an int", 3, 6.0), ("a 3-element pair", 4, [1, 1, 1]),
    ("a pair of floats", 5, (1.0, 1.0)), ("too few arguments", None, None)])
def test_direct_entry_other_forms_are_not_implemented(bad):
    _, index, value = bad
    args = list(_direct_calls()["conv2d"])
    if index is None:
        args = args[:-1]
    else:
        args[index] = value
    assert _backend.direct_entry("conv2d")(*args) is NotImplemented


@needs_c
def test_direct_entry_errors_are_torch_ops_errors():
    args = list(_direct_calls()["conv2d"])
    args[3] = 9  # more output channels than the weight has
    with pytest.raises(RuntimeError, match="slimops::conv2d") as direct:
        _backend.direct_entry("conv2d")(*args)
    with pytest.raises(RuntimeError) as boxed:
        torch.ops.slimops.conv2d.default(*args)
    assert str(direct.value).splitlines()[0] == str(boxed.value).splitlines()[0]


@needs_c
def test_direct_entry_is_the_dispatcher_call():
    """Autograd records the op's node, the profiler the op, and a dispatch mode sees it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    args = list(_direct_calls()["conv2d"])
    args[1] = args[1].requires_grad_()
    with torch.profiler.profile() as prof:
        out = _backend.direct_entry("conv2d")(*args)
    assert out.grad_fn.name() == "slimops::Conv2dBackward"
    assert "slimops::conv2d" in {e.name for e in prof.events()}

    class Record(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        _backend.direct_entry("conv2d")(*args)
    assert "slimops.conv2d.default" in Record.seen


def test_missing_extension_warns_once_and_falls_back():
    """The extension not importable at all (not built, or an ABI mismatch): import works,
    one RuntimeWarning names the cause, and layers run on the reference path."""
    child = (
        "import sys, warnings\n"
        "sys.modules['slimops._C'] = None  # makes `import slimops._C` raise ImportError\n"
        "warnings.simplefilter('always')\n"
        "import slimops, torch\n"
        "import slimops.ops, slimops.nn\n"
        "m = slimops.nn.SlimmableConv2d([2, 4], [3, 6], 3, widths=[0.5, 1.0])\n"
        "for _ in range(3):\n"
        "    m(torch.randn(1, 4, 5, 5))\n"
        "print(slimops.backend_info()['cpu'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SLIMOPS_DISABLE_C"}
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference"
    assert proc.stderr.count("RuntimeWarning") == 1, proc.stderr
    assert "slimops._C is not available" in proc.stderr


# --------------------------------------------------------------------------------------
# CUDA kernels: the Triton launchers registered for the CUDA dispatch key


def test_every_op_has_a_cuda_kernel_when_triton_is_installed():
    from slimops import kernels
    from slimops.ops.cuda_registration import OP_FAMILIES

    if not (_backend.HAS_C and kernels.available()):
        pytest.skip("needs the compiled extension (it defines the ops) and triton")
    for op in OP_FAMILIES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"slimops::{op}", "CUDA"), op
    assert set(_backend.CUDA_KERNELS) == set(OP_FAMILIES)
    assert _backend.CUDA_READY
    assert slimops.backend_info()["cuda_kernels"] in ("triton", "cuda+triton", "cuda")


def test_registration_is_idempotent_and_keeps_the_record():
    from slimops import kernels
    from slimops.ops import cuda_registration

    if not (_backend.HAS_C and kernels.available()):
        pytest.skip("needs the compiled extension and triton")
    before = dict(_backend.CUDA_KERNELS)
    assert cuda_registration.register() == before
    assert _backend.CUDA_KERNELS == before


def test_every_registered_launcher_exists_with_the_schema_arity():
    """The launcher named after each op exists in its kernel module and takes the op's
    arguments (so the dispatcher's call reaches it)."""
    import importlib
    import inspect

    from slimops import kernels
    from slimops.ops.cuda_registration import OP_FAMILIES

    if not kernels.available() or not _backend.HAS_C:
        pytest.skip("needs triton and the compiled extension")
    for op, family in OP_FAMILIES.items():
        module = importlib.import_module(f"slimops.kernels.{family}")
        launcher = getattr(module, op)
        schema = getattr(torch.ops.slimops, op).default._schema
        params = inspect.signature(launcher).parameters
        assert list(params) == [a.name for a in schema.arguments], op


# --------------------------------------------------------------------------------------
# one CUDA implementation per op: Triton by default, the CUDA C++ kernels opt-in


def test_choose_triton_by_default_cpp_only_when_asked_or_alone():
    from slimops.ops.cuda_registration import choose

    # (has_cpp, has_triton, prefer_cpp) -> choice
    table = {
        (True, True, False): "triton",  # a CUDA build no longer lets the C++ kernel win
        (True, True, True): "cuda",  # the opt-in
        (True, False, False): "cuda",  # all there is
        (True, False, True): "cuda",
        (False, True, False): "triton",
        (False, True, True): "triton",  # nothing to opt in to: Triton
        (False, False, False): None,
        (False, False, True): None,
    }
    for args, want in table.items():
        assert choose(*args) == want, args


@pytest.fixture
def scratch_ops():
    """Two ops of a namespace of this test's own with CPU kernels standing in for the
    extension's (``f``: x + 1; ``g`` has none), and launchers standing in for Triton
    (x + 2), so ``cuda_registration.apply`` can be run for the CPU key and called."""
    from slimops.ops import cuda_registration as cr

    ns = "slimops_regtest"
    lib = torch.library.Library(ns, "DEF")
    lib.define("f(Tensor x) -> Tensor")
    lib.define("g(Tensor x) -> Tensor")
    lib.impl("f", lambda x: x + 1, "CPU")
    launchers = {"f": lambda x: x + 2, "g": lambda x: x + 2}
    try:
        yield ns, launchers
    finally:
        for slot in [s for s in cr._libraries if s.startswith(ns + "::")]:
            cr._libraries.pop(slot)._destroy()
        for slot in [s for s in cr._native if s.startswith(ns + "::")]:
            del cr._native[slot]
        lib._destroy()


def test_apply_registers_over_the_native_kernel_and_restores_it(scratch_ops):
    import warnings

    from slimops.ops.cuda_registration import apply

    ns, launchers = scratch_ops
    x = torch.zeros(2)
    f, g = (getattr(getattr(torch.ops, ns), name) for name in ("f", "g"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert apply(launchers, False, True, namespace=ns, dispatch_key="CPU") == {
            "f": "triton", "g": "triton"}
    assert not [w for w in caught if "Overriding" in str(w.message)]
    assert f(x).tolist() == [2, 2] and g(x).tolist() == [2, 2]
    # idempotent
    assert apply(launchers, False, True, namespace=ns, dispatch_key="CPU") == {
        "f": "triton", "g": "triton"}
    assert f(x).tolist() == [2, 2]
    # the opt-in: the op with a kernel of its own runs it again, the other keeps Triton
    assert apply(launchers, True, True, namespace=ns, dispatch_key="CPU") == {
        "f": "cuda", "g": "triton"}
    assert f(x).tolist() == [1, 1] and g(x).tolist() == [2, 2]
    # and back
    assert apply(launchers, False, True, namespace=ns, dispatch_key="CPU")["f"] == "triton"
    assert f(x).tolist() == [2, 2]
    # no triton: the native kernel where there is one, nothing for the other op
    assert apply(launchers, False, False, namespace=ns, dispatch_key="CPU") == {"f": "cuda"}
    assert f(x).tolist() == [1, 1]
    with pytest.raises(NotImplementedError):  # g's launcher is gone: no kernel for it
        g(x)


def test_every_op_runs_triton_on_cuda_by_default():
    """The default: whatever the build (the CUDA C++ kernels compiled in or not), every op's
    CUDA kernel is its Triton launcher."""
    from slimops import kernels

    if not (_backend.HAS_C and kernels.available()):
        pytest.skip("needs the compiled extension and triton")
    if _backend.cuda_cpp_preferred():
        pytest.skip("SLIMOPS_CUDA_KERNELS=cuda is set in this environment")
    assert set(_backend.CUDA_KERNELS.values()) == {"triton"}
    assert slimops.backend_info()["cuda_kernels"] == "triton"


def test_use_cuda_cpp_kernels_switches_and_switches_back():
    from slimops import kernels
    from slimops.ops import cuda_registration

    if not (_backend.HAS_C and kernels.available()):
        pytest.skip("needs the compiled extension and triton")
    before = _backend.cuda_cpp_preferred()
    # the ops with a C++ CUDA kernel in this build (none without nvcc + a GPU at build time)
    cpp = {op for op in cuda_registration.OP_FAMILIES
           if cuda_registration._native.get(f"slimops::{op}/CUDA")}
    try:
        on = slimops.ops.use_cuda_cpp_kernels(True)
        assert _backend.cuda_cpp_preferred()
        assert {op for op, k in on.items() if k == "cuda"} == cpp
        assert set(on) == set(cuda_registration.OP_FAMILIES) and _backend.CUDA_READY
        off = slimops.ops.use_cuda_cpp_kernels(False)
        assert not _backend.cuda_cpp_preferred()
        assert set(off.values()) == {"triton"}
        assert _backend.CUDA_KERNELS == off
    finally:
        slimops.ops.use_cuda_cpp_kernels(before)


@pytest.mark.parametrize("value,preferred,warns", [("", False, False), ("triton", False, False),
                                                   ("cuda", True, False), ("CUDA", True, False),
                                                   ("cudnn", False, True)])
def test_cuda_kernels_environment_variable(value, preferred, warns):
    code = ("import json, slimops; from slimops.ops import _backend; "
            "print(json.dumps([_backend.cuda_cpp_preferred(), "
            "slimops.backend_info()['cuda_kernels']]))")
    env = dict(os.environ, SLIMOPS_CUDA_KERNELS=value)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", code],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got, kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got is preferred
    assert ("SLIMOPS_CUDA_KERNELS='cudnn' is not one of" in proc.stderr) is warns
    if HAS_C:
        # no C++ CUDA kernels in a build without nvcc: the opt-in leaves Triton running
        assert kernels in ("triton", "cuda+triton")
