"""What ``torch.compile`` hands its compiler for slimops ops on Triton: run in a process of
its own by tests/test_ops_triton_ops.py (``python tests/trace_triton_ops.py MODE``), which
reads the JSON it prints.

No GPU is needed, and none is used. The process starts *without* ``TRITON_INTERPRET``, so
``@triton.jit`` makes the kernels ``JITFunction``s, as on a GPU (under the interpreter they
are plain Python functions, which ``torch.library.wrap_triton`` cannot trace). Triton's
driver is replaced by one that only names a target (sm_90): torch's mutation analysis of a
wrapped kernel (which arguments it writes, from the kernel's TTIR) needs nothing else. The
compiler is AOTAutograd with a backend that records the forward and backward graphs it
gets (what Inductor would compile) and runs them: on fake tensors, so no kernel launches.

Modes:

* ``cuda``: a slimmable conv -> depthwise conv -> batch norm (eval) -> linear function
  on fake CUDA tensors (forward only: without a CUDA build of torch, autograd cannot record
  a CUDA leaf), once as slimops sets it up and once with the conv on the extension's CUDA
  C++ kernel (the opt-in, ``_backend.set_cuda_kernels``), which must stay one opaque op.
  Also whether ``eager_launch`` hands the launchers the bare kernel.
* ``cpu``: the same function with gradients (batch norm in training), on fake CPU
  tensors, with the decomposition enabled for the CPU (``triton_ops.decompose_on("cpu")``;
  slimops never does that itself) and ``TRITON_INTERPRET=1`` set *after* the kernels were
  defined, so the launchers' device check lets CPU tensors through while the kernels stay
  ``JITFunction``s: the forward and backward graphs. Then on real CPU tensors without
  that: the graph slimops compiles on a CPU (opaque ``slimops::`` ops, the C++ kernels),
  run and compared with eager.

Output: ``{"graphs": {name: [node, ...]}, ...}``, each node ``{"kernel": name,
"writes": [arguments torch found mutated]}`` for a Triton kernel or ``{"op": qualname}``
for a ``slimops`` op.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the interpreter"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


class TargetOnlyDriver:
    """A Triton driver that names a target and can do nothing else (no GPU here)."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(TargetOnlyDriver())

from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import slimops  # noqa: E402,F401  (registers the ops)
import slimops.kernels  # noqa: E402
from slimops.ops import _backend, triton_ops  # noqa: E402
from triton_ops_network import network  # noqa: E402  (tests/, this script's folder)


def summarize(gm: torch.fx.GraphModule) -> List[Dict[str, Any]]:
    """The graph's Triton kernels and slimops ops, in order."""
    nodes: List[Dict[str, Any]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            nodes.append({"kernel": kernel.fn.__name__,
                          "writes": list(node.kwargs["tensors_to_clone"])})
        elif isinstance(node.target, torch._ops.OpOverload) and \
                node.target.namespace == "slimops":
            nodes.append({"op": node.target.name()})
    return nodes


def compile_and_record(fn, *args):
    """``torch.compile(fn, fullgraph=True)`` through AOTAutograd, recording its graphs."""
    graphs: List[torch.fx.GraphModule] = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, graphs


def parameters(device: str, grad: bool):
    """x and the full shared weights (the network reads their prefixes), γ and β."""
    def t(*shape):
        return torch.randn(*shape, device=device, requires_grad=grad)

    return (t(2, 6, 9, 9), t(16, 4, 3, 3), t(16), t(14, 1, 3, 3), t(12), t(12), t(10, 12),
            t(10))


def running_stats(device: str):
    """The batch norm's running mean and variance (updated in place when training)."""
    return torch.zeros(12, device=device), torch.ones(12, device=device)


def run_cuda() -> Dict[str, Any]:
    result: Dict[str, Any] = {"graphs": {}}
    result["cuda_kernels"] = dict(_backend.CUDA_KERNELS)
    with FakeTensorMode():
        args = (*parameters("cuda", grad=False), *running_stats("cuda"), False)
        out, graphs = compile_and_record(network, *args)
        result["out"] = [list(out.shape), str(out.device)]
        result["graphs"]["triton"] = [summarize(g) for g in graphs]
        saved = dict(_backend.CUDA_KERNELS)
        _backend.set_cuda_kernels({**saved, "conv2d": "cuda"}, complete=True)
        try:
            _, graphs = compile_and_record(network, *args)
        finally:
            _backend.set_cuda_kernels(saved, complete=True)
        result["graphs"]["conv2d_on_cpp"] = [summarize(g) for g in graphs]
    from slimops.kernels.conv2d import _conv_forward_kernel

    with triton_ops.eager_launch():
        result["eager_launch_bare"] = (
            torch.library.wrap_triton(_conv_forward_kernel) is _conv_forward_kernel)
    result["traced_launch_wrapped"] = (
        torch.library.wrap_triton(_conv_forward_kernel) is not _conv_forward_kernel)
    return result


def run_cpu() -> Dict[str, Any]:
    result: Dict[str, Any] = {"graphs": {}}
    # The kernels are defined (JITFunctions); from here on the launchers accept CPU tensors.
    slimops.kernels.kernel_modules()
    os.environ["TRITON_INTERPRET"] = "1"

    def loss(*args):
        return network(*args, *stats, True).square().sum()

    with triton_ops.decompose_on("cpu"), FakeTensorMode():
        args, stats = parameters("cpu", grad=True), running_stats("cpu")
        out, graphs = compile_and_record(loss, *args)
        out.backward()
        result["grads"] = [list(a.grad.shape) for a in args]
        result["graphs"]["triton"] = [summarize(g) for g in graphs]
    os.environ["TRITON_INTERPRET"] = "0"
    # What a CPU model compiles to (the C++ kernels, opaque), run for real.
    args, stats = parameters("cpu", grad=True), running_stats("cpu")
    eager = torch.autograd.grad(loss(*args), args)
    out, graphs = compile_and_record(loss, *args)
    compiled = torch.autograd.grad(out, args)
    result["graphs"]["cpu"] = [summarize(g) for g in graphs]
    result["cpu_matches_eager"] = all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(eager, compiled))
    return result


if __name__ == "__main__":
    torch.manual_seed(0)
    mode = sys.argv[1]
    print(json.dumps({"cuda": run_cuda, "cpu": run_cpu}[mode]()))
