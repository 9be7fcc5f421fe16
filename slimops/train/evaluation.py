"""Per-width evaluation (top-1, or top-k accuracies), single process or distributed."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from slimops.ops.load_watch import serial_while_contended
from slimops.width import width as width_scope
from slimops.train._common import _check_widths, _modes, _restore_modes, _split_batch, _to
from slimops.train.distributed import _comm_device, _ddp, _unwrap


def _check_topk(topk: Any) -> Tuple[int, ...]:
    try:
        ks = tuple(topk)
    except TypeError:
        raise TypeError(f"topk must be a sequence of ints, e.g. (1, 5), got {topk!r}") from None
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"topk must be positive ints, e.g. (1, 5), got {topk!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"topk repeats a value: {topk!r}")
    return ks


def _correct_topk(output: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> list:
    """Per ``k``: how many samples have their target among the ``k`` largest logits (``k``
    above the number of classes counts every sample)."""
    if ks == (1,):  # the old path: one argmax
        return [int((output.argmax(dim=-1) == targets).sum())]
    classes = output.shape[-1]
    kmax = min(max(ks), classes)
    top = output.topk(kmax, dim=-1).indices  # [..., kmax], largest first
    hit = top == targets.unsqueeze(-1)
    return [int(hit[..., :min(k, classes)].any(dim=-1).sum()) for k in ks]


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    widths: Optional[Sequence[float]] = None,
    device: Optional[Union[str, torch.device]] = None,
    topk: Sequence[int] = (1,),
    *,
    process_group: Any = None,
) -> Dict[float, Any]:
    """Top-1 accuracy (a fraction in ``[0, 1]``) of each width over ``loader``, or top-k
    accuracies with ``topk``.

    Runs in eval mode under ``torch.no_grad()``, every width on each batch; the model's
    (and every submodule's) mode is restored afterwards. Accuracy counts samples, so
    batches of different sizes weigh by their size.

    Args:
        loader: yields ``(inputs, targets, ...)``; targets are class indices, the output
            is logits with the class dimension last.
        widths: the widths to evaluate (default: all of the model's).
        device: where to move each batch (default: leave it where it is).
        topk: which top-k accuracies to count. The default ``(1,)`` returns
            ``{width: top-1}``; anything else (e.g. ``(1, 5)``) returns
            ``{width: {k: top-k}}``. A ``k`` at or above the number of classes is 1.0.

    Returns:
        ``{width: accuracy}`` (or ``{width: {k: accuracy}}``), largest width first.

    Distributed: with a ``DistributedDataParallel`` model (a collective: every rank calls
    it), each rank runs the unwrapped module over its own ``loader`` (e.g. a
    ``DistributedSampler`` shard) and the correct/total counts are summed over the ranks:
    every rank returns the accuracy over all ranks' samples. ``process_group`` does the
    same for a model that is not wrapped (e.g. an EMA copy of a DDP model's module).
    """
    ks = _check_topk(topk)
    ws = tuple(reversed(_check_widths(model, widths)))
    ddp, module = _ddp(model), _unwrap(model)
    correct = {w: [0] * len(ks) for w in ws}
    total = 0
    modes = _modes(model)
    try:
        model.eval()
        with torch.no_grad():
            for batch in loader:
                inputs, targets = _split_batch(batch)
                inputs, targets = _to(inputs, device), _to(targets, device)
                # one thread per batch while another process holds a core (load_watch)
                with serial_while_contended():
                    for w in ws:
                        with width_scope(module, w):
                            output = module(inputs)
                        for i, c in enumerate(_correct_topk(output, targets, ks)):
                            correct[w][i] += c
                total += int(targets.numel())
    finally:
        _restore_modes(modes)
    group = ddp.process_group if ddp is not None else process_group
    if ddp is not None or process_group is not None:
        counts = torch.tensor([c for w in ws for c in correct[w]] + [total], dtype=torch.int64,
                              device=_comm_device(module))
        dist.all_reduce(counts, group=group)
        flat = [int(c) for c in counts[:-1]]
        correct = {w: flat[j * len(ks):(j + 1) * len(ks)] for j, w in enumerate(ws)}
        total = int(counts[-1])
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    if ks == (1,):
        return {w: correct[w][0] / total for w in ws}
    return {w: {k: c / total for k, c in zip(ks, correct[w])} for w in ws}
