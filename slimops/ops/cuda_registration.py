"""The ops' CUDA implementation: one per op, the Triton kernels of ``slimops.kernels`` by
default; the extension's own CUDA C++ kernels only when asked for.

Each ``slimops::<op>`` gets, for the CUDA dispatch key, the launcher of the same name in
``slimops.kernels.<family>`` (their arguments mirror the schemas in ``csrc/ops.cpp``). The
fakes (``slimops.ops.<family>``) and autograd formulas (``csrc/autograd/``, which call the
ops through the dispatcher) are device-independent,
so ``SlimmableConv2d`` on a CUDA tensor runs forward and backward on these kernels.

Why Triton by default: every op has a Triton kernel, and the fused training ops
(``slimops.ops.conv2d_bn_act``) run the Triton depthwise / BN kernels in any case; the CUDA
C++ kernels (``csrc/cuda``, compiled into ``slimops._C`` only when nvcc and a GPU were
present at build time) cover six ops (depthwise, epilogue backward, batch norm) and have
not been measured against the Triton ones on a GPU. So a CUDA build no longer lets them
win silently: they run only with the opt-in, ``SLIMOPS_CUDA_KERNELS=cuda`` in the
environment at import or ``slimops.ops.use_cuda_cpp_kernels(True)`` at run time, until a
GPU measures them faster. The switch takes effect at the next call of each op.

Mechanics: a C++ ``TORCH_LIBRARY_IMPL(slimops, CUDA, ...)`` kernel is registered when
``slimops._C`` loads. Each Triton launcher lives in a ``torch.library.Library`` of its
own, registered for the CUDA key on top of it (the dispatcher runs the newest kernel of a
key); destroying that Library puts the C++ kernel back. The decision itself is
``choose``, a pure function.

Registration is cheap and lazy: it needs only that triton is installed (it is not imported
here); the first call of an op on a CUDA tensor imports the kernel module. Registering also
installs the ops' autocast kernels (``slimops.ops.autocast``) for CUDA.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, Mapping, Optional

import torch

from slimops.ops import _backend, autocast, triton_ops
from slimops import kernels
from slimops.op_families import FAMILY_OF

# op name -> its family, whose kernel module holds a launcher of the op's name.
OP_FAMILIES: Dict[str, str] = dict(FAMILY_OF)

# qualname -> the Library holding the Triton launcher registered over it (per dispatch key).
_libraries: Dict[str, object] = {}
# qualname -> whether it had a kernel of its own (the extension's) for the key before any
# Triton registration: found once, at the first registration.
_native: Dict[str, bool] = {}

OVERRIDE_WARNING = "Overriding a previously registered kernel"


def _lazy(op: str) -> Callable:
    """The Triton launcher of ``op``, importing its kernel module at the first call; the
    dispatcher runs it on real tensors only, so it launches its kernels directly
    (``triton_ops.eager_launch``)."""
    module_name = f"{kernels.__name__}.{OP_FAMILIES[op]}"

    def launch(*args):
        with triton_ops.eager_launch():
            return getattr(importlib.import_module(module_name), op)(*args)

    launch.__name__ = f"triton_{op}"
    launch.__qualname__ = launch.__name__
    return launch


def choose(has_cpp: bool, has_triton: bool, prefer_cpp: bool) -> Optional[str]:
    """Which implementation an op runs on CUDA: ``"triton"``, ``"cuda"`` (the extension's
    C++ kernel) or None (neither: the op runs on the reference path).

    Triton wherever it is installed, unless the C++ kernel exists and is asked for
    (``prefer_cpp``); the C++ kernel also when it is all there is.
    """
    if has_cpp and (prefer_cpp or not has_triton):
        return "cuda"
    return "triton" if has_triton else None


def apply(ops: Mapping[str, Callable], prefer_cpp: bool, has_triton: bool, *,
          namespace: str = "slimops", dispatch_key: str = "CUDA") -> Dict[str, str]:
    """Make the dispatcher run, for ``dispatch_key``, each op's ``choose``-n implementation:
    register the launcher ``ops[op]`` over the op's own kernel, or remove it again.

    Returns ``{op: "triton" | "cuda"}`` for the ops that have a kernel for the key.
    ``namespace`` / ``dispatch_key`` let tests run this on an op library of their own, on the
    CPU key; slimops runs it for ``slimops`` on CUDA (``register``).
    """
    found: Dict[str, str] = {}
    for op, launcher in ops.items():
        qualname = f"{namespace}::{op}"
        slot = f"{qualname}/{dispatch_key}"
        if slot not in _native:
            _native[slot] = (slot not in _libraries and
                             torch._C._dispatch_has_kernel_for_dispatch_key(qualname,
                                                                            dispatch_key))
        choice = choose(_native[slot], has_triton, prefer_cpp)
        if choice == "triton" and slot not in _libraries:
            lib = torch.library.Library(namespace, "IMPL")
            with warnings.catch_warnings():
                # Replacing the extension's kernel is the point here (torch warns once).
                warnings.filterwarnings("ignore", message=f"(?s).*{OVERRIDE_WARNING}")
                lib.impl(op, launcher, dispatch_key)
            _libraries[slot] = lib
        elif choice != "triton" and slot in _libraries:
            _libraries.pop(slot)._destroy()  # the extension's kernel runs again
        if choice is not None:
            found[op] = choice
    return found


def register() -> Dict[str, str]:
    """Give every op its one CUDA implementation (``choose``) and its CUDA autocast kernel.

    Returns (and records in ``slimops.ops._backend.CUDA_KERNELS``) ``{op: "triton" | "cuda"}``
    for every op with a CUDA kernel; empty without the compiled extension (it defines the
    ops) or with neither triton nor the extension's CUDA kernels. Idempotent; called again
    (``use_cuda_cpp_kernels``) it applies the current choice.
    """
    if not _backend.HAS_C:
        return {}
    found = apply({op: _lazy(op) for op in OP_FAMILIES}, _backend.cuda_cpp_preferred(),
                  kernels.available())
    _backend.set_cuda_kernels(found, complete=len(found) == len(OP_FAMILIES))
    autocast.register("cuda")
    if kernels.available():
        # torch.compile: the ops running on Triton decompose into their kernels
        triton_ops.register_decompositions()
    return dict(found)


def use_cuda_cpp_kernels(enabled: bool = True) -> Dict[str, str]:
    """Opt in to (``enabled=True``) or out of the extension's CUDA C++ kernels.

    With the opt-in, the ops that have a C++ CUDA kernel (compiled only when the extension
    was built with nvcc and a GPU: depthwise conv, batch norm, epilogue backward) run it;
    the others stay on Triton. Without it (the default) every op runs its Triton kernel.
    A build without C++ CUDA kernels is unaffected. The same as ``SLIMOPS_CUDA_KERNELS=cuda``
    at import. The fused training ops (``conv2d_bn_act_train``) have only a Triton
    implementation and keep it. Returns ``{op: "triton" | "cuda"}`` as ``register``.
    """
    _backend.set_cuda_cpp_preferred(enabled)
    return register()


__all__ = ["OP_FAMILIES", "apply", "choose", "register", "use_cuda_cpp_kernels"]
