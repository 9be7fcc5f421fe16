"""Width state: which width a slimmable model runs at, per model and per thread.

A *width* is a float switch (e.g. ``0.5``); a model's ``widths`` is the tuple of switches its
layers were built for; ``channels(c, widths)`` turns a full channel count into per-width
counts (the rounding rules of the paper's models).

Layers built from *channel rules* (``ChannelRule``: a channel count as a function of the
width, instead of one count per listed width) also run at any width between their smallest
and largest switch (the "universally slimmable" setting of Yu & Huang, ICCV 2019: the
sandwich rule trains random widths, BN calibration gives them statistics). The listed
widths keep their switchable BN; see ``slimops.nn.SwitchableBatchNorm2d``.

The state has two levels, so that one model instance can serve several widths at once:

* ``set_width(model, w)`` sets the *default* width of every slimmable layer in ``model`` (a
  plain attribute: visible to all threads, and what ``torch.compile`` specialises on);
* ``with width(model, w): ...`` overrides it for the current thread *and* asyncio task only,
  through a ``contextvars.ContextVar`` holding a mapping of layer ids to widths. Two threads,
  or two tasks of one event loop awaiting inside their blocks, can run the same model at
  different widths at the same time, each inside its own ``width(...)`` block; leaving a
  block restores exactly the mapping it entered with (its token), whatever ran in between.

``torch.compile`` traces the variable's value and guards on it: a compiled model follows both
the default and the scoped width, recompiling once per width.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from slimops import _extension

# A width that is not one of a layer's listed switches is kept to this many decimals, so
# that 0.6 and 0.6000000001 are one width (one set of calibrated BN statistics).
WIDTH_DECIMALS = 6

# id(layer) -> (layer, width), for the layers of models entered with `width(...)` in this
# context (a thread, an asyncio task: each has its own). The mapping is never mutated, only
# replaced. The entry holds the layer itself and a lookup checks it is the same object: a
# block left in another context (a generator closed elsewhere) leaves its entries behind in
# this one, and a bare id could then match a new layer allocated at a freed layer's address.
_NO_OVERRIDES: Dict[int, Tuple["Slimmable", float]] = {}
_OVERRIDES: contextvars.ContextVar[Dict[int, Tuple["Slimmable", float]]] = contextvars.ContextVar(
    "slimops_width_overrides", default=_NO_OVERRIDES)


# The same mapping per thread, for code torch.compile traces: Dynamo cannot trace
# ContextVar.get (torch 2.13), but it traces a thread-local attribute and guards on it. Each
# `width(...)` block stores the context's mapping here on entry and exit, so a compiled model
# follows scoped widths per thread; asyncio tasks that interleave their blocks on one thread
# see each other's widths through a *compiled* model (documented in `width`).
_THREAD = threading.local()


def _overrides() -> Dict[int, Tuple["Slimmable", float]]:
    if torch.compiler.is_compiling():
        return getattr(_THREAD, "overrides", _NO_OVERRIDES)
    return _OVERRIDES.get()


def _width_of(layer: "Slimmable", overrides: Dict[int, Tuple["Slimmable", float]]) -> float:
    """``layer``'s width under ``overrides`` (a context's mapping), else its default."""
    if overrides:
        entry = overrides.get(id(layer))
        if entry is not None and entry[0] is layer:
            return entry[1]
    return layer._width


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


@dataclass(frozen=True)
class ChannelRule:
    """A layer's channel count at any width: ``multiplier * (round(c * width) // per)``.

    The rounding is the paper's models': ``divisor=None`` truncates ``int(c * w)`` (never
    below 1; ResNet, ShuffleNet), an int rounds with ``make_divisible(c * w, divisor,
    min_value)`` (MobileNets use 8). ``fixed=True`` is a count that does not slim (the
    image's 3 channels, a classifier's outputs): ``c`` at every width.

    Layers take a rule wherever they take a per-width channel list; a layer whose counts all
    come from rules (or ints) runs at any width between its smallest and largest switch.
    ``rule * k`` multiplies the count (an inverted residual's expansion), ``rule // k``
    divides it, rounding down but never below 1 (a bottleneck's middle, ``out // 4``).
    """

    c: int
    divisor: Optional[int] = None
    min_value: Optional[int] = None
    multiplier: int = 1
    fixed: bool = False
    per: int = 1

    def __post_init__(self) -> None:
        for name in ("c", "multiplier", "per"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ChannelRule.{name} must be a positive int, got {v!r}")
        if self.divisor is not None and (isinstance(self.divisor, bool)
                                         or not isinstance(self.divisor, int) or self.divisor < 1):
            raise ValueError(f"ChannelRule.divisor must be None or a positive int, got {self.divisor!r}")

    def __call__(self, w: float) -> int:
        if self.fixed:
            base = self.c
        elif self.divisor is None:
            base = max(1, int(self.c * w))
        else:
            base = make_divisible(self.c * w, self.divisor, self.min_value)
        if self.per > 1:
            base = max(1, base // self.per)
        return self.multiplier * base

    def __mul__(self, k: int) -> "ChannelRule":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            return NotImplemented
        return dataclasses.replace(self, multiplier=self.multiplier * k)

    __rmul__ = __mul__

    def __floordiv__(self, k: int) -> "ChannelRule":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or self.multiplier != 1:
            return NotImplemented
        return dataclasses.replace(self, per=self.per * k)

    def at(self, widths: Sequence[float]) -> List[int]:
        """The counts at ``widths`` (validated, ascending)."""
        return [self(w) for w in normalize_widths(widths)]


# What a layer accepts as a channel count: the same int at every width, one count per
# listed width (ascending widths), or a rule giving the count at any width.
ChannelSpec = Union[int, Sequence[int], Callable[[float], int]]


def channels(c: int, widths: Sequence[float], divisor: Optional[int] = None) -> List[int]:
    """Per-width channel counts of a layer with ``c`` channels at full width.

    ``divisor=None`` truncates ``int(c * w)`` (ResNet, ShuffleNet); an int rounds with
    ``make_divisible`` (MobileNets use 8). Never fewer than 1 channel. The same counts as
    ``ChannelRule(c, divisor).at(widths)``; pass the rule itself to a layer to let it run
    at any width in between.
    """
    return ChannelRule(c, divisor).at(widths)


class Slimmable:
    """Mixin of every layer whose active channel counts depend on the width.

    Subclasses call ``_init_widths(widths, any_width)`` in ``__init__``; ``active_width()``
    resolves the width for the current thread and ``width_index()`` its index among the
    listed widths (``None`` for a width between them, which only layers built with
    ``any_width=True`` accept).
    """

    widths: Tuple[float, ...]
    any_width: bool
    _width: float
    _width_index: Dict[float, int]

    # Whether ``slimmable_layers`` looks among this layer's submodules for more slimmable
    # layers. False for a layer whose submodules are its own plain modules
    # (``SwitchableBatchNorm2d``'s per-width BNs): every width switch and every
    # ``width(...)`` block walks the model, and on S-MobileNet v2 those BNs and their
    # containers are 312 of its 486 modules.
    walk_submodules: bool = True

    def _init_widths(self, widths: Sequence[float], any_width: bool = False) -> None:
        self.widths = normalize_widths(widths)
        self.any_width = bool(any_width)
        self._width_index = {w: i for i, w in enumerate(self.widths)}
        self._width = self.widths[-1]

    def canonical_width(self, w: float) -> float:
        """``w`` as one of ``self.widths`` (tolerating float round-off); for a layer that
        runs at any width, a width between its extremes (rounded to ``WIDTH_DECIMALS``);
        otherwise a clear error."""
        if w in self._width_index:
            return w
        # Relative 1e-6: a float32 copy of a switch (np.float32(0.35) is 0.3499999940...) is
        # that switch; no two switches of a model are that close.
        for known in self.widths:
            if math.isclose(known, float(w), rel_tol=1e-6, abs_tol=1e-12):
                return known
        lo, hi = self.widths[0], self.widths[-1]
        if self.any_width and math.isfinite(w) and lo < w < hi:
            return round(float(w), WIDTH_DECIMALS)
        allowed = f"widths {self.widths}"
        if self.any_width:
            allowed += f" (or any width between {lo} and {hi})"
        raise ValueError(f"{type(self).__name__}: unknown width {w!r}; this layer has {allowed}")

    def active_width(self) -> float:
        """The width this layer runs at in the current thread."""
        return _width_of(self, _overrides())

    def eager_width(self) -> float:
        """``active_width()`` for eager code: the caller has checked that torch.compile is not
        tracing (so the context's mapping is the one to read), which saves a layer's
        per-call inference path that check twice more."""
        return _width_of(self, _OVERRIDES.get())

    def width_index(self) -> Optional[int]:
        """Index of the active width in ``self.widths`` (and in per-width channel lists);
        ``None`` when the layer runs at a width between its listed ones."""
        return self._width_index.get(self.active_width())

    def _active_count(self, listed: Sequence[int], rule: Optional[Callable[[float], int]]) -> int:
        """A channel count at the active width: from the per-width list at a listed width,
        else from the layer's rule."""
        w = self.active_width()
        i = self._width_index.get(w)
        if i is not None:
            return listed[i]
        if rule is None:  # unreachable through set_width/width, which validate widths
            raise ValueError(f"{type(self).__name__}: width {w} is not one of {self.widths}")
        return rule(w)


def slimmable_layers(model: nn.Module) -> List[Slimmable]:
    """Every slimmable layer in ``model`` (``model`` itself included), in ``model.modules()``
    order (pre-order, each module once).

    Walked with an explicit stack over the ``_modules`` dicts: ``nn.Module.modules()`` builds
    every module's dotted name on the way, and a width switch (``set_width``,
    ``width(...)``) is a walk: on S-MobileNet v2's 486 modules 0.45 ms that way, 0.27 ms
    this way (2-core AMD EPYC Zen 3). Layers with ``walk_submodules = False`` are not looked
    inside. With the compiled extension the same walk runs in C (``slimops._C``'s
    ``slimmable_walk``: 54 -> 16 us on S-ResNet-50, 2-core Intel Xeon); this loop is its
    definition, and runs where a module's ``_modules`` is not a plain dict."""
    if _COMPILED_WALK is not None:
        layers = _COMPILED_WALK(model, Slimmable)
        if layers is not NotImplemented:
            return layers  # type: ignore[return-value]
    found: List[Slimmable] = []
    seen = set()
    stack: List[Optional[nn.Module]] = [model]
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:  # an empty child slot; a shared module
            continue
        seen.add(id(module))
        if isinstance(module, Slimmable):
            found.append(module)
            if not module.walk_submodules:
                continue
        # Reversed, so that children are popped in insertion order, as modules() visits them.
        stack.extend(reversed(module._modules.values()))
    return found


# The compiled walk (None without the extension): slimmable_layers' loop, in C.
_COMPILED_WALK: Optional[Callable[..., object]] = _extension.entry("slimmable_walk")


def model_widths(model: nn.Module, layers: Optional[List[Slimmable]] = None
                 ) -> Tuple[float, ...]:
    """The widths every slimmable layer of ``model`` supports (``layers``: the model's
    ``slimmable_layers``, when the caller has them already: a training step walks the
    module tree once)."""
    if layers is None:
        layers = slimmable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no slimmable layers")
    common = set(layers[0].widths)
    for layer in layers[1:]:
        common &= set(layer.widths)
    return tuple(sorted(common))


def width_range(model: nn.Module, layers: Optional[List[Slimmable]] = None
                ) -> Optional[Tuple[float, float]]:
    """``(smallest, largest)`` width when every slimmable layer of ``model`` runs at any
    width in between (all built from channel rules); ``None`` when some layer only runs at
    its listed widths. ``layers``: as in ``model_widths``."""
    if layers is None:
        layers = slimmable_layers(model)
    if not layers or not all(layer.any_width for layer in layers):
        return None
    lo = max(layer.widths[0] for layer in layers)
    hi = min(layer.widths[-1] for layer in layers)
    return (lo, hi) if lo < hi else None


def _resolve(model: nn.Module, w: float,
             layers: Optional[List[Slimmable]] = None) -> List[Tuple[Slimmable, float]]:
    """Every slimmable layer of ``model`` with ``w`` as its canonical width. ``layers``:
    ``slimmable_layers(model)`` when the caller already has it (walking the model is most of
    a width switch's cost; a training step switches several times)."""
    if layers is None:
        layers = slimmable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no slimmable layers")
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
        raise TypeError(f"a width is a number (e.g. 0.5), got {w!r}")
    w = float(w)  # numpy scalars of any precision, fractions, ...
    try:
        # A listed width is its own canonical form: one dict lookup per layer instead of a
        # method call (21 -> 8 us on S-ResNet-50's 107 layers, 2-core Intel Xeon).
        return [(layer, w) if w in layer._width_index else (layer, layer.canonical_width(w))
                for layer in layers]
    except ValueError:
        span = width_range(model)
        extra = f" (or any width between {span[0]} and {span[1]})" if span else ""
        raise ValueError(
            f"{type(model).__name__}: unknown width {w!r}; the model has widths "
            f"{model_widths(model)}{extra}"
        ) from None


def set_width(model: nn.Module, w: float) -> nn.Module:
    """Set the default width of every slimmable layer of ``model``; returns ``model``.

    Visible to every thread that does not override it with ``width(...)``.
    Raises ``ValueError`` listing the model's widths when ``w`` is not one of them (and,
    for a model built from channel rules, not between its smallest and largest).
    """
    for layer, canonical in _resolve(model, w):
        # A plain attribute: bypass nn.Module.__setattr__'s parameter/buffer/module checks
        # (switching walks every layer; this is most of its cost).
        layer.__dict__["_width"] = canonical
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
    """Run ``model`` at width ``w`` inside the block, in this thread and asyncio task only.

    Other threads and tasks (and the model's default, ``set_width``) are unaffected, so
    concurrent requests can each use their own width on one shared model, also across
    ``await``. Blocks nest. A generator that yields inside a block shares its caller's
    context (Python's rule): the caller sees the width while the generator is suspended there.

    A ``torch.compile``'d model reads the scoped width per thread (Dynamo cannot trace a
    ``ContextVar``): asyncio tasks of one thread that share a compiled model and interleave
    their ``width`` blocks see each other's widths; give them separate models or widths set
    with ``set_width`` between calls.
    """
    with _override(_resolve(model, w)):
        yield model


@contextlib.contextmanager
def _override(resolved: List[Tuple[Slimmable, float]]) -> Iterator[None]:
    """Run the resolved ``(layer, width)`` pairs at those widths inside the block, in this
    context only (the body of ``width``; ``slimops.train`` resolves once per step)."""
    previous = _OVERRIDES.get()
    overrides = dict(previous)
    # Each resolved pair is the entry itself (what _width_of reads), built in one
    # comprehension: 13 -> 6 us per block on S-ResNet-50.
    overrides.update({id(pair[0]): pair for pair in resolved})
    token = _OVERRIDES.set(overrides)
    _THREAD.overrides = overrides
    try:
        yield
    finally:
        try:
            _OVERRIDES.reset(token)
        except ValueError:
            # Left in another context than it was entered in (a generator finalised
            # elsewhere): restore the entry mapping there instead.
            _OVERRIDES.set(previous)
        _THREAD.overrides = _OVERRIDES.get()
