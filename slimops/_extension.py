"""Whether the compiled extension ``slimops._C`` is loaded: decided once, here, for the package.

Base layer, so that both its readers sit above it: the op layer's backend choice
(``slimops.ops._backend``) and the width state's model walk (``slimops.width``). Importing
``slimops._C`` runs its static ``TORCH_LIBRARY`` registrations, which define the
``torch.ops.slimops.*`` ops. Without it (not built, built against another torch, or
``SLIMOPS_DISABLE_C=1``) the package still works on pure Python and PyTorch, with one warning.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Optional

ERROR: Optional[str] = None

if os.environ.get("SLIMOPS_DISABLE_C") == "1":
    LOADED = False
    ERROR = "disabled by SLIMOPS_DISABLE_C=1"
else:
    try:
        importlib.import_module("slimops._C")
        LOADED = True
    except ImportError as exc:  # not built, or an ABI mismatch with the installed torch
        LOADED = False
        ERROR = str(exc)
        warnings.warn(
            "slimops: the compiled extension slimops._C is not available "
            f"({exc}); running on the pure-PyTorch reference path. Build it with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )


def entry(name: str) -> Optional[Callable[..., object]]:
    """``slimops._C``'s Python-callable ``name`` (csrc/python_module.cpp), or None without the
    extension (or in an extension built before ``name`` existed)."""
    if not LOADED:
        return None
    return getattr(importlib.import_module("slimops._C"), name, None)


__all__ = ["ERROR", "LOADED", "entry"]
