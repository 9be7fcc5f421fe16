"""Batches, widths and module modes: what the training modules share."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from slimops.width import WIDTH_DECIMALS, model_widths, normalize_widths, width_range




def _check_widths(model: nn.Module, widths: Optional[Sequence[float]],
                  layers: Optional[List[Any]] = None) -> Tuple[float, ...]:
    """``widths`` (default: all the model's widths) as the model's own width values,
    ascending; a width between the listed ones is accepted (rounded as ``slimops.width``
    does) when the model runs at any width in between (see ``width_range``); a
    ``ValueError`` naming the model's widths for any other. ``layers``: the model's
    ``slimmable_layers`` when the caller has them (one walk of the module tree per step)."""
    available = model_widths(model, layers)
    if not available:
        raise ValueError(f"{type(model).__name__}: its slimmable layers share no width")
    if widths is None:
        return available
    span = width_range(model, layers)
    resolved = []
    for w in normalize_widths(widths):
        match = [a for a in available if math.isclose(a, w, rel_tol=1e-9, abs_tol=1e-12)]
        if match:
            resolved.append(match[0])
        elif span is not None and span[0] < w < span[1]:
            resolved.append(round(w, WIDTH_DECIMALS))
        else:
            extra = f" (or any width between {span[0]} and {span[1]})" if span else ""
            raise ValueError(
                f"{type(model).__name__}: unknown width {w!r}; the model has widths "
                f"{available}{extra}"
            )
    return tuple(sorted(set(resolved)))


def _split_batch(batch: Any) -> Tuple[Any, Any]:
    """``(inputs, targets)`` of a loader's batch: a tuple or list of at least two items."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "a batch must be an (inputs, targets) tuple or list, as a DataLoader over a "
        f"TensorDataset yields; got {type(batch).__name__}"
    )


def _inputs_only(batch: Any) -> Any:
    """The inputs of a batch for BN calibration: ``batch[0]`` of a tuple/list, else ``batch``."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise TypeError("an empty tuple/list is not a batch")
        return batch[0]
    return batch


def _to(x: Any, device: Optional[Union[str, torch.device]]) -> Any:
    """``x`` (a tensor, or a tuple/list/dict of them) moved to ``device`` (no-op for None)."""
    if device is None:
        return x
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _modes(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    """Every submodule's train/eval flag, to restore mixed modes exactly."""
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: List[Tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training

LossFn = Callable[[Any, Any], Tensor]
