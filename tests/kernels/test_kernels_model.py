"""The whole set of Triton launchers, as registered for CUDA, runs a slimmable model.

Without a GPU the CUDA dispatch key is never reached, so this test registers the same
launchers (``slimops.ops.cuda_registration``) for the CPU key in a subprocess running under
``TRITON_INTERPRET=1``, and checks that a slimmable model's training step (forward, loss,
backward through every op's autograd formula) and eval forward at two widths match the
C++ CPU kernels, with training-mode S-BN taking its statistics from the Triton conv's
epilogue (``conv2d_bn_act_train``, ``depthwise_conv2d_bn_act_train``) as it does on a GPU. It checks the plumbing a CUDA tensor would take: the launchers' arguments
as the dispatcher passes them, their outputs' shapes and dtypes as the autograd formulas
expect, and the full-size weight gradients.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from slimops.ops import _backend  # noqa: E402

SCRIPT = textwrap.dedent(r"""
    import copy, json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import slimops
    from slimops.models import slim_cnn

    torch.manual_seed(0)
    base = slim_cnn()
    x = torch.randn(2, 3, 12, 12)

    def step(model, w):
        model.train()
        with slimops.width(model, w):
            out = model(x)
            out.square().mean().backward()
        model.eval()
        with torch.no_grad(), slimops.width(model, w):
            y = model(x)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), y, grads

    widths = (slimops.model_widths(base)[0], slimops.model_widths(base)[-1])
    expected = {w: step(copy.deepcopy(base), w) for w in widths}

    called = set()

    def counted(op, launch):
        def fn(*args):
            called.add(op)
            return launch(*args)
        return fn

    sys.path.insert(0, sys.argv[1])  # tests/: helpers
    from helpers import register_triton_launchers_on_cpu

    lib = torch.library.Library("slimops", "IMPL")
    register_triton_launchers_on_cpu(lib, counted)

    # training-mode S-BN with statistics from the conv's epilogue, as on a CUDA tensor
    from slimops.ops import conv2d_bn_act as fused

    def fused_triton(*args):
        called.add("conv2d_bn_act_train")
        return fused._triton(*args)

    def fused_dw_triton(*args):
        called.add("depthwise_conv2d_bn_act_train")
        return fused._dw_triton(*args)

    torch.library.register_kernel("slimops::conv2d_bn_act_train", "cpu", fused_triton)
    torch.library.register_kernel("slimops::depthwise_conv2d_bn_act_train", "cpu",
                                  fused_dw_triton)

    # every width twice: training-mode BN as its own op (as a CPU tensor runs), then with
    # the statistics from the conv's epilogue (as a CUDA tensor runs)
    report = {}
    for path, w in [(path, w) for path in ("two_ops", "fused") for w in widths]:
        fused.fused_train_available = lambda x, w=None, on=(path == "fused"): on
        out, y, grads = step(copy.deepcopy(base), w)
        e_out, e_y, e_grads = expected[w]
        assert set(grads) == set(e_grads), sorted(set(grads) ^ set(e_grads))
        report[f"{path} {w}"] = {
            "train_out": float((out - e_out).abs().max()),
            "eval_out": float((y - e_y).abs().max()),
            "grads": max(float((grads[n] - e_grads[n]).abs().max()
                               / max(1.0, float(e_grads[n].abs().max()))) for n in grads),
            "grad_shapes_full": all(grads[n].shape == p.shape
                                    for n, p in base.named_parameters() if n in grads),
            "scale": float(e_out.abs().max()),
        }
    report["called"] = sorted(called)
    print(json.dumps(report))
""")


@pytest.mark.skipif(not _backend.HAS_C, reason="needs the compiled extension (the ops)")
def test_model_step_on_the_triton_launchers_matches_the_cpu_kernels():
    env = dict(os.environ, TRITON_INTERPRET="1")
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", SCRIPT, tests], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    called = set(report.pop("called"))
    # every op family the model uses ran on a Triton launcher, forward and backward (a conv
    # both of whose gradients are wanted runs conv2d_backward, whose launcher runs the input
    # and weight gradients' kernels; the first conv, whose input is the image, the weight's)
    assert {"conv2d", "conv2d_backward", "conv2d_backward_weight", "depthwise_conv2d",
            "depthwise_conv2d_backward_input", "depthwise_conv2d_backward_weight", "linear",
            "linear_backward_input", "linear_backward_weight", "batch_norm_act",
            "batch_norm_act_backward", "conv2d_bn_act_train",
            "depthwise_conv2d_bn_act_train"} <= called, sorted(called)
    assert len(report) == 4
    for w, r in report.items():
        assert r["grad_shapes_full"], w
        assert r["train_out"] <= 1e-4 * max(1.0, r["scale"]), (w, r)
        assert r["eval_out"] <= 1e-4 * max(1.0, r["scale"]), (w, r)
        assert r["grads"] <= 1e-4, (w, r)
