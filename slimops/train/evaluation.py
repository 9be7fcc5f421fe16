"""Per-width evaluation (top-1 accuracy), single process or distributed."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from slimops.width import width as width_scope
from slimops.train._common import _check_widths, _modes, _restore_modes, _split_batch, _to
from slimops.train.distributed import _comm_device, _ddp, _unwrap


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    widths: Optional[Sequence[float]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Dict[float, float]:
    """Top-1 accuracy (a fraction in ``[0, 1]``) of each width over ``loader``.

    Runs in eval mode under ``torch.no_grad()``, every width on each batch; the model's
    (and every submodule's) mode is restored afterwards. Accuracy counts samples, so
    batches of different sizes weigh by their size.

    Args:
        loader: yields ``(inputs, targets, ...)``; targets are class indices, the output
            is logits with the class dimension last.
        widths: the widths to evaluate (default: all of the model's).
        device: where to move each batch (default: leave it where it is).

    Returns:
        ``{width: accuracy}``, largest width first.

    Distributed: with a ``DistributedDataParallel`` model (a collective: every rank calls
    it), each rank runs the unwrapped module over its own ``loader`` (e.g. a
    ``DistributedSampler`` shard) and the correct/total counts are summed over the ranks:
    every rank returns the accuracy over all ranks' samples.
    """
    ws = tuple(reversed(_check_widths(model, widths)))
    ddp, module = _ddp(model), _unwrap(model)
    correct = {w: 0 for w in ws}
    total = 0
    modes = _modes(model)
    try:
        model.eval()
        with torch.no_grad():
            for batch in loader:
                inputs, targets = _split_batch(batch)
                inputs, targets = _to(inputs, device), _to(targets, device)
                for w in ws:
                    with width_scope(module, w):
                        output = module(inputs)
                    correct[w] += int((output.argmax(dim=-1) == targets).sum())
                total += int(targets.numel())
    finally:
        _restore_modes(modes)
    if ddp is not None:
        counts = torch.tensor([correct[w] for w in ws] + [total], dtype=torch.int64,
                              device=_comm_device(module))
        dist.all_reduce(counts, group=ddp.process_group)
        correct = {w: int(c) for w, c in zip(ws, counts[:-1])}
        total = int(counts[-1])
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {w: correct[w] / total for w in ws}
