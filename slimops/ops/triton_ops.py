"""The Triton kernels as ``torch.library.triton_op``s, so ``torch.compile`` sees them.

The ops' schemas live in C++ (``slimops::<op>``, ``csrc/ops.cpp``), with C++ autograd
formulas (``csrc/autograd/``); their CUDA implementation is a Python launcher
(``slimops.kernels.<family>.<op>``, registered by ``slimops.ops.cuda_registration``). To
the compiler such an op is opaque: Inductor would emit a call of ``slimops::conv2d`` and the
launcher would run as at eager time, a black box to it. This module makes the kernels
visible without touching the C++ ops:

* For each op of ``TRITON_OPS`` (every op of ``slimops.op_families`` that returns
  tensors) a ``triton_op`` ``slimops_triton::<op>`` with the same arguments (built from the
  C++ schema, so the two cannot drift apart) whose body is the launcher. The launchers
  start their kernels through ``torch.library.wrap_triton``, so when the body is traced
  (AOTAutograd decomposes a ``triton_op`` under its functional mode) each launch becomes a
  ``triton_kernel_wrapper_functional`` node carrying the ``@triton.jit`` function, its
  grid and its constexprs: Inductor compiles and launches that kernel from its generated
  code, next to its own. Eagerly, a ``triton_op`` runs its body with the wrapping switched
  off: a plain kernel launch.
* For each ``slimops::<op>`` a rule for ``FunctionalTensorMode`` (the mode AOTAutograd
  traces under: ``torch.library.register_torch_dispatch``, the hook ``triton_op`` uses for
  itself) that, for CUDA tensors whose op runs on Triton
  (``slimops.ops._backend.CUDA_KERNELS``), calls ``slimops_triton::<op>`` instead, so it
  decomposes in turn. Autograd is untouched: the C++ Autograd kernel of ``slimops::<op>``
  runs above that mode and calls the backward ops, which decompose the same way. On the
  CPU, for ops running the extension's CUDA C++ kernels (the opt-in), and under
  ``torch.export`` (which keeps ``triton_op``s as custom ops, see
  ``torch.export._trace.custom_triton_ops_decomposition_disabled``), the rule stands aside
  and ``slimops::<op>`` stays one opaque node, as before.

Why a rule on the op, not the CUDA kernel calling the ``triton_op``: while AOTAutograd
traces, the ops answer with their fake kernels; the CUDA kernel never runs, so nothing in
it can reach the graph. The op has to be decomposed above the backend keys, at the
functional mode, which is what the rule does. The fused training ops
(``conv2d_bn_act_train``, ``depthwise_conv2d_bn_act_train``: Python custom ops) are not
covered and stay opaque.

The CUDA implementation of ``slimops::<op>`` (eager) stays the launcher itself
(``cuda_registration``), under ``eager_launch``: one dispatch, no higher-order op.

Importing this module imports neither triton nor the kernels: ``triton_op(op)`` does, when
it first defines the op (the rules call it at the first traced CUDA call).

Checked without a GPU only (tests/test_ops_triton_ops.py, tests/trace_triton_ops.py): the
``triton_op``s under ``TRITON_INTERPRET=1`` on CPU tensors against the C++ CPU ops on every
call of a small network's forward and backward, ``torch.library.opcheck``'s schema test,
and, in a process without the interpreter, the graphs AOTAutograd hands its compiler under
``torch.compile(fullgraph=True)``. Nothing here has run on a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from slimops.op_families import FAMILY_OF, IN_PLACE_OPS

def eager_launch() -> ContextManager[None]:
    """Within the block, the launchers' ``torch.library.wrap_triton(kernel)`` is the bare
    kernel: a plain launch, no higher-order op (which would only cost time on real tensors).
    This is what ``triton_op`` does around its own eager calls; the CUDA kernels of the
    ``slimops::`` ops (``cuda_registration``) and the fused training ops' CUDA kernels
    (``conv2d_bn_act``) launch under it. The switch is torch's
    ``torch._library.triton.set_wrap_triton_enabled`` (private); on a torch without it the
    launch still works, through the higher-order op's eager kernel."""
    switch = getattr(getattr(torch._library, "triton", None), "set_wrap_triton_enabled", None)
    return switch(False) if switch is not None else contextlib.nullcontext()


# The namespace of the triton_ops (a namespace of their own: ``slimops`` is the C++ one).
NAMESPACE = "slimops_triton"

# The ops whose launchers start every kernel through ``torch.library.wrap_triton`` and
# return fresh tensors (a custom op's outputs must not alias its inputs): each gets a
# triton_op and the decomposition rule.
# Every op of ``slimops.op_families`` but the in-place ones (``IN_PLACE_OPS``: the running
# statistics' update, which the op layer leaves to aten's in-place ops while compiling). The
# fused training ops ``conv2d_bn_act_train`` are Python custom ops with no C++ schema: they
# stay opaque, see docs/GPU_KERNELS.md.
TRITON_OPS: Tuple[str, ...] = tuple(op for op in FAMILY_OF if op not in IN_PLACE_OPS)

# Schema argument types (``str`` of a ``torch._C`` type) -> the annotations
# ``torch.library`` infers them back from.
_ANNOTATIONS: Dict[str, Any] = {
    "Tensor": Tensor,
    "Optional[Tensor]": Optional[Tensor],
    "int": int,
    "List[int]": List[int],
    "float": float,
    "bool": bool,
}


