"""Fast reads of a module's parameters, buffers and submodules, for the layers' per-call
fast paths."""

from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import nn


def held(module: nn.Module, kind: str, name: str) -> Any:
    """``getattr(module, name)`` for a parameter (``kind="_parameters"``), a buffer
    (``"_buffers"``) or a submodule (``"_modules"``), read from the module's own dict where it
    is registered there.

    Why: ``nn.Module.__getattr__`` (the fallback that finds parameters, buffers and
    submodules) costs ~1 us per lookup, and a batch-1 eval call of a fused layer made ten of
    them, a third of the layer's Python time on 8x8 images. A name not registered under
    ``kind`` (a subclass that makes it a property or a plain attribute) is read with
    ``getattr`` as before."""
    registered = module.__dict__[kind]
    return registered[name] if name in registered else getattr(module, name, None)


def lookup(module: nn.Module, kind: str, name: str) -> Optional[Tuple[dict, str, Any]]:
    """The ``(dict, key, value)`` triple under which ``module`` holds ``name`` now: ``kind``
    ``"_parameters"``, ``"_buffers"`` or ``"_modules"`` (where ``held`` reads it), or
    ``"__dict__"`` for a plain attribute. The value is current while ``dict[key] is value``
    (a cached plan's check, ``slimops.ops.eval_plan``). None where ``name`` is not held
    there (a property, a class attribute): such a plan cannot be checked that way."""
    registered = module.__dict__ if kind == "__dict__" else module.__dict__[kind]
    if name not in registered:
        return None
    return registered, name, registered[name]
