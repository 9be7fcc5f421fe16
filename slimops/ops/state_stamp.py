"""``state_stamp``: a cheap test that tensors were not written or replaced since a moment.

The layers keep values derived from parameters and buffers (``SlimConvBNAct``'s per-width
BN scale/shift for inference) and must notice when a source changed: written in place
(version counter), given new data (``.data = ...`` keeps the version, changes the storage),
viewed differently, or replaced by another tensor object. Reading the contents would cost
what the cache saves; the stamp names the state instead.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from slimops.ops import _backend


def _python_stamp(*tensors: Optional[Tensor]) -> Optional[tuple]:
    """``state_stamp`` without the compiled extension (same meaning, a tuple instead of
    bytes)."""
    key = []
    for t in tensors:
        if t is None:
            key.append(())
            continue
        if type(t) not in (Tensor, nn.Parameter) or t.is_inference():
            return None
        key.append((id(t), t.data_ptr(), t._version, t.dtype, t.shape, t.stride(), t.device))
    return tuple(key)


# The compiled stamp (csrc/python_module.cpp) is one C call: the inference fast path checks
# on every call of every layer, and the Python form cost 6.5 us per layer there (0.7 ms of
# S-MobileNet v2's batch-1 forward, 2-core AMD EPYC Zen 3), the compiled one ~0.3 us.
_stamp: Callable[..., Optional[object]] = _backend.direct_entry("state_stamp") or _python_stamp


def state_stamp(*tensors: Optional[Tensor]) -> Optional[object]:
    """A value naming the current state of each of ``tensors`` (``None`` entries allowed),
    without reading their contents; ``None`` when a tensor cannot tell whether it was
    written since (an inference tensor: no version counter) or is a tensor subclass.

    Two stamps of the same tensors compare equal only if each position holds the same
    tensor object, over the same storage and offset, not written since (version counter),
    with the same dtype, device, sizes and strides. The caller must keep the stamped
    tensors alive while it keeps the stamp (an address names an object only while it
    lives). Writes through ``.data`` (which has its own version counter) are not seen, as
    autograd does not see them.
    """
    return _stamp(*tensors)
