"""One walk over a model's slimmable layers, for code that swaps each for something else
(``slimops.export``: plain PyTorch modules; ``slimops.baselines``: the reference style)."""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

from torch import nn

from slimops.width import Slimmable


def map_layers(
    model: nn.Module,
    handlers: Mapping[type, Callable[[nn.Module], nn.Module]],
    unknown: Optional[str] = None,
) -> Dict[int, nn.Module]:
    """``id(layer) -> handler(layer)`` for every layer of ``model`` whose type (by
    ``isinstance``, in ``handlers``' order) has a handler, outermost first: the modules inside
    a handled layer are not visited (a fused block's conv and BN go with the block).

    Args:
        unknown: with it, a ``Slimmable`` layer no handler takes raises ``TypeError`` with
            this text and the layer's type (``None``: such layers are left alone).
    """
    out: Dict[int, nn.Module] = {}
    inside = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        handler = next((h for kind, h in handlers.items() if isinstance(m, kind)), None)
        if handler is None:
            if unknown is not None and isinstance(m, Slimmable):
                raise TypeError(f"{unknown} {type(m).__name__}")
            continue
        out[id(m)] = handler(m)
        inside.update(id(s) for s in m.modules())
    return out
