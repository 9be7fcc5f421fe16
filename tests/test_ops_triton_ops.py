"""slimops.ops.triton_ops: the Triton kernels as ``torch.library.triton_op``s, and
``slimops::<op>`` decomposing into them under ``torch.compile``.

No GPU needed: in this process (``TRITON_INTERPRET=1``, tests/conftest.py) the triton_ops
run eagerly on CPU tensors (on the GPU where there is one) and are compared with the C++
CPU ops on every call a small network's forward and backward make; the graphs
``torch.compile`` produces are checked in a process without the interpreter
(tests/trace_triton_ops.py, where the kernels are ``JITFunction``s as on a GPU), on fake
CUDA tensors (forward) and on fake CPU tensors with the decomposition enabled for the CPU
(forward and backward).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimops
from slimops import kernels
from slimops.op_families import IN_PLACE_OPS
from slimops.ops import triton_ops
from triton_ops_network import network

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(slimops.backend_info()["cpu"] != "C++",
                       reason="needs the compiled extension slimops._C"),
    pytest.mark.skipif(not kernels.available(), reason="needs triton"),
]

ROOT = Path(__file__).resolve().parent.parent
# Where the triton_ops run eagerly: the GPU, or the CPU under the interpreter (conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The Triton kernels the network's ops launch, in order, and the arguments torch's
# mutation analysis (on the kernels' TTIR) finds each writes: its outputs only.
CONV = {"kernel": "_conv_forward_kernel", "writes": ["out_ptr"]}
DEPTHWISE = {"kernel": "_dw_forward_kernel", "writes": ["out_ptr"]}
BN_STATS = {"kernel": "_bn_stats_kernel", "writes": ["moments_ptr"]}
BN_FINALIZE = {"kernel": "_bn_finalize_kernel",
               "writes": ["mean_ptr", "var_ptr", "alpha_ptr", "beta_ptr"]}
BN_APPLY = {"kernel": "_epilogue_kernel", "writes": ["out_ptr"]}
LINEAR = {"kernel": "_gemm_kernel", "writes": ["c_ptr"]}
EVAL_FORWARD = [CONV, DEPTHWISE, BN_FINALIZE, BN_APPLY, LINEAR]  # running statistics
TRAIN_FORWARD = [CONV, DEPTHWISE, BN_STATS, BN_FINALIZE, BN_APPLY, LINEAR]
BACKWARD_KERNELS = {
    "_gemm_kernel": ["c_ptr"],  # linear's input and weight gradients
    "_bn_backward_stats_kernel": ["psg_ptr", "psgx_ptr"],
    "_bn_backward_finalize_kernel": ["gw_ptr", "gb_ptr", "kg_ptr", "kx_ptr", "k0_ptr"],
    "_bn_backward_apply_kernel": ["gi_ptr"],
    "_epilogue_backward_kernel": ["result_ptr"],
    "_dw_backward_input_kernel": ["gx_ptr"],
    "_dw_weight_partials_kernel": ["part_ptr"],
    "_dw_weight_reduce_kernel": ["gw_ptr"],
    "_conv_backward_input_kernel": ["gx_ptr"],
    "_conv_backward_weight_kernel": ["gw_ptr"],
}


def parameters() -> Tuple[torch.Tensor, ...]:
    """x, the full shared weights, γ and β (all requiring gradients)."""
    def t(*shape):
        return torch.randn(*shape, requires_grad=True)

    return (t(2, 6, 9, 9), t(16, 4, 3, 3), t(16), t(14, 1, 3, 3), t(12), t(12), t(10, 12),
            t(10))


class RecordSlimopsCalls(TorchDispatchMode):
    """Records every ``slimops::`` op call below autograd: (op name, args, kwargs, output)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Tuple[str, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # In-place ops (op_families.IN_PLACE_OPS) have no triton_op by design.
        if func.namespace == "slimops" and func._schema.name.split("::")[1] not in IN_PLACE_OPS:
            self.calls.append((func._schema.name.split("::")[1], args, kwargs, out))
        return out


@pytest.fixture(scope="module")
def cpu_calls() -> List[Tuple[str, tuple, dict, Any]]:
    """The ``slimops::`` calls of the network's forward and backward on the C++ CPU ops, then
    of its conv with one gradient wanted (a first layer's image, a frozen weight): the two
    single backward ops, which the network's conv (both gradients: ``conv2d_backward``)
    does not call."""
    torch.manual_seed(0)
    args = parameters()
    x, w1 = args[0], args[1]
    with RecordSlimopsCalls() as mode:
        network(*args, torch.zeros(12), torch.ones(12), True).square().sum().backward()
        for image, weight, leaf in ((x.detach(), w1, w1), (x, w1.detach(), x)):
            out = slimops.ops.conv2d(image, weight, None, 12, stride=2, padding=1, groups=2)
            torch.autograd.grad(out.square().sum(), leaf)
    return mode.calls


def test_every_triton_op_is_called_by_the_network(cpu_calls):
    assert {name for name, *_ in cpu_calls} == set(triton_ops.TRITON_OPS)


@pytest.mark.parametrize("op", triton_ops.TRITON_OPS)
def test_schema_mirrors_the_slimops_op(op):
    mine = triton_ops.triton_op(op)._opoverload._schema
    theirs = getattr(torch.ops.slimops, op).default._schema
    assert mine.name == f"slimops_triton::{op}"
    assert [(a.name, str(a.type)) for a in mine.arguments] == \
        [(a.name, str(a.type)) for a in theirs.arguments]
    assert [str(r.type) for r in mine.returns] == [str(r.type) for r in theirs.returns]
    assert getattr(torch.ops.slimops_triton, op).default is triton_ops.triton_op(op)._opoverload


def on_device(args: tuple) -> tuple:
    """``args`` with their tensors on ``DEVICE`` (detached: a triton_op has no autograd)."""
    return tuple(a.detach().to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 products in fp32 on a GPU (the kernels follow torch's TF32 switches)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def test_triton_ops_match_the_cpu_ops(cpu_calls, tol):
    # Each triton_op's body is its op's Triton launcher (here under the interpreter).
    for name, args, kwargs, expected in cpu_calls:
        with exact_fp32():
            got = triton_ops.triton_op(name)(*on_device(args), **kwargs)
        if isinstance(expected, torch.Tensor):
            got, expected = (got,), (expected,)
        assert len(got) == len(expected), name
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.cpu(), e, **tol(e.dtype, e),
                                       msg=lambda m: f"slimops_triton::{name}: {m}")


def test_opcheck_schema(cpu_calls):
    # The schema test runs each op and checks it mutates and aliases nothing it declares
    # not to (a triton_op's outputs must be fresh tensors). The fake and AOT tests of
    # opcheck cannot run here: under the interpreter a kernel is a Python function that
    # reads its tensors' data, which fake tensors have not (tests/trace_triton_ops.py
    # checks the traced path without the interpreter).
    seen = set()
    for name, args, kwargs, _ in cpu_calls:
        if name in seen:
            continue
        seen.add(name)
        torch.library.opcheck(triton_ops.triton_op(name), on_device(args), kwargs,
                              test_utils=("test_schema",))


def _launches(path: Path) -> List[Tuple[str, bool]]:
    """Every launch ``X[grid](...)`` in ``path``: (where, whether ``X`` is
    ``traceable(kernel)``). A bare ``kernel[grid](...)`` would run the kernel on the fake
    tensors of a trace instead of recording it."""
    import ast

    tree = ast.parse(path.read_text())
    return [(f"{path.name}:{node.lineno} {ast.unparse(node.func)}",
             isinstance(node.func.value, ast.Call)
             and ast.unparse(node.func.value.func) == "traceable")
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
            and isinstance(node.func.value, (ast.Name, ast.Call))]


def test_every_launch_goes_through_wrap_triton():
    launches = [launch for path in sorted((ROOT / "kernels").glob("*.py"))
                for launch in _launches(path)]
    assert [where for where, traced in launches if not traced] == []
    # Every launch site of every family (the check is not vacuous): 15 since the depthwise
    # weight gradient's two stages launch from one loop over (kernel, grid, args).
    assert len(launches) >= 15


def test_traceable_wraps_kernels_only():
    from slimops.kernels._common import traceable
    from slimops.kernels.conv2d import _conv_forward_kernel

    # Under the interpreter wrap_triton hands an interpreted kernel back unchanged; a
    # stand-in that is no kernel is passed through rather than refused.
    assert traceable(_conv_forward_kernel) is _conv_forward_kernel
    stand_in = object()
    assert traceable(stand_in) is stand_in


def test_unknown_op_is_refused():
    with pytest.raises(KeyError, match="conv2d_bn_act_train"):
        triton_ops.triton_op("conv2d_bn_act_train")


def test_decompose_on_adds_a_device_for_the_block_only():
    assert triton_ops.DECOMPOSE_DEVICES == {"cuda"}
    with triton_ops.decompose_on("cpu", "cuda"):
        assert triton_ops.DECOMPOSE_DEVICES == {"cpu", "cuda"}
    assert triton_ops.DECOMPOSE_DEVICES == {"cuda"}


def test_rules_register_once_and_unregister():
    assert triton_ops.register_decompositions()  # slimops.ops registered them at import
    rules = triton_ops._rules
    assert rules is not None and triton_ops.register_decompositions() and \
        triton_ops._rules is rules
    try:
        triton_ops.unregister_decompositions()
        assert triton_ops._rules is None
    finally:
        triton_ops.register_decompositions()
    assert triton_ops._rules is not None


def _trace(mode: str) -> Dict[str, Any]:
    """Run tests/trace_triton_ops.py ``mode`` without the interpreter; its JSON."""
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "trace_triton_ops.py"), mode],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compile_on_cuda_sees_the_forward_kernels():
    result = _trace("cuda")
    assert result["out"] == [[2, 7], "cuda:0"]
    # One forward graph (no gradients, the batch norm in eval), every op decomposed into
    # its kernels: no opaque slimops op left.
    assert result["graphs"]["triton"] == [EVAL_FORWARD]
    # With the conv on the extension's CUDA C++ kernel (the opt-in) it stays opaque.
    assert result["graphs"]["conv2d_on_cpp"] == [[{"op": "slimops::conv2d"}]
                                                 + EVAL_FORWARD[1:]]
    # Eager launches (the ops' CUDA kernels) get the bare kernel, traced ones the wrapper.
    assert result["eager_launch_bare"] and result["traced_launch_wrapped"]


def test_compile_sees_the_backward_kernels_and_leaves_the_cpu_alone():
    result = _trace("cpu")
    assert result["grads"] == [[2, 6, 9, 9], [16, 4, 3, 3], [16], [14, 1, 3, 3], [12], [12],
                               [10, 12], [10]]
    forward, backward = result["graphs"]["triton"]
    assert forward == TRAIN_FORWARD
    assert all("kernel" in node for node in backward), backward  # no opaque slimops op
    assert {node["kernel"] for node in backward} == set(BACKWARD_KERNELS)
    for node in backward:
        assert node["writes"] == BACKWARD_KERNELS[node["kernel"]], node
    # Without the decomposition for the CPU (slimops' setting): opaque ops, C++ kernels,
    # the same gradients as eager.
    cpu_forward, cpu_backward = result["graphs"]["cpu"]
    assert cpu_forward == [{"op": f"slimops::{op}"}
                           for op in ("conv2d", "depthwise_conv2d", "batch_norm_act", "linear")]
    assert all("op" in node for node in cpu_backward)
    assert result["cpu_matches_eager"]
