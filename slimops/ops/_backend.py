"""Which backend runs an op: the compiled kernels (``slimops._C``, and on CUDA the Triton or
CUDA C++ kernels registered for the ops) or ``slimops.reference``.

The op layer owns this decision: the op entry points (``slimops.ops.*``) ask ``use_native``,
and nothing above them reads or changes this module's state except through its functions.

Whether ``slimops._C`` loaded is decided in ``slimops._extension`` (the base layer): without
it every op falls back to ``slimops.reference``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Optional

import torch

from slimops import _extension

HAS_C = _extension.LOADED
_C_ERROR: Optional[str] = _extension.ERROR


def direct_entry(name: str) -> Optional[Callable[..., object]]:
    """``slimops._C``'s direct Python entry of op ``name`` (csrc/python_module.cpp), or None
    without the extension (also its one helper that is not an op, ``state_stamp``). It takes
    the op schema's arguments positionally in their plain forms (tensors, None, ints, two-int
    lists, floats) and calls the op's typed dispatcher handle, ~10 us per call less than
    ``torch.ops.slimops.<name>``'s boxed call; for anything else (a tensor subclass, an
    active ``__torch_function__`` mode) it returns ``NotImplemented`` and the caller calls
    ``torch.ops``. Callers skip it while torch.compile traces (the graph records
    ``torch.ops``)."""
    return _extension.entry(name)


def native_call(name: str) -> Callable[..., object]:
    """The op layer's call of compiled op ``name`` (positional schema arguments): its direct
    entry, or ``torch.ops.slimops.<name>`` where that returns ``NotImplemented`` and while
    torch.compile traces. Only for callers that ``use_native`` sent to the extension."""
    direct = direct_entry(name)
    is_compiling = torch.compiler.is_compiling

    def call(*args: object) -> object:
        if direct is not None and not is_compiling():
            out = direct(*args)
            if out is not NotImplemented:
                return out
        return getattr(torch.ops.slimops, name).default(*args)

    call.__name__ = f"slimops_{name}"
    return call


def cpu_kernel_call(name: str) -> Callable[..., Optional[object]]:
    """A call of compiled op ``name`` (positional schema arguments, input and weight first)
    on the C++ CPU kernel that returns None instead of raising: None where that kernel does
    not run (no extension, torch.compile tracing, a non-CPU input, a dtype or weight layout
    ``use_native`` sends to the reference, a tensor subclass or mode) or where it rejected an
    argument.

    Why: the CPU kernels check every argument they read (csrc/arg_checks.h: vector lengths, a
    residual's shape, dtype and device, channel counts against the weight), so a per-call
    inference path (``SlimConvBNAct``) can skip its own Python checks of them and, on None,
    take its checked path, which names what is wrong with the layer's words (or runs the
    reference). Not for CUDA: the Triton launchers leave some of these checks to the layer.
    The caller checks what a kernel cannot know (the active width's input channel count)."""
    direct = direct_entry(name)
    is_compiling = torch.compiler.is_compiling

    def call(input: torch.Tensor, weight: torch.Tensor, *rest: object) -> Optional[object]:
        if (direct is None or is_compiling() or not input.is_cpu
                or not use_native(input, weight)):
            return None
        try:
            out = direct(input, weight, *rest)
        except (RuntimeError, ValueError, TypeError, IndexError):
            return None  # the caller's checked path raises it again, in its own words
        return None if out is NotImplemented else out

    call.__name__ = f"slimops_{name}_cpu_kernel"
    return call


# dtypes the C++ CPU kernels implement; other floating dtypes run on the reference path.
NATIVE_CPU_DTYPES = (torch.float32, torch.float64)
# dtypes the GPU kernels (Triton, fp32 accumulation) implement; float64 on CUDA runs on
# the reference path.
NATIVE_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The CUDA implementation the ops run by default: "triton" (slimops.kernels), one for every
# op. The extension's own CUDA C++ kernels (csrc/cuda, compiled only when nvcc and a GPU were
# present at build time) cover some ops only and have not been measured on a GPU, so they
# run only when asked for: SLIMOPS_CUDA_KERNELS=cuda at import, or
# slimops.ops.use_cuda_cpp_kernels(True). Read through cuda_cpp_preferred().
CUDA_KERNEL_CHOICES = ("triton", "cuda")
_cuda_choice = os.environ.get("SLIMOPS_CUDA_KERNELS", "").strip().lower() or "triton"
if _cuda_choice not in CUDA_KERNEL_CHOICES:
    warnings.warn(
        f"slimops: SLIMOPS_CUDA_KERNELS={_cuda_choice!r} is not one of "
        f"{CUDA_KERNEL_CHOICES}; using the Triton kernels",
        RuntimeWarning,
        stacklevel=2,
    )
    _cuda_choice = "triton"
CUDA_CPP_PREFERRED = _cuda_choice == "cuda"


def cuda_cpp_preferred() -> bool:
    """True when the extension's CUDA C++ kernels are to run where they exist (the opt-in);
    False (the default) when every op runs its Triton kernel."""
    return CUDA_CPP_PREFERRED


def set_cuda_cpp_preferred(preferred: bool) -> None:
    """Record the CUDA implementation choice (``slimops.ops.cuda_registration`` applies it)."""
    global CUDA_CPP_PREFERRED
    CUDA_CPP_PREFERRED = bool(preferred)


# {op: "triton" | "cuda"}: the ops with a CUDA kernel, recorded by
# slimops.ops.cuda_registration.register() through set_cuda_kernels: which implementation
# the dispatcher runs for each op (the Triton kernel, or the extension's own when opted in).
CUDA_KERNELS: Dict[str, str] = {}
# True when every op has one (only then do CUDA tensors leave the reference path).
CUDA_READY = False


def set_cuda_kernels(kernels: Dict[str, str], complete: bool) -> None:
    """Record which ops have a CUDA kernel (``{op: "triton" | "cuda"}``); CUDA tensors run on
    them only when ``complete`` (every op has one)."""
    global CUDA_READY
    CUDA_KERNELS.clear()
    CUDA_KERNELS.update(kernels)
    CUDA_READY = bool(complete)


def cuda_ready() -> bool:
    """True when CUDA tensors run on compiled kernels (every op has a CUDA kernel)."""
    return CUDA_READY


_warned_layout = False


def use_native(x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> bool:
    """True when an op on input ``x`` with shared ``weight`` runs on a compiled kernel.

    The kernels need a contiguous full weight: then every channel prefix is a strided matrix
    a GEMM reads in place. A weight in another layout (e.g. after
    ``model.to(memory_format=torch.channels_last)``) runs on the reference path, with a
    one-time warning.
    """
    if not HAS_C:
        return False
    # is_cpu / is_cuda: reading x.device builds a device object (~0.2 us each), and this
    # runs on every op call, twice per layer in a batch-1 eval of small images.
    if x.is_cpu:
        if x.dtype not in NATIVE_CPU_DTYPES:
            return False
    elif x.is_cuda:
        if not CUDA_READY or x.dtype not in NATIVE_CUDA_DTYPES:
            return False
    else:
        return False
    if weight is not None and not weight.is_contiguous():
        global _warned_layout
        if not _warned_layout:
            _warned_layout = True
            warnings.warn(
                "slimops: a shared weight is not contiguous (channels_last or transposed); its "
                "channel prefixes are not strided matrices, so the op runs on the reference "
                "path, which copies them. Keep slimmable weights contiguous for the copy-free "
                "kernels.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


def _cuda_kernel_names() -> str:
    return "+".join(sorted(set(CUDA_KERNELS.values())))


def backend_info() -> Dict[str, object]:
    """Report which backends are active.

    Returns a dict with ``"cpu"`` (``"C++"`` when ``slimops._C`` is loaded, else
    ``"reference"``), ``"cuda"`` (the GPU path for CUDA tensors: ``"triton"``
    (``slimops.kernels``, the default), ``"cuda+triton"`` (the extension's own CUDA C++
    kernels where it has them, Triton for the rest: only with the opt-in,
    ``slimops.ops.use_cuda_cpp_kernels``), ``"reference"`` when the ops have no CUDA
    kernels, or ``"unavailable"`` without a GPU), ``"cuda_kernels"``
    (the CUDA kernels the dispatcher runs, GPU or not, e.g. ``"triton"``; None when none),
    ``"extension_error"`` (why ``_C`` did not load, or None),
    ``"native_dtypes"``, ``"cpu_isa"`` (the vector instruction set the C++ kernels'
    hot loops use: ``"avx512"``, ``"avx2"`` or ``"base"``; capped by the environment
    variable ``SLIMOPS_CPU_ISA``), ``"conv_route"`` (how the C++ conv passes choose between
    slimops' kernels and oneDNN: ``"auto"``, measured per shape, ``"fixed"`` or ``"onednn"``,
    from ``SLIMOPS_CONV_ROUTE``; None without the extension), ``"conv_routes_measured"``
    (``{"onednn": n, "kernels": m}``: the conv passes measured so far in this process and
    where each went), ``"load_policy"`` (the load watch's policy, ``slimops.ops.load_watch``:
    ``"adaptive"``, ``"off"`` or ``"serial"``; None without the extension) and the torch
    version.
    """
    from slimops.ops.load_watch import load_watch  # imports this module

    routes = torch.ops.slimops.conv2d_routes(False) if HAS_C else None
    return {
        "cpu": "C++" if HAS_C else "reference",
        "cpu_isa": torch.ops.slimops.cpu_isa() if HAS_C else None,
        "conv_route": (os.environ.get("SLIMOPS_CONV_ROUTE") or "auto") if HAS_C else None,
        "conv_routes_measured": {"onednn": routes[0], "kernels": routes[1]} if HAS_C else None,
        "cuda": (_cuda_kernel_names() if CUDA_READY else "reference")
        if torch.cuda.is_available() else "unavailable",
        "cuda_kernels": _cuda_kernel_names() or None,
        "extension_error": _C_ERROR,
        "load_policy": load_watch()["policy"],
        "native_dtypes": [str(d).replace("torch.", "") for d in NATIVE_CPU_DTYPES],
        "torch": torch.__version__,
    }