def _signature(schema: "torch._C.FunctionSchema") -> inspect.Signature:
    """The Python signature ``torch.library``'s schema inference turns back into
    ``schema``'s arguments and returns (``int[2]`` becomes ``int[]``: the length is the
    C++ op's check, which the launcher repeats)."""
    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=_ANNOTATIONS[str(a.type)])
              for a in schema.arguments]
    returns = [str(r.type) for r in schema.returns]
    if returns == ["Tensor"]:
        ret: Any = Tensor
    elif returns and set(returns) == {"Tensor"}:
        ret = Tuple[tuple([Tensor] * len(returns))]
    else:
        raise TypeError(f"slimops.ops.triton_ops: unsupported returns {returns} of {schema}")
    return inspect.Signature(params, return_annotation=ret)


def _launcher(op: str) -> Callable[..., Any]:
    """The launcher of ``op`` (``slimops.kernels.<family>.<op>``)."""
    module = importlib.import_module(f"slimops.kernels.{FAMILY_OF[op]}")
    return getattr(module, op)


def _define(op: str) -> Any:
    """Define ``slimops_triton::<op>``: a triton_op with the arguments of ``slimops::<op>``
    whose body is the launcher."""
    launcher = _launcher(op)
    schema = getattr(torch.ops.slimops, op).default._schema

    def body(*args: Any, **kwargs: Any) -> Any:
        return launcher(*args, **kwargs)

    body.__signature__ = _signature(schema)  # type: ignore[attr-defined]
    body.__name__ = body.__qualname__ = op
    body.__doc__ = f"``{schema}`` on the Triton kernels (``{launcher.__module__}.{op}``)."
    return torch.library.triton_op(f"{NAMESPACE}::{op}", body, mutates_args=())


# op -> its triton_op (a CustomOpDef), defined once, at the first ``triton_op(op)``.
_DEFINED: Dict[str, Any] = {}


def triton_op(op: str) -> Any:
    """The triton_op ``slimops_triton::<op>`` (defining it at the first call; imports triton
    and the op's kernel module). Call it like ``torch.ops.slimops.<op>``."""
    if op not in TRITON_OPS:
        raise KeyError(f"slimops.ops.triton_ops: {op!r} has no triton_op; "
                       f"those that do: {TRITON_OPS}")
    if op not in _DEFINED:
        _DEFINED[op] = _define(op)
    return _DEFINED[op]


def define_all() -> Dict[str, Any]:
    """Define every triton_op of ``TRITON_OPS``; returns ``{op: triton_op}``."""
    return {op: triton_op(op) for op in TRITON_OPS}


# ---------------------------------------------------------------------------------------
# slimops::<op> -> slimops_triton::<op> while AOTAutograd traces

# Device types whose tensors decompose (the op's Triton kernel is its implementation there).
# Tests add "cpu" to trace on fake CPU tensors; slimops itself only ever decomposes CUDA.
DECOMPOSE_DEVICES = {"cuda"}

# The Library holding the rules (None until ``register_decompositions``).
_rules: Optional[torch.library.Library] = None


def _decomposes(op: str, args: Tuple[Any, ...]) -> bool:
    """Whether this call of ``slimops::<op>`` becomes its triton_op: a tensor input on a
    device of ``DECOMPOSE_DEVICES`` whose implementation there is Triton, and not under
    ``torch.export`` (it keeps custom ops whole)."""
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    from slimops.ops import _backend

    first = next((a for a in args if isinstance(a, Tensor)), None)
    if first is None or first.device.type not in DECOMPOSE_DEVICES:
        return False
    if first.device.type == "cuda" and _backend.CUDA_KERNELS.get(op) != "triton":
        return False  # the extension's C++ CUDA kernel (opt-in): stays opaque
    return not custom_triton_ops_decomposition_disabled()


def _rule(op: str) -> Callable[..., Any]:
    """The ``FunctionalTensorMode`` rule of ``slimops::<op>``."""

    def rule(mode: Any, func: Any, types: Any, args: Tuple[Any, ...],
             kwargs: Dict[str, Any]) -> Any:
        if not _decomposes(op, args):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode:  # the triton_op's own rule decomposes it into its kernels
            return triton_op(op)(*args, **kwargs)

    rule.__name__ = f"decompose_{op}"
    return rule


def register_decompositions() -> bool:
    """Register the rules (idempotent; imports neither triton nor the kernels). Returns
    False without the compiled extension (no ``slimops::`` ops to decompose)."""
    global _rules
    from slimops.ops import _backend

    if not _backend.HAS_C:
        return False
    if _rules is None:
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        lib = torch.library.Library("slimops", "FRAGMENT")
        for op in TRITON_OPS:
            torch.library.register_torch_dispatch(f"slimops::{op}", FunctionalTensorMode,
                                                  _rule(op), lib=lib)
        _rules = lib
    return True


def unregister_decompositions() -> None:
    """Remove the rules: ``slimops::<op>`` is one opaque node under ``torch.compile`` again."""
    global _rules
    if _rules is not None:
        _rules._destroy()
        _rules = None


@contextlib.contextmanager
def decompose_on(*device_types: str) -> Iterator[None]:
    """Within the block, calls on ``device_types`` decompose too (tests: ``"cpu"``)."""
    added = set(device_types) - DECOMPOSE_DEVICES
    DECOMPOSE_DEVICES.update(added)
    try:
        yield
    finally:
        DECOMPOSE_DEVICES.difference_update(added)


__all__ = ["DECOMPOSE_DEVICES", "NAMESPACE", "TRITON_OPS", "decompose_on", "define_all",
           "eager_launch", "register_decompositions", "triton_op", "unregister_decompositions"]
