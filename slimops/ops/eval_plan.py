"""``eval_plan`` / ``eval_plan_call``: a conv layer's inference call from a cached plan, checked
and run in one C call; ``eval_chain_call``: a block's layers, each from its plan, in one.

``slimops.nn.SlimConvBNAct`` keeps, per width, what its inference call needs (the channel
counts, the BN's scale/shift) and must notice, on every call, when anything those came from
changed: a submodule, the weight or a BN tensor replaced, a BN tensor written in place, an
``eps`` or a geometry attribute reassigned. Written in Python, that check and the op's own
entry (dict reads of each module's state, the width's BN modules, the tensors' stamp, the
input's checks, the backend choice) cost 5-8% of S-MobileNet v1/v2's and S-ResNet-50's
batch-1 eval forward at 224 (2-core Intel Xeon): most of it interpreter work between cache
misses on the module state, each layer's kernel having streamed its data through the caches
just before. A plan here is a tuple that ``slimops._C.eval_conv`` checks and runs without
returning to Python (csrc/python_module.cpp): each ``(dict, key, value)`` lookup must still
find that very object, the BN tensors' ``state_stamp`` must be unchanged, and the input must
be the plain case (a CPU tensor of 4 dims with the width's input channels and the weight's
dtype, float32 or float64, the weight contiguous). Otherwise the call answers ``STALE_PLAN``
(an entry or a BN tensor changed) or ``None`` (an unusual call, or the kernel rejected an
argument) and the layer's Python path runs, which rebuilds the plan or names what is wrong.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

from torch import Tensor

from slimops.ops import _backend

_EVAL_CONV: Optional[Callable[..., object]] = _backend.direct_entry("eval_conv")
_EVAL_CHAIN: Optional[Callable[..., object]] = _backend.direct_entry("eval_chain")

# One (dict, key, value) triple: the object `value` must still be `dict[key]`.
Lookup = Tuple[dict, str, object]


class _Stale:
    """The type of ``STALE_PLAN``."""

    def __repr__(self) -> str:
        return "STALE_PLAN"


# What ``eval_plan_call`` answers for a plan whose entries or BN tensors changed since it was
# made: the caller rebuilds it.
STALE_PLAN = _Stale()


def eval_plan(lookups: Sequence[Lookup], sources: Sequence[Optional[Tensor]], stamp: bytes,
              in_channels: int, depthwise: bool, weight: Tensor, bias: Optional[Tensor],
              out_channels: int, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int, scale: Tensor, shift: Tensor,
              activation: int) -> Optional[tuple]:
    """A plan for ``eval_plan_call``: the conv op's arguments (``slimops::conv2d``'s, or
    ``slimops::depthwise_conv2d``'s when ``depthwise``; ``out_channels`` and ``groups`` are
    the conv's only) with what must hold for them to be current: ``lookups`` (each
    ``dict[key] is value``) and ``stamp``, the ``state_stamp`` bytes of ``sources``. None
    without the compiled extension (or a stamp that is not bytes: a Python stamp)."""
    if _EVAL_CONV is None or not isinstance(stamp, bytes):
        return None
    flat: List[object] = [item for triple in lookups for item in triple]
    head = (tuple(flat), tuple(sources), stamp, in_channels, depthwise, weight, bias)
    geometry = (list(stride), list(padding), list(dilation))
    if depthwise:
        return head + geometry + (scale, shift, activation)
    return head + (out_channels,) + geometry + (groups, scale, shift, activation)


def eval_plan_call(plan: tuple, input: Tensor, residual: Optional[Tensor]
                   ) -> Union[Tensor, None, _Stale]:
    """The conv + epilogue of ``plan`` on ``input`` (and ``residual``): its output;
    ``STALE_PLAN`` where the plan no longer holds; None where the call is not the plain case
    or the kernel rejected an argument (the caller's checked path then raises it in its own
    words). Not while torch.compile traces (the caller checks: the graph must record
    ``torch.ops``)."""
    try:
        out = _EVAL_CONV(plan, input, residual)  # type: ignore[misc]
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None
    if out is None:
        return STALE_PLAN
    return None if out is NotImplemented else out  # type: ignore[return-value]


def eval_chain_call(plans: Tuple[tuple, ...], links: Tuple[int, ...], input: Tensor
                    ) -> Union[Tensor, None, _Stale]:
    """Several plans run in one compiled call (a block's layers): step ``k`` runs ``plans[k]``
    on slot ``links[2k]`` with slot ``links[2k + 1]`` as its residual (-1: none), where slot 0
    is ``input`` and slot ``k + 1`` step ``k``'s output; the last step's output. Every plan is
    checked before any runs: ``STALE_PLAN`` where one no longer holds; None where a step is
    not the plain case or its kernel rejected an argument (the caller then runs the layers
    one by one, which rebuild their plans or name what is wrong). Not while torch.compile
    traces (the caller checks)."""
    if _EVAL_CHAIN is None:
        return None
    out = _EVAL_CHAIN(plans, links, input)
    if out is None:
        return STALE_PLAN
    return None if out is NotImplemented else out  # type: ignore[return-value]


__all__ = ["STALE_PLAN", "eval_chain_call", "eval_plan", "eval_plan_call"]
