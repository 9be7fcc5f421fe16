"""BN calibration: each width's switchable-BN statistics recomputed from data."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from slimops.ops.load_watch import serial_while_contended
from slimops.nn import SwitchableBatchNorm2d
from slimops.width import width as width_scope
from slimops.train._common import _check_widths, _inputs_only, _modes, _restore_modes, _to
from slimops.train.distributed import _all_reduce_, _comm_device, _ddp, _unwrap


@torch.no_grad()
def _merge_calibration(bns: Sequence[nn.Module], seen: int, group: Any,
                       device: torch.device) -> None:
    """Each rank's BNs hold cumulative averages over its ``seen`` batches; make them the
    cumulative averages over all ranks' batches, on every rank."""
    counts = torch.tensor([seen, int(seen == 0)], dtype=torch.int64, device=device)
    dist.all_reduce(counts, group=group)
    total, empty = int(counts[0]), int(counts[1])
    if empty:
        raise ValueError(f"calibrate_bn: the loader yielded no batch on {empty} rank(s)")
    stats = [t for bn in bns for t in (bn.running_mean, bn.running_var)]
    for t in stats:
        t.mul_(seen / total)
    _all_reduce_(stats, group)
    for bn in bns:
        bn.num_batches_tracked.fill_(total)


def calibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    widths: Optional[Sequence[float]] = None,
    num_batches: Optional[int] = 100,
    device: Optional[Union[str, torch.device]] = None,
) -> None:
    """Recompute each width's switchable-BN running statistics from data (BN calibration).

    ``widths`` may include widths between the model's listed ones when it runs at any
    width in between (``slimops.width.width_range``): each layer then gets fresh statistics
    for that width (``SwitchableBatchNorm2d.calibrated``), which eval at that width needs.

    For each width: reset that width's running stats in every ``SwitchableBatchNorm2d``
    (``bn[i].reset_running_stats()``), set their ``momentum`` to ``None`` (a cumulative
    average: after ``k`` batches the running mean/var are the means of the ``k`` per-batch
    means / unbiased variances), and run forward passes in train mode under
    ``torch.no_grad()`` on the first ``num_batches`` batches of ``loader`` (all of it with
    ``None``). The loader is iterated once per width. Afterwards every BN's ``momentum``
    and every submodule's train/eval mode are restored; the other widths' statistics are
    untouched (each forward only updates the active width's BN). Batch norms shared by
    every width (plain ones, and ``SwitchableBatchNorm2d(shared=True)`` such as S-MobileNet
    v2's tail) are kept in eval mode during calibration, so their statistics are not
    touched either. On an error every statistic is put back as it was.

    Args:
        model: a module built from slimmable layers, with ``SwitchableBatchNorm2d``.
        loader: yields ``(inputs, targets, ...)`` tuples/lists or bare input tensors.
        widths: the widths to calibrate (default: all of the model's).
        num_batches: batches per width (a positive int, or ``None`` for the whole loader).
        device: where to move each batch's inputs (default: leave them where they are).

    Distributed: with a ``DistributedDataParallel`` model (a collective: every rank calls
    it), each rank runs the unwrapped module over its own ``loader`` (e.g. a
    ``DistributedSampler`` shard), then the ranks' cumulative averages are merged, weighted
    by their batch counts, into the cumulative average over all ranks' batches (what one
    process would compute over all of them; ``num_batches_tracked`` becomes the total), so
    every rank ends with the same statistics. A rank whose loader yields no batch makes
    every rank raise.
    """
    ws = _check_widths(model, widths)
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    ddp, module = _ddp(model), _unwrap(model)
    switchable = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    if not switchable:
        raise ValueError(f"{type(model).__name__} has no SwitchableBatchNorm2d to calibrate")
    if all(m.shared for m in switchable):
        raise ValueError("calibrate_bn needs per-width batch norms; this model shares one BN "
                         "across widths everywhere (SwitchableBatchNorm2d(shared=True))")
    # A BN shared by every width (a plain one, or SwitchableBatchNorm2d(shared=True), as in
    # S-MobileNet v2's tail) has no statistics of a width to recompute: it stays in eval.
    shared: List[nn.Module] = [m for m in switchable if m.shared]
    switchable = [m for m in switchable if not m.shared]
    owned = {id(bn) for layer in switchable + shared for bn in layer.bn}
    shared += [m for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in owned]

    all_bns = [bn for layer in switchable for bn in layer.bn if bn.track_running_stats]
    backup = [(bn, bn.running_mean.clone(), bn.running_var.clone(),
               bn.num_batches_tracked.clone(), bn.momentum) for bn in all_bns]
    # Widths between the listed ones get new statistics modules; on an error the layers get
    # back the ones they had.
    calibrated_before = [(layer, dict(layer.calibrated)) for layer in switchable]
    modes = _modes(model)
    ok = False
    try:
        model.train()
        for m in shared:
            m.eval()
        with torch.no_grad():
            for w in ws:
                targets = [layer.calibration_target(w) for layer in switchable]
                targets = [bn for bn in targets if bn is not None and bn.track_running_stats]
                momenta = [(bn, bn.momentum) for bn in targets]
                for bn in targets:
                    bn.reset_running_stats()
                    bn.momentum = None
                seen = 0
                with width_scope(module, w):
                    for batch in itertools.islice(loader, num_batches):
                        # one thread while another process holds a core (load_watch)
                        with serial_while_contended():
                            module(_to(_inputs_only(batch), device))
                        seen += 1
                if ddp is not None:
                    _merge_calibration(targets, seen, ddp.process_group, _comm_device(module))
                elif seen == 0:
                    raise ValueError("calibrate_bn: the loader yielded no batch")
                for bn, momentum in momenta:
                    bn.momentum = momentum
        ok = True
    finally:
        for bn, mean, var, count, momentum in backup:
            bn.momentum = momentum
            if not ok:
                with torch.no_grad():
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                    bn.num_batches_tracked.copy_(count)
        if not ok:
            for layer, before in calibrated_before:
                layer.calibrated = nn.ModuleDict(before)
        _restore_modes(modes)
