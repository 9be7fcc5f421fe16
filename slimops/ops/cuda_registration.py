"""The ops' CUDA implementation: the Triton kernels of ``slimops.kernels``.

Each ``slimops::<op>`` gets, for the CUDA dispatch key, the launcher of the same name in
``slimops.kernels.<family>`` (their arguments mirror the schemas in ``csrc/ops.cpp``). The
fakes (``slimops.ops.<family>``) and autograd formulas (``csrc/autograd/``, which call the
ops through the dispatcher) are device-independent,
so ``SlimmableConv2d`` on a CUDA tensor runs forward and backward on these kernels.

Registration is cheap and lazy: it needs only that triton is installed (it is not imported
here); the first call of an op on a CUDA tensor imports the kernel module. An op that
already has a CUDA kernel (the compiled extension's own ``csrc/cuda`` kernels, when it was
built with CUDA) keeps it: C++ kernels need no JIT and serve libtorch users too.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict

import torch

from slimops.ops import _backend
from slimops import kernels
from slimops.op_families import FAMILY_OF

# op name -> its family, whose kernel module holds a launcher of the op's name.
OP_FAMILIES: Dict[str, str] = dict(FAMILY_OF)

_library = None  # the torch.library.Library the Triton implementations live in
_triton_ops: set = set()  # the ops given a Triton implementation by register()


def _lazy(op: str) -> Callable:
    module_name = f"{kernels.__name__}.{OP_FAMILIES[op]}"

    def launch(*args):
        return getattr(importlib.import_module(module_name), op)(*args)

    launch.__name__ = f"triton_{op}"
    launch.__qualname__ = launch.__name__
    return launch


def register() -> Dict[str, str]:
    """Register the Triton launchers as the CUDA kernels of the ops that have none.

    Returns (and records in ``slimops.ops._backend.CUDA_KERNELS``) ``{op: "triton" | "cuda"}``
    for every op with a CUDA kernel; empty without the compiled extension (it defines the
    ops) or without triton.
    """
    global _library
    if not _backend.HAS_C:
        return {}
    found: Dict[str, str] = {}
    for op in OP_FAMILIES:
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"slimops::{op}", "CUDA"):
            found[op] = "triton" if op in _triton_ops else "cuda"
    if _library is None and kernels.available():
        _library = torch.library.Library("slimops", "IMPL")
        for op in OP_FAMILIES:
            if op not in found:
                _library.impl(op, _lazy(op), "CUDA")
                _triton_ops.add(op)
                found[op] = "triton"
    _backend.set_cuda_kernels(found, complete=len(found) == len(OP_FAMILIES))
    return dict(found)
