"""Triton GPU kernels of the slimops ops (installed as ``slimops.kernels``).

One module per op family, each with ``@triton.jit`` kernels, launchers whose arguments mirror
the op schemas in ``csrc/ops.cpp`` (so they register as the ops' CUDA implementation), its
tuning configurations, and ``aot_cases()`` for the ahead-of-time compile check
(``slimops.kernels._aot``). Importing this package does not import triton; the modules do.

Verified without a GPU: every kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors against
``slimops.reference`` (tests/kernels/), and every tuning configuration compiles for sm_80 and
sm_90 with no register spills (tests/kernels/test_aot.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import List

from slimops.op_families import OP_FAMILIES

# One module per op family (slimops.op_families), in its order.
KERNEL_MODULE_NAMES = tuple(OP_FAMILIES)


def available() -> bool:
    """True when triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def kernel_modules() -> List[ModuleType]:
    """The kernel modules (imports triton)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in KERNEL_MODULE_NAMES]
