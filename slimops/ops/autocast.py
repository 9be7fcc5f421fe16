"""Autocast (automatic mixed precision) for the slimops ops: under
``torch.autocast("cuda", dtype=torch.float16 | torch.bfloat16)`` the forward ops run their
float16 / bfloat16 kernels instead of silently staying in float32.

For each forward op an ``AutocastCUDA`` kernel (``torch.library.Library.impl``) casts the
floating-point tensor arguments on the autocast device to the *current* autocast dtype
(``torch.get_autocast_dtype``; float64 tensors are left alone, as native autocast does),
then calls the op again with the autocast key excluded, so the Autograd kernel records the
casts (gradients reach float32 parameters in float32) and the CUDA kernel runs in the low
precision. Ops without an autocast kernel fall through (autocast's default).

Per op, and why (the schemas are in ``csrc/ops.cpp``; every op's contract, checked by
``csrc/arg_checks.h`` and the Python entry points, is that *all* its tensor arguments share
the input's dtype, so no argument can stay float32 while the input is cast):

* ``conv2d``, ``depthwise_conv2d``, ``linear``: every floating tensor is cast: input,
  weight and bias, as ``F.conv2d`` / ``F.linear`` are on autocast's lower-precision list,
  and the fused epilogue's ``scale`` / ``shift`` / ``residual`` with them. The kernels
  accumulate in float32 whatever the storage dtype.
* ``batch_norm_act`` (and the fused training ops ``conv2d_bn_act_train`` /
  ``depthwise_conv2d_bn_act_train``): cast as above: the input (already low precision when
  a cast conv produced it), γ/β and, in eval, the running statistics; the kernels compute
  the statistics and the normalisation in float32 and return ``mean``/``var`` in float32
  for a float16/bfloat16 input (``slimops.reference.stats_dtype``), which the autograd
  graph (below this kernel) saves for the backward and the caller folds into the float32
  running buffers. ``statistics_as_float32`` (the policy's indices) is kept as a guard: it
  upcasts only a float16/bfloat16 statistic, which no implementation returns now.
* Not registered, on purpose: the backward ops (``*_backward*``, ``epilogue_backward``).
  Autograd calls them with the dtypes the forward saved; casting them would break the
  contract that gradients have their inputs' dtype.

The CPU is not registered: the C++ CPU kernels implement float32 and float64 only, so
under ``torch.autocast("cpu", dtype=torch.bfloat16)`` slimops' ops keep running in float32
(their outputs are float32; stock layers around them still autocast). ``register("cpu")``
exists for tests, which route the ops to the Triton kernels under the interpreter.

Costs: each call casts the *full* shared weight (the op reads a prefix of it), once per
call, as ``torch.library.register_autocast`` does; native autocast caches weight casts
within an autocast region, this does not. For inference, ``model.half()`` avoids the casts.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

# op -> indices of its outputs that are batch statistics, returned as float32 under
# autocast (the kernels already return them so; see the module docstring). Every floating
# tensor input of these ops is cast.
POLICIES: Dict[str, Tuple[int, ...]] = {
    "conv2d": (),
    "depthwise_conv2d": (),
    "linear": (),
    "batch_norm_act": (1, 2),  # (out, mean, var)
    "conv2d_bn_act_train": (2, 3),  # (out, z, mean, var)
    "depthwise_conv2d_bn_act_train": (2, 3),
}

LOW_PRECISION = (torch.float16, torch.bfloat16)

# device type -> (the Library holding its autocast kernels, the ops registered there).
_libraries: Dict[str, Tuple[Any, Tuple[str, ...]]] = {}


def cast_arg(value: Any, device_type: str, dtype: torch.dtype) -> Any:
    """``value`` as autocast passes it on: a floating-point tensor on ``device_type`` that is
    not float64 becomes ``dtype``; anything else (None, ints, floats, float64 or integer
    tensors, tensors on another device) is returned as it is. Lists and tuples are cast
    element-wise."""
    if isinstance(value, Tensor):
        if (value.is_floating_point() and value.device.type == device_type
                and value.dtype != torch.float64 and value.dtype != dtype):
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_arg(v, device_type, dtype) for v in value)
    return value


def statistics_as_float32(out: Any, stats: Sequence[int]) -> Any:
    """``out`` (an op's result) with the outputs at the indices ``stats`` upcast from
    float16 / bfloat16 to float32 (others, and float32 / float64 statistics, untouched)."""
    if not stats:
        return out
    items = list(out)
    for i in stats:
        if items[i].dtype in LOW_PRECISION:
            items[i] = items[i].float()
    return tuple(items)


def _autocast_key(device_type: str) -> "torch._C.DispatchKey":
    """The dispatch key of autocast on ``device_type`` (``"cuda"``: ``AutocastCUDA``)."""
    name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    return getattr(torch._C.DispatchKey, name)


def make_kernel(op: Callable[..., Any], device_type: str,
                stats: Sequence[int]) -> Callable[..., Any]:
    """The autocast kernel of ``op`` (an ``OpOverload``) for ``device_type``: cast the
    arguments (``cast_arg``) to the autocast dtype current at the call, call ``op`` with
    this device's autocast key excluded, return the statistics ``stats`` as float32."""
    exclude = torch._C.DispatchKeySet(_autocast_key(device_type))

    def kernel(_keyset: Any, *args: Any) -> Any:
        dtype = torch.get_autocast_dtype(device_type)
        cast = [cast_arg(a, device_type, dtype) for a in args]
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            out = op(*cast)
        return statistics_as_float32(out, stats)

    kernel.__name__ = f"autocast_{device_type}_{op.__name__.split('.')[0]}"
    return kernel


def register(device_type: str = "cuda", namespace: str = "slimops") -> Dict[str, bool]:
    """Register the autocast kernels of the ops in ``POLICIES`` for ``device_type``.

    Idempotent. Ops that are not defined (no compiled extension; the fused training ops
    are defined from Python) are skipped. Returns ``{op: registered}``. No GPU is needed:
    the ``AutocastCUDA`` key exists in every torch build.
    """
    if device_type in _libraries:
        ops = _libraries[device_type][1]
        return {op: op in ops for op in POLICIES}
    key = _autocast_key(device_type).name
    lib = torch.library.Library(namespace, "IMPL")
    done: Dict[str, bool] = {}
    for op_name, stats in POLICIES.items():
        op = _overload(namespace, op_name)
        done[op_name] = op is not None
        if op is not None:
            # A dispatcher kernel only (no OpOverload.py_impl): the Python dispatcher used
            # while tracing (torch.compile) falls back to it, and destroying the Library
            # removes it again (unregister).
            lib.impl(op_name, make_kernel(op, device_type, stats), key, with_keyset=True)
    _libraries[device_type] = (lib, tuple(op for op, ok in done.items() if ok))
    return done


def unregister(device_type: str) -> None:
    """Remove the autocast kernels registered for ``device_type`` (tests register "cpu")."""
    entry = _libraries.pop(device_type, None)
    if entry is not None:
        entry[0]._destroy()


def registered(device_type: str) -> Tuple[str, ...]:
    """The ops with an autocast kernel for ``device_type`` (empty when none)."""
    entry = _libraries.get(device_type)
    return entry[1] if entry is not None else ()


def casts(x: Tensor) -> bool:
    """True when the ops, called now on ``x``'s device, cast their arguments to the autocast
    dtype: autocast is enabled for that device type and slimops registered its kernels
    there. The layers (``slimops.nn``) then accept a low-precision input with float32
    parameters, as stock layers do under autocast."""
    device_type = x.device.type
    return device_type in _libraries and torch.is_autocast_enabled(device_type)


AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtypes_match(x: Tensor, param: Tensor) -> bool:
    """True when an op may take input ``x`` with the parameter ``param``: the same dtype, or,
    where autocast casts the ops' arguments now (``casts``), any mix of float32, float16 and
    bfloat16 (the autocast kernel casts both to the autocast dtype). The layers
    (``slimops.nn``) check their input with it: under autocast a float16 activation meets
    float32 parameters, as it does in stock layers."""
    if x.dtype == param.dtype:
        return True
    return x.dtype in AUTOCAST_DTYPES and param.dtype in AUTOCAST_DTYPES and casts(x)


def _overload(namespace: str, op_name: str) -> Optional[Any]:
    """``torch.ops.<namespace>.<op_name>.default``, or None when the op is not defined."""
    try:
        return getattr(getattr(torch.ops, namespace), op_name).default
    except (AttributeError, RuntimeError):
        return None


__all__ = ["AUTOCAST_DTYPES", "POLICIES", "cast_arg", "casts", "dtypes_match", "make_kernel",
           "register", "registered", "statistics_as_float32", "unregister"]
