"""Fast reads of a module's parameters and buffers, for the layers' per-call fast paths."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


def held(module: nn.Module, kind: str, name: str) -> Optional[Tensor]:
    """``getattr(module, name)`` for a parameter (``kind="_parameters"``) or a buffer
    (``kind="_buffers"``), read from the module's own dict where it is registered there.

    Why: ``nn.Module.__getattr__`` (the fallback that finds parameters and buffers) costs
    ~1 us per lookup, and a batch-1 eval call of a fused layer read six of them, a sixth of
    the layer's Python time on 8x8 images. A name not registered under ``kind`` (a subclass
    that makes it a property or a plain attribute) is read with ``getattr`` as before."""
    registered = module.__dict__[kind]
    return registered[name] if name in registered else getattr(module, name, None)
