"""Input checks shared by the slimmable layers: clear errors naming layer, width and widths."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from torch import Tensor

from slimops.ops.autocast import dtypes_match
from slimops.width import ChannelRule, ChannelSpec, Slimmable, normalize_widths


def channel_rule(value: ChannelSpec) -> Optional[Callable[[float], int]]:
    """The count at any width, if ``value`` defines one: a rule (callable) as given, an int
    as a fixed count; ``None`` for a per-width list (it only knows its listed widths)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ChannelRule(value, fixed=True) if value >= 1 else None
    if callable(value):
        return value
    return None


def per_width(value: ChannelSpec, widths: Sequence[float], what: str) -> List[int]:
    """A per-width list of channel counts: an int means the same count at every width, a
    rule (callable ``width -> count``) is evaluated at each width."""
    n = len(widths)
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected an int, a list of ints or a channel rule, got {value!r}")
    if isinstance(value, int):
        values = [value] * n
    elif callable(value):
        values = [value(w) for w in widths]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{what}: the channel rule {value!r} must return ints, got {values}")
    else:
        values = [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what}: got {len(values)} channel counts for {n} widths {tuple(widths)}")
    if min(values) < 1:
        raise ValueError(f"{what}: channel counts must be positive, got {values}")
    return values


def counts_between_switches(
    layer: Slimmable, lists: Tuple[Sequence[int], Sequence[int]],
    rules: Tuple[Optional[Callable[[float], int]], Optional[Callable[[float], int]]],
    limits: Tuple[int, int], check: Optional[Callable[[int, int], None]] = None,
) -> Tuple[int, int]:
    """A layer's ``(in, out)`` counts at a width between its listed ones, from its channel
    rules (``lists``: the per-width counts, which the rules replace there). At the listed
    widths the shapes were checked at construction; here ``check`` (the layer's own
    constraints, e.g. a conv's groups) and the weight's size ``limits`` are checked."""
    cin = layer._active_count(lists[0], rules[0])
    cout = layer._active_count(lists[1], rules[1])
    if check is not None:
        check(cin, cout)
    if cin > limits[0] or cout > limits[1]:
        raise ValueError(f"{type(layer).__name__}: at width {layer.active_width()} the channel "
                         f"rules give (in, out) = ({cin}, {cout}), more than the weight's "
                         f"({limits[0]}, {limits[1]})")
    return cin, cout


def resolve_widths(widths, *channel_args) -> tuple:
    """``widths`` as given, or ``(1.0,)`` for a single-width layer built with ints.

    With per-width lists and no ``widths``, there is no way to know the switches: error.
    """
    if widths is not None:
        return normalize_widths(widths)
    if all(isinstance(c, int) for c in channel_args):
        return (1.0,)
    raise ValueError("per-width channel lists and channel rules need `widths=` (the switches "
                     "they belong to)")


def check_layer_input(
    layer: Slimmable, x: Tensor, expected: int, param: Tensor, dims: Optional[int], channel_dim: int
) -> None:
    """``x`` must have ``dims`` dims (any if None), ``expected`` channels along
    ``channel_dim``, and ``param``'s dtype (or, under autocast where slimops' ops cast
    their arguments, any float32 / float16 / bfloat16 mix) and device."""
    name = type(layer).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(x).__name__}")
    if (dims is not None and x.dim() != dims) or x.dim() < 1:
        raise ValueError(f"{name}: expected a {dims}-D input, got shape {tuple(x.shape)}")
    if x.shape[channel_dim] != expected:
        raise ValueError(
            f"{name}: at width {layer.active_width()} it expects {expected} input channels, "
            f"got {x.shape[channel_dim]} (input shape {tuple(x.shape)}; widths {layer.widths})"
        )
    if not dtypes_match(x, param):
        raise TypeError(f"{name}: input dtype {x.dtype} does not match the layer's {param.dtype}")
    if not (x.is_cpu and param.is_cpu) and x.device != param.device:
        raise ValueError(f"{name}: input is on {x.device}, the layer's parameters on {param.device}")
