"""Width state: which width a slimmable model runs at, per model and per thread.

A *width* is a float switch (e.g. ``0.5``); a model's ``widths`` is the tuple of switches its
layers were built for; ``channels(c, widths)`` turns a full channel count into per-width
counts (the rounding rules of the paper's models).

The state has two levels, so that one model instance can serve several widths at once:

* ``set_width(model, w)`` sets the *default* width of every slimmable layer in ``model`` (a
  plain attribute: visible to all threads, and what ``torch.compile`` specialises on);
* ``with width(model, w): ...`` overrides it for the current thread only, through a
  thread-local mapping of layer ids to widths. Two threads can run the same model at
  different widths at the same time, each inside its own ``width(...)`` block.

A thread-local (not a ``ContextVar``) because ``torch.compile`` can trace and guard on it:
a compiled model follows both the default and the scoped width, recompiling once per width.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from torch import nn

# `.overrides`: id(layer) -> width, for the layers of models entered with `width(...)` in
# this thread.
_LOCAL = threading.local()


def _overrides() -> Dict[int, float]:
    return getattr(_LOCAL, "overrides", None) or {}


def normalize_widths(widths: Sequence[float]) -> Tuple[float, ...]:
    """Validate a width list: non-empty, finite, positive, distinct; returned sorted ascending."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Iterable):
        raise TypeError(f"widths must be a sequence of numbers, got {widths!r}")
    widths = list(widths)
    if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in widths):
        raise TypeError(f"widths must be a sequence of numbers, got {widths!r}")
    ws = tuple(sorted(float(w) for w in widths))
    if not ws or not all(math.isfinite(w) and w > 0 for w in ws) or len(set(ws)) != len(ws):
        raise ValueError(f"widths must be distinct positive numbers, got {tuple(widths)}")
    return ws


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10%.

    The rule of the MobileNet papers (and the original slimmable networks code).
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def channels(c: int, widths: Sequence[float], divisor: Optional[int] = None) -> List[int]:
    """Per-width channel counts of a layer with ``c`` channels at full width.

    ``divisor=None`` truncates ``int(c * w)`` (ResNet, ShuffleNet); an int rounds with
    ``make_divisible`` (MobileNets use 8). Never fewer than 1 channel.
    """
    ws = normalize_widths(widths)
    if divisor is None:
        return [max(1, int(c * w)) for w in ws]
    return [make_divisible(c * w, divisor) for w in ws]


class Slimmable:
    """Mixin of every layer whose active channel counts depend on the width.

    Subclasses call ``_init_widths(widths)`` in ``__init__``; ``active_width()`` and
    ``width_index()`` resolve the width for the current thread.
    """

    widths: Tuple[float, ...]
    _width: float
    _width_index: Dict[float, int]

    def _init_widths(self, widths: Sequence[float]) -> None:
        self.widths = normalize_widths(widths)
        self._width_index = {w: i for i, w in enumerate(self.widths)}
        self._width = self.widths[-1]

    def canonical_width(self, w: float) -> float:
        """``w`` as one of ``self.widths`` (tolerating float round-off), or a clear error."""
        if w in self._width_index:
            return w
        for known in self.widths:
            if math.isclose(known, float(w), rel_tol=1e-9, abs_tol=1e-12):
                return known
        raise ValueError(
            f"{type(self).__name__}: unknown width {w!r}; this layer has widths {self.widths}"
        )

    def active_width(self) -> float:
        """The width this layer runs at in the current thread."""
        overrides = _overrides()
        if overrides:
            return overrides.get(id(self), self._width)
        return self._width

    def width_index(self) -> int:
        """Index of the active width in ``self.widths`` (and in per-width channel lists)."""
        return self._width_index[self.active_width()]


def slimmable_layers(model: nn.Module) -> List[Slimmable]:
    """Every slimmable layer in ``model`` (``model`` itself included)."""
    return [m for m in model.modules() if isinstance(m, Slimmable)]


def model_widths(model: nn.Module) -> Tuple[float, ...]:
    """The widths every slimmable layer of ``model`` supports."""
    layers = slimmable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no slimmable layers")
    common = set(layers[0].widths)
    for layer in layers[1:]:
        common &= set(layer.widths)
    return tuple(sorted(common))


def _resolve(model: nn.Module, w: float) -> List[Tuple[Slimmable, float]]:
    layers = slimmable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no slimmable layers")
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise TypeError(f"a width is a number (e.g. 0.5), got {w!r}")
    try:
        return [(layer, layer.canonical_width(w)) for layer in layers]
    except ValueError:
        raise ValueError(
            f"{type(model).__name__}: unknown width {w!r}; the model has widths "
            f"{model_widths(model)}"
        ) from None


def set_width(model: nn.Module, w: float) -> nn.Module:
    """Set the default width of every slimmable layer of ``model``; returns ``model``.

    Visible to every thread that does not override it with ``width(...)``.
    Raises ``ValueError`` listing the model's widths when ``w`` is not one of them.
    """
    for layer, canonical in _resolve(model, w):
        layer._width = canonical
    return model


def get_width(model: nn.Module) -> float:
    """The width ``model`` runs at in the current thread (all its layers agree on it)."""
    layers = slimmable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no slimmable layers")
    found = {layer.active_width() for layer in layers}
    if len(found) != 1:
        raise RuntimeError(
            f"{type(model).__name__}: its layers run at different widths {sorted(found)}"
        )
    return found.pop()


@contextlib.contextmanager
def width(model: nn.Module, w: float) -> Iterator[nn.Module]:
    """Run ``model`` at width ``w`` inside the block, in this thread only.

    Other threads (and the model's default, ``set_width``) are unaffected, so concurrent
    requests can each use their own width on one shared model. Blocks nest.
    """
    resolved = _resolve(model, w)
    previous = _overrides()
    overrides = dict(previous)
    overrides.update((id(layer), canonical) for layer, canonical in resolved)
    _LOCAL.overrides = overrides
    try:
        yield model
    finally:
        _LOCAL.overrides = previous
