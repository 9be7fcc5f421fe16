"""Helpers shared by the op test modules (importable: pytest puts tests/ on sys.path)."""

import torch

# The torch.library.opcheck utilities every op is checked with.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """A new leaf on ``t``'s storage: keeps its strides (clone() would not for a sliced one)."""
    return t.detach().requires_grad_(grad)


def run_with_grads(op, kwargs, grad_out):
    """``op(**kwargs)`` on fresh leaves of its tensor arguments, and the gradient of every one
    of them for ``grad_out``: ``(out, {name: grad})``."""
    leaves = {k: leaf(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = op(**leaves)
    tensors = [k for k, v in leaves.items() if isinstance(v, torch.Tensor)]
    grads = torch.autograd.grad(out, [leaves[k] for k in tensors], grad_out)
    return out, dict(zip(tensors, grads))


def check_op_switch(op, ref_op, kwargs, monkeypatch, tol, switch, tol_on=None):
    """``op`` with the environment switch ``switch`` (read on every call) at 1 and at 0,
    forward and every gradient, each against ``ref_op``; returns both runs'
    ``(output, gradients)``. The forward's tolerance scales with the output before its
    activation (a kernel's rounding is relative to the convolution's magnitude, which a relu6
    clips away from the output). ``tol_on`` (default ``tol``): the tolerance of the switch-on
    run, for kernels whose rounding is documented as larger."""
    pre_activation = ref_op(**dict(kwargs, activation=None))
    g = torch.randn_like(pre_activation)
    ref, ref_grads = run_with_grads(ref_op, kwargs, g)
    results = []
    for on in (True, False):
        monkeypatch.setenv(switch, "1" if on else "0")
        run_tol = (tol_on or tol) if on else tol
        out, grads = run_with_grads(op, kwargs, g)
        torch.testing.assert_close(out, ref, **run_tol(torch.float32, pre_activation))
        for name, exp in ref_grads.items():
            torch.testing.assert_close(grads[name], exp, **run_tol(torch.float32, exp),
                                       msg=lambda m: f"{name} ({switch}={int(on)}): {m}")
        results.append((out, grads))
    return results


def check_conv2d_switch(kwargs, monkeypatch, tol, switch, tol_on=None):
    """check_op_switch for slimops.ops.conv2d against reference.conv2d."""
    from slimops import ops, reference

    return check_op_switch(ops.conv2d, reference.conv2d, kwargs, monkeypatch, tol, switch,
                           tol_on)


def compare_with_reference(op, ref_op, kwargs, tol, grad_out=None):
    """Forward and backward of ``op`` and ``ref_op`` on the same keyword arguments
    (independent leaf copies); every tensor argument that requires grad is differentiated
    and its gradient compared (a reference grad of None means zero). Returns
    ``(out, ref, names, grads)``: the names of the differentiated arguments and ``op``'s grads."""
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    ref_kwargs = {k: (leaf(v) if k in names else v) for k, v in kwargs.items()}
    out = op(**kwargs)
    ref = ref_op(**ref_kwargs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol(ref.dtype, ref))
    if not names:
        return out, ref, names, []
    g = torch.randn_like(ref) if grad_out is None else grad_out
    grads = torch.autograd.grad(out, [kwargs[k] for k in names], g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [ref_kwargs[k] for k in names], g, allow_unused=True)
    for name, got, exp in zip(names, grads, ref_grads):
        if exp is None:
            exp = torch.zeros_like(kwargs[name])
        assert got is not None and got.shape == kwargs[name].shape, name
        torch.testing.assert_close(got, exp, **tol(ref.dtype, exp), msg=lambda m: f"{name}: {m}")
    return out, ref, names, grads


def check_runs_between_switches(model, expected_range, in_between):
    """A model built from channel rules runs at any width between its switches: its
    ``width_range``, the stem's output channels at each ``(width, channels)`` of
    ``in_between``, BN calibration at those widths, then eval MACs that grow with the width
    (the universally slimmable setting the sandwich rule trains)."""
    from slimops.profile import profile
    from slimops.train import calibrate_bn
    from slimops.width import width, width_range

    assert width_range(model) == expected_range
    x = torch.randn(2, 3, 64, 64)
    for w, expected in in_between:
        with width(model, w):
            assert model.stem.conv.active_channels()[1] == expected
    calibrate_bn(model, [x], widths=[w for w, _ in in_between])
    counts = profile(model.eval(), (1, 3, 64, 64),
                     widths=sorted({*model.widths, *(w for w, _ in in_between)}))
    macs = [row.macs for row in counts]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)  # more width, more work


def image_folder(root, classes=("cat", "dog", "owl"), per_class=4, val_per_class=2, size=16,
                 seed=0):
    """``root/{train,val}/<class>/*.png`` (RGB, ``size`` x ``size``): each class one dominant
    colour plus noise, so a tiny network learns it in an epoch."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (size, size, 3))
                pixels[..., c % 3] += 170
                Image.fromarray(pixels.astype("uint8")).save(folder / f"{i}.png")
    return root


def register_triton_launchers_on_cpu(lib, wrap=lambda op, launch: launch):
    """Make a CPU run take the code a CUDA tensor takes: every op family's Triton launcher
    (``slimops.ops.cuda_registration``) becomes the op's CPU kernel on ``lib`` (a
    ``torch.library.Library("slimops", "IMPL")``); ``wrap(op, launch)`` may wrap each (to
    count calls). Used by subprocesses under ``TRITON_INTERPRET=1``."""
    import warnings

    from slimops.ops import cuda_registration

    launch = {op: wrap(op, cuda_registration._lazy(op)) for op in cuda_registration.OP_FAMILIES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for op, fn in launch.items():
            lib.impl(op, fn, "CPU")


def aot_results():
    """``slimops.kernels._aot.cached_results()`` (every AOT case compiled for sm_80 and
    sm_90: ~870 compiles, ~5 minutes on 2 cores) once per test run.

    Why: ``cached_results`` computes once per process, and ``make test`` runs pytest-xdist
    workers, each a process of its own; two modules that read the compiles
    (tests/kernels/test_aot.py, tests/kernels/test_kernels_compiled.py) in two workers
    compiled everything twice, at the same time. In a worker the first caller compiles
    while holding a lock file named by the run's id (``PYTEST_XDIST_TESTRUNUID``) and
    writes the results beside it; the others wait for the lock and read them."""
    import dataclasses
    import fcntl
    import json
    import os
    import tempfile
    from pathlib import Path

    from slimops.kernels import _aot

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:  # one process: the in-process cache is the run's
        return _aot.cached_results()
    path = Path(tempfile.gettempdir()) / f"slimops-aot-results-{run}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():
            return [_aot.AotResult(**r) for r in json.loads(path.read_text())]
        results = _aot.cached_results()
        path.write_text(json.dumps([dataclasses.asdict(r) for r in results]))
        return results


def spy_eval_chain(monkeypatch):
    """Records, per call of ``slimops.ops.eval_chain_call`` (a chained inference call,
    ``slimops.nn.EvalChain``), whether the chain answered (a tensor, not None or
    STALE_PLAN)."""
    import slimops

    answered = []
    chained = slimops.ops.eval_chain_call

    def call(*args):
        out = chained(*args)
        answered.append(isinstance(out, torch.Tensor))
        return out

    monkeypatch.setattr(slimops.ops, "eval_chain_call", call)
    return answered
