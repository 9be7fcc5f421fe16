"""Shared fixtures of the slimops test suite.

Every test starts from the same RNG state, and the helpers below are exposed as fixtures (not
imported), so test modules in sub-folders can use them without a package layout.
"""

from __future__ import annotations

import os

import torch

# The Triton kernels' tests (tests/kernels/) run them under the interpreter on CPU tensors
# when no GPU is present. Triton reads the switch when a kernel is defined, so it is set
# before anything imports slimops.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# The conv passes' route is measured per shape by default (csrc/cpu/route.h), so which code
# ran would depend on the machine and its load. The suite pins the fixed rules, so each test
# checks the path it names (the direct kernels, im2col + GEMM, oneDNN at full width);
# tests/test_ops_conv2d_route.py covers the measured choice and the oneDNN route.
os.environ.setdefault("SLIMOPS_CONV_ROUTE", "fixed")
# The load watch (slimops.ops.load_watch) takes the ops to one thread while the machine is
# contended, and two test processes on two cores contend: a result could then round as on one
# thread in one call and as on two in the next (oneDNN, MKL). The suite keeps the thread team
# (the watch off); tests/test_ops_load_watch.py sets the policies it checks.
os.environ.setdefault("SLIMOPS_LOAD_POLICY", "off")

import pytest  # noqa: E402

from slimops.nn import SlimConvBNAct, SlimmableConv2d, SlimmableLinear
from slimops.width import channels

WIDTHS = (0.25, 0.5, 1.0)

# The modules whose run is longest (minutes each on 2 cores: a model's training step under
# the Triton interpreter, the AOT compiles), in that order. `make test` runs the suite in
# two pytest-xdist workers, a module at a time each (--dist loadfile); started last, as the
# default order had them, either was the run's tail with the other worker idle.
LONGEST_MODULES = ("kernels/test_kernels_model.py", "kernels/test_aot.py")


def pytest_collection_modifyitems(items):
    """Run ``LONGEST_MODULES`` first, the other modules in their usual order after them."""
    def rank(item):
        path = item.path.as_posix()
        return next((i for i, m in enumerate(LONGEST_MODULES) if path.endswith("/tests/" + m)),
                    len(LONGEST_MODULES))

    items.sort(key=rank)  # stable: each module keeps its tests' order


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _tol(dtype: torch.dtype, like: torch.Tensor = None) -> dict:
    # float32: room for a kernel's different summation order; float64: tight.
    out = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    if like is not None and like.numel():
        # long reductions (weight gradients of bigger shapes): absolute error grows with the
        # magnitude of the terms, so scale atol by the expected tensor's largest entry
        out["atol"] *= max(1.0, float(like.detach().abs().max()))
    return out


@pytest.fixture
def tol():
    """``tol(dtype, like=None)``: ``rtol``/``atol`` keyword arguments for ``assert_close``;
    with ``like`` (the expected tensor), ``atol`` scales with its largest magnitude."""
    return _tol


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial γ, β and running statistics for every batch norm of ``model`` (in place)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 4.0)
                    m.bias.normal_()
                if m.running_mean is not None:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
    return model


def _make_cnn(dtype: torch.dtype = torch.float32, widths=WIDTHS) -> torch.nn.Module:
    """A small slimmable CNN: conv-BN-ReLU (stride 2) -> depthwise conv -> pool -> linear."""
    c = channels(16, widths)
    model = torch.nn.Sequential(
        SlimConvBNAct(3, c, 3, stride=2, widths=widths, dtype=dtype),
        SlimmableConv2d(c, c, 3, padding=1, groups=max(c), widths=widths, dtype=dtype),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        SlimmableLinear(c, 10, widths=widths, dtype=dtype),
    )
    return randomize_bn(model)


@pytest.fixture
def make_cnn():
    """``make_cnn(dtype=float32, widths=(0.25, 0.5, 1.0))``: the small slimmable CNN above,
    with randomized batch norm parameters and statistics."""
    return _make_cnn


@pytest.fixture(name="randomize_bn")
def _randomize_bn_fixture():
    """``randomize_bn(model)``: randomize every BN's γ, β and running stats in place."""
    return randomize_bn


@pytest.fixture
def one_thread():
    """Run single-threaded (the op sweeps use it, unless a test asks for ``all_threads``):
    on a busy 2-core machine every OpenMP region of a tiny op can wait milliseconds for a
    descheduled worker, which makes sweeps of hundreds of small cases slow. The threaded code
    paths (images in parallel, BLAS threads) have their own tests, which request
    ``all_threads``. Yields the thread count it replaced."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield n
    torch.set_num_threads(n)


@pytest.fixture
def all_threads(one_thread):
    torch.set_num_threads(max(2, one_thread))

