"""Which backends are active: the compiled CPU kernels (``slimops._C``) or the reference.

Importing ``slimops._C`` runs its static ``TORCH_LIBRARY`` registrations, which define the
``torch.ops.slimops.*`` ops. Without it (not built, or built against another torch) the
package still works: every op falls back to ``slimops.reference``, with one warning.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Dict, Optional

import torch

_C_ERROR: Optional[str] = None

if os.environ.get("SLIMOPS_DISABLE_C") == "1":
    HAS_C = False
    _C_ERROR = "disabled by SLIMOPS_DISABLE_C=1"
else:
    try:
        importlib.import_module("slimops._C")
        HAS_C = True
    except ImportError as exc:  # not built, or an ABI mismatch with the installed torch
        HAS_C = False
        _C_ERROR = str(exc)
        warnings.warn(
            "slimops: the compiled extension slimops._C is not available "
            f"({exc}); running on the pure-PyTorch reference path. Build it with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )

# dtypes the C++ CPU kernels implement; other floating dtypes run on the reference path.
NATIVE_CPU_DTYPES = (torch.float32, torch.float64)


_warned_layout = False


def use_native(x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> bool:
    """True when an op on input ``x`` with shared ``weight`` runs on a compiled kernel.

    The kernels need a contiguous full weight: then every channel prefix is a strided matrix
    a GEMM reads in place. A weight in another layout (e.g. after
    ``model.to(memory_format=torch.channels_last)``) runs on the reference path, with a
    one-time warning.
    """
    if not (HAS_C and x.device.type == "cpu" and x.dtype in NATIVE_CPU_DTYPES):
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


def backend_info() -> Dict[str, object]:
    """Report which backends are active.

    Returns a dict with ``"cpu"`` (``"C++"`` when ``slimops._C`` is loaded, else
    ``"reference"``), ``"cuda"`` (the GPU path: ``"reference"`` until GPU kernels land, or
    ``"unavailable"`` without CUDA), ``"extension_error"`` (why ``_C`` did not load, or None),
    ``"native_dtypes"``, ``"cpu_isa"`` (the vector instruction set the C++ kernels'
    hot loops use: ``"avx512"``, ``"avx2"`` or ``"base"``; capped by the environment
    variable ``SLIMOPS_CPU_ISA``) and the torch version.
    """
    return {
        "cpu": "C++" if HAS_C else "reference",
        "cpu_isa": torch.ops.slimops.cpu_isa() if HAS_C else None,
        "cuda": "reference" if torch.cuda.is_available() else "unavailable",
        "extension_error": _C_ERROR,
        "native_dtypes": [str(d).replace("torch.", "") for d in NATIVE_CPU_DTYPES],
        "torch": torch.__version__,
    }
