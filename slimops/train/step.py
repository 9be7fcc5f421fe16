"""Algorithm 1 (``slimmable_step``), the sandwich rule and in-place distillation."""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimops.ops.load_watch import serial_while_contended
from slimops.width import WIDTH_DECIMALS, normalize_widths, width_range
from slimops.width import _override, _resolve, slimmable_layers
from slimops.train._common import LossFn, _check_widths
from slimops.train.distributed import _check_ddp, _ddp, _unwrap


def soft_cross_entropy(logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_c p_c log softmax(logits)_c`` (class dim last).

    With ``p`` the teacher's softmax this is the KL divergence ``KL(p || softmax(logits))``
    plus the teacher's entropy, a constant for the student: same gradient, and the loss of
    the original (universally slimmable) implementation's in-place distillation.
    """
    if logits.shape != teacher_probs.shape:
        raise ValueError(
            f"soft_cross_entropy: logits {tuple(logits.shape)} and teacher probabilities "
            f"{tuple(teacher_probs.shape)} differ in shape"
        )
    return -(teacher_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def _at_least_float32(t: Tensor) -> Tensor:
    """float16/bfloat16 (an autocast output) as float32; other dtypes as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_sandwich(widths: Sequence[float], n: int, continuous: bool = False) -> Tuple[float, ...]:
    """Validate a sandwich-rule request; returns the widths ascending."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"sandwich: n must be a non-negative int, got {n!r}")
    ws = normalize_widths(widths)
    if len(ws) < 2:
        raise ValueError(f"the sandwich rule needs at least two widths, got {ws}")
    if n > 0 and len(ws) == 2 and not continuous:
        raise ValueError(
            f"sandwich={n}: no listed width lies strictly between {ws[0]} and {ws[-1]}, and "
            "this model only runs at its listed widths (build its layers from channel rules, "
            "slimops.width.ChannelRule, to train random widths in between)"
        )
    return ws


def sandwich_widths(
    widths: Sequence[float],
    n: int,
    generator: Optional[torch.Generator] = None,
    continuous: bool = False,
) -> List[float]:
    """The widths of one sandwich-rule step, largest first: the largest, ``n`` random widths
    between the extremes, the smallest.

    ``continuous=True`` (a model that runs at any width between its switches, see
    ``slimops.width.width_range``): the ``n`` widths are drawn uniformly from the open
    interval ``(min, max)``, as the universally slimmable networks' sandwich rule does
    (rounded to ``slimops.width.WIDTH_DECIMALS`` decimals). Otherwise they are drawn from the
    listed widths strictly between the extremes, uniformly and without replacement; if
    ``n`` exceeds how many there are, the draw goes in rounds, each without replacement
    (every in-between width once per round), so some widths repeat.

    Args:
        widths: the candidate widths (any order; at least two): their smallest and largest
            are the sandwich's ends.
        n: how many in-between widths (``0``: just the largest and the smallest).
        generator: a CPU ``torch.Generator`` for a reproducible draw (default: torch's
            global RNG).
        continuous: draw from the interval instead of the listed widths.
    """
    ws = _check_sandwich(widths, n, continuous)
    lo, hi = ws[0], ws[-1]
    drawn: List[float] = []
    if continuous:
        while len(drawn) < n:
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            w = round(lo + (hi - lo) * u, WIDTH_DECIMALS)
            if lo < w < hi:
                drawn.append(w)
    else:
        middle = ws[1:-1]
        while len(drawn) < n:
            perm = torch.randperm(len(middle), generator=generator)
            drawn.extend(middle[int(i)] for i in perm[: n - len(drawn)])
    return [hi] + sorted(drawn, reverse=True) + [lo]


def slimmable_step(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    widths: Optional[Sequence[float]] = None,
    *,
    sandwich: Optional[int] = None,
    inplace_distillation: bool = False,
    generator: Optional[torch.Generator] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    scaler: Optional[Any] = None,
) -> Dict[float, float]:
    """One training step of Algorithm 1; returns each width's loss, largest width first.

    ``optimizer.zero_grad()``; then for each width from the largest to the smallest: run
    ``model`` at that width (``slimops.width(model, w)``, this thread only), compute the
    loss and call ``backward()``, so the gradients of all widths accumulate in the shared
    weights' ``.grad``; then a single ``optimizer.step()``. Each width's graph is
    back-propagated (and so freed) before the next width's forward, and its output is not
    kept (except the detached copy in-place distillation needs), so peak memory is that of
    one width's graph. The model's train/eval mode is left as it is (call ``model.train()``).

    Args:
        model: a module built from slimmable layers.
        inputs, targets: one batch; the loss is ``loss_fn(model(inputs), targets)``, which
            must be a scalar tensor.
        loss_fn: e.g. ``nn.CrossEntropyLoss()``.
        optimizer: steps once per call.
        widths: the widths to train (default: all of the model's).
        sandwich: ``None`` trains every width in ``widths``. An int ``n`` applies the
            sandwich rule: the largest, the smallest and ``n`` widths drawn between them
            (``sandwich_widths``): uniformly from the interval when the model runs at any
            width in between (layers built from channel rules; ``width_range(model)`` is not
            ``None``), else from the listed widths. A random width between the listed ones
            normalises with batch statistics and uses a prefix of the next larger listed
            width's BN γ/β (see ``SwitchableBatchNorm2d``); calibrate its statistics with
            ``calibrate_bn`` before evaluating it.
        inplace_distillation: the largest width learns from ``targets`` with ``loss_fn``;
            every smaller width learns from the largest width's soft prediction
            (``softmax`` of its logits, detached: no gradient flows back into the largest
            width through it) with ``soft_cross_entropy``, instead of from the labels. The
            model's output must be logits with the class dimension last.
        generator: a CPU ``torch.Generator`` for the sandwich rule's draw.
        autocast_dtype: run each width's forward and loss under ``torch.autocast`` of the
            inputs' device type with this dtype (``torch.bfloat16``; ``torch.float16`` on
            CUDA with a ``scaler``); distillation's soft targets and loss are computed in
            float32. slimops' ops autocast on CUDA (``slimops.ops.autocast``); on the
            CPU, whose kernels are float32/float64, they keep their inputs' dtype.
        scaler: a ``torch.amp.GradScaler`` (for float16): each width's loss is scaled before
            its backward, and ``scaler.step(optimizer)`` / ``scaler.update()`` replace
            ``optimizer.step()`` (a step with non-finite gradients is skipped).

    Returns:
        ``{width: loss}`` as Python floats, in processing order (largest first). With the
        sandwich rule a width drawn more than once reports the mean of its losses.

    Distributed: ``model`` may be a ``DistributedDataParallel`` (``wrap_distributed``) fed
    with this rank's shard of the batch. Every width but the last runs under
    ``model.no_sync()``; the last (smallest) width's backward all-reduces the gradients
    accumulated over all widths, averaged over the ranks, parameters that only larger
    widths use included (docs/TRAINING.md). The losses returned are this rank's.
    The widths must agree on every rank (seed ``generator`` alike for the sandwich rule).
    """
    ddp = _ddp(model)
    if ddp is not None:
        _check_ddp(ddp)
    # The model's slimmable layers, walked once per step rather than for every check and
    # at every width switch (three walks of the demo CNN's 147 modules were ~1.2 ms of a
    # ~31 ms step under cProfile).
    layers = slimmable_layers(model)
    ws = _check_widths(model, widths, layers)
    if sandwich is None:
        order = list(reversed(ws))
    else:
        order = sandwich_widths(ws, sandwich, generator,
                                continuous=width_range(_unwrap(model), layers) is not None)

    # Where another process holds a core, the whole step runs on one thread (the plain torch
    # ops between slimops' ops included), not only slimops' ops: slimops.ops.load_watch.
    with serial_while_contended():
        optimizer.zero_grad()
        losses: Dict[float, List[Tensor]] = {}
        teacher: Optional[Tensor] = None
        if autocast_dtype is not None:  # autocast for the device the inputs are on
            tensors = [inputs] if isinstance(inputs, Tensor) else [
                t for t in (inputs if isinstance(inputs, (list, tuple)) else ())
                if isinstance(t, Tensor)]
            device_type = tensors[0].device.type if tensors else "cpu"
        for i, w in enumerate(order):
            # DDP: accumulate locally in every pass but the last, whose backward all-reduces the
            # gradients accumulated over all passes (a no_sync() block must hold the forward).
            sync = ddp is None or i == len(order) - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with contextlib.nullcontext() if autocast_dtype is None else torch.autocast(
                        device_type, dtype=autocast_dtype):
                    with _override(_resolve(model, w, layers)):
                        output = model(inputs)
                    if inplace_distillation and teacher is not None:
                        loss = soft_cross_entropy(_at_least_float32(output), teacher)
                    else:
                        loss = loss_fn(output, targets)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                    raise ValueError(
                        f"loss_fn must return a scalar tensor (e.g. reduction='mean'), got {shape}"
                    )
                if inplace_distillation and teacher is None:
                    # Only a detached copy of the largest width's prediction outlives its backward.
                    teacher = F.softmax(_at_least_float32(output.detach()), dim=-1)
                (loss if scaler is None else scaler.scale(loss)).backward()
            # to floats after the step: no device sync between widths
            losses.setdefault(w, []).append(loss.detach())
            del output, loss  # this width's graph is freed by backward; drop its last handles
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        return {w: sum(float(v) for v in vs) / len(vs) for w, vs in losses.items()}
