"""Training slimmable networks: Algorithm 1, the sandwich rule, in-place distillation, BN
calibration, the original recipe's weight decay, per-width evaluation and a small trainer.

Algorithm 1 of *Slimmable Neural Networks* (Yu et al., ICLR 2019) trains every width on
every batch: clear the gradients, then for each width (largest first) switch, forward,
compute the loss and back-propagate, so the shared weights accumulate the sum of the
per-width gradients; then take one optimizer step. ``slimmable_step`` is exactly that, with
two options from *Universally Slimmable Networks* (Yu & Huang, ICCV 2019):

* the **sandwich rule** (train the largest, the smallest and ``n`` widths between them),
* **in-place distillation** (every smaller width learns from the largest width's detached
  soft prediction instead of the labels).

The building blocks are plain functions (``slimmable_step``, ``calibrate_bn``,
``param_groups``, ``evaluate``); ``Trainer`` strings them into epochs, with a progress bar
(``tqdm``, optional) and checkpoints that resume exactly.

This module imports ``torch``, ``slimops.width`` and ``slimops.nn`` only (never
``slimops.models``): it trains any ``nn.Module`` built from slimmable layers.

Distributed data-parallel training
----------------------------------
Every function and the ``Trainer`` accept a model wrapped in ``torch.nn.parallel.
DistributedDataParallel`` (one process per device; ``gloo`` on CPU, ``nccl`` on GPU)::

    dist.init_process_group("nccl")                 # or "gloo"; torchrun sets the env vars
    torch.cuda.set_device(local_rank)
    model = wrap_distributed(slim_cnn().cuda())     # DDP(find_unused_parameters=True, ...)
    optimizer = torch.optim.SGD(param_groups(model, 4e-5), lr=0.1, momentum=0.9)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0)   # each rank: its shard
    loader = DataLoader(train_set, batch_size=global_batch // world_size, sampler=sampler)
    trainer = Trainer(model, optimizer, seed=0)     # calls sampler.set_epoch(epoch) itself
    trainer.fit(loader, epochs, val_loader)         # val_loader: a DistributedSampler too
    trainer.save_checkpoint("ckpt.pt")              # on every rank; only rank 0 writes

What happens, and why it is right:

* **Gradients.** Each width uses only part of the parameters (its own BN's γ/β, and not
  the larger widths' ones), so DDP needs ``find_unused_parameters=True`` (``slimmable_step``
  refuses a DDP model without it, and one with ``static_graph=True``, which fails on the
  passes below). Algorithm 1 back-propagates once per width; ``slimmable_step`` runs every
  width but the last (the smallest) under ``ddp.no_sync()`` (local accumulation, no
  communication) and lets the last backward all-reduce, once, the gradients accumulated
  over all widths, averaged over the ranks. A parameter that the smallest width does not
  use (a larger width's private BN γ/β) is averaged too: DDP marks a parameter "used" if
  any pass since the last synchronised one gave it a gradient, and all-reduces every used
  parameter's accumulated ``.grad`` at the synchronised backward; only parameters that no
  pass on any rank used keep ``.grad`` untouched (``None`` after ``zero_grad()``). The
  ranks' mean of per-rank mean losses is the global batch's mean loss, so ``world_size``
  processes with shards of ``B / world_size`` train like one process on batches of ``B``
  whose BN layers normalise each shard separately (``tests/test_train_distributed.py``
  checks the weights against exactly that single-process computation, a larger width's
  private γ included).
* **Width switching** reaches the wrapped layers: ``slimops.width(ddp, w)`` and
  ``set_width`` walk ``ddp.modules()``, which contain the module's layers, and DDP runs
  the module's forward in the calling thread.
* **BN running statistics are per rank** (as with plain DDP without ``SyncBatchNorm``;
  batch statistics are per shard). ``wrap_distributed`` turns DDP's buffer broadcast off:
  DDP broadcasts rank 0's buffers at the start of a synchronised forward, so with the
  ``no_sync`` passes some widths' statistics would be overwritten mid-step by rank 0's and
  others not, neither local nor global. The ``Trainer`` instead averages every
  floating-point buffer over the ranks at the end of each epoch (``average_buffers``, as
  timm's ``distribute_bn``), before evaluating or checkpointing, so all ranks hold the same
  model; ``calibrate_bn`` merges the ranks' calibration exactly (as one process over all
  ranks' batches).
* **Sandwich rule.** Every rank must draw the same widths: the ``Trainer`` broadcasts rank
  0's generator state at construction; with ``slimmable_step`` directly, seed the
  ``generator`` alike on every rank.
* **Data.** Give each rank a disjoint shard of the same size per step (a
  ``DistributedSampler``; every rank must run the same number of steps, or DDP hangs).
* **Evaluation** (``evaluate``/``Trainer.evaluate`` with a DDP model) runs the unwrapped
  module on each rank's loader and sums the correct/total counts over the ranks: every
  rank gets the accuracy over the union of the shards.
* **Checkpoints** hold ``model.module``'s state dict (no ``module.`` prefix: it loads into
  an unwrapped model); only rank 0 writes. Every rank resumes from the one file (call
  ``torch.distributed.barrier()`` between writing and reading); its RNG states are rank
  0's, so the global ``torch``/``random``/``numpy`` streams of the other ranks (e.g. data
  augmentation) do not resume exactly; the model, optimizer, scheduler, counters and the
  sandwich rule's generator do.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
import random
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from slimops._files import atomic_write
from slimops.nn import SwitchableBatchNorm2d
from slimops.width import WIDTH_DECIMALS, model_widths, normalize_widths, width_range
from slimops.width import _override, _resolve, slimmable_layers
from slimops.width import width as width_scope

__all__ = [
    "RANDOM_WIDTHS",
    "Trainer",
    "average_buffers",
    "calibrate_bn",
    "evaluate",
    "param_groups",
    "sandwich_widths",
    "slimmable_step",
    "soft_cross_entropy",
    "wrap_distributed",
]

LossFn = Callable[[Any, Any], Tensor]

# The Trainer's epoch losses: one entry per listed width, and the sandwich rule's random
# widths between the switches (each drawn once, so per-width means would be noise) as one.
RANDOM_WIDTHS = "random"
LossKey = Union[float, str]

CHECKPOINT_FORMAT = "slimops.train/1"


# --------------------------------------------------------------------------- helpers


def _check_widths(model: nn.Module, widths: Optional[Sequence[float]]) -> Tuple[float, ...]:
    """``widths`` (default: all the model's widths) as the model's own width values,
    ascending; a width between the listed ones is accepted (rounded as ``slimops.width``
    does) when the model runs at any width in between (see ``width_range``); a
    ``ValueError`` naming the model's widths for any other."""
    available = model_widths(model)
    if not available:
        raise ValueError(f"{type(model).__name__}: its slimmable layers share no width")
    if widths is None:
        return available
    span = width_range(model)
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


# --------------------------------------------------------------------------- distributed

# torch >= 2.13 splits DDP's ``broadcast_buffers`` into ``forward_sync_buffers`` (the
# broadcast at each forward) and an always-on broadcast at construction.
_HAS_FORWARD_SYNC_BUFFERS = (
    "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
)


def _ddp(model: nn.Module) -> Optional[DistributedDataParallel]:
    return model if isinstance(model, DistributedDataParallel) else None


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wraps, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _check_ddp(model: DistributedDataParallel) -> None:
    """Refuse DDP settings under which Algorithm 1 cannot run (see the module docstring)."""
    if getattr(model, "static_graph", False):
        raise ValueError(
            "DistributedDataParallel(static_graph=True) cannot run Algorithm 1: it back-"
            "propagates once per width, all but the last under no_sync(), which a static "
            "graph does not support; wrap with wrap_distributed(model) instead"
        )
    if not model.find_unused_parameters:
        raise ValueError(
            "slimmable training needs DistributedDataParallel(..., find_unused_parameters="
            "True): each width uses only part of the parameters (e.g. only its own switchable "
            "BN's weight and bias); wrap with wrap_distributed(model)"
        )


def _comm_device(module: nn.Module) -> torch.device:
    """Where a collective's tensors must live: the module's device (CUDA for NCCL)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def _require_process_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialised default process group: call "
            "torch.distributed.init_process_group() first ('gloo' on CPU, 'nccl' on GPU)"
        )


@torch.no_grad()
def _all_reduce_(tensors: Sequence[Tensor], group: Any, scale: Optional[float] = None) -> None:
    """Sum ``tensors`` over the ranks of ``group`` in place (then multiply by ``scale``): one
    collective per (device, dtype), on a flattened copy. Every rank must pass the same
    tensors (shapes and order)."""
    buckets: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        if scale is not None:
            flat.mul_(scale)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _group_of(model: nn.Module, group: Any = None) -> Any:
    ddp = _ddp(model)
    if group is None and ddp is not None:
        return ddp.process_group
    return group


def wrap_distributed(
    model: nn.Module,
    device_ids: Optional[Sequence[Union[int, torch.device]]] = None,
    process_group: Any = None,
    **ddp_kwargs: Any,
) -> DistributedDataParallel:
    """``model`` wrapped in ``DistributedDataParallel`` the way slimmable training needs.

    Call it on every rank after ``torch.distributed.init_process_group`` and after moving
    the model to its device (the DDP constructor broadcasts rank 0's parameters and
    buffers, so every rank starts from the same model). The settings:

    * ``find_unused_parameters=True``: each width uses only part of the parameters;
    * no buffer broadcast at forward time (``forward_sync_buffers=False``, or
      ``broadcast_buffers=False`` before torch 2.13, after which rank 0's buffers are
      broadcast once here): BN running statistics stay per rank (see the module docstring;
      ``Trainer`` averages them every epoch, or call ``average_buffers``);
    * ``device_ids=[model's CUDA device]`` for a CUDA model (NCCL), none on CPU (gloo).

    Other keyword arguments go to ``DistributedDataParallel`` (``bucket_cap_mb``,
    ``gradient_as_bucket_view``, an explicit ``forward_sync_buffers=True``, ...); asking for
    ``find_unused_parameters=False`` or ``static_graph=True`` is a ``ValueError``.
    """
    _require_process_group("wrap_distributed")
    if isinstance(model, DistributedDataParallel):
        raise TypeError("wrap_distributed: the model is already a DistributedDataParallel")
    if not ddp_kwargs.get("find_unused_parameters", True):
        raise ValueError("slimmable training needs find_unused_parameters=True: each width "
                         "uses only part of the parameters")
    if ddp_kwargs.get("static_graph", False):
        raise ValueError("static_graph=True cannot run Algorithm 1's no_sync() passes")
    ddp_kwargs["find_unused_parameters"] = True
    if next(model.parameters(), None) is None:
        raise ValueError(f"{type(model).__name__} has no parameters to train")
    device = _comm_device(model)
    if device_ids is None and device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    broadcast_once = False
    if "broadcast_buffers" not in ddp_kwargs and "forward_sync_buffers" not in ddp_kwargs:
        if _HAS_FORWARD_SYNC_BUFFERS:
            ddp_kwargs["forward_sync_buffers"] = False
        else:  # older torch: False also skips the construction-time broadcast; do it here
            ddp_kwargs["broadcast_buffers"] = False
            broadcast_once = True
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=process_group,
                                  **ddp_kwargs)
    if broadcast_once:
        src = dist.get_global_rank(ddp.process_group, 0)
        with torch.no_grad():
            for b in model.buffers():
                dist.broadcast(b, src=src, group=ddp.process_group)
    return ddp


def average_buffers(model: nn.Module, group: Any = None) -> None:
    """Average every floating-point buffer of ``model`` over the ranks, in place.

    In a slimmable model those are the switchable BNs' running means and variances (the
    integer ``num_batches_tracked`` counters are left alone: every rank runs the same number
    of steps). ``group`` defaults to a DDP model's process group, else the default group.
    A collective: every rank calls it, with the same model structure.

    The average of the ranks' running means is the running mean of the mean over the
    ranks' shards; the average of their running variances is the mean of per-shard
    variances, the usual estimate (timm's ``distribute_bn``; ``calibrate_bn`` gives exact
    statistics).
    """
    _require_process_group("average_buffers")
    group = _group_of(model, group)
    buffers = [b for b in _unwrap(model).buffers() if b.is_floating_point()]
    if buffers:
        _all_reduce_(buffers, group, scale=1.0 / dist.get_world_size(group))


def _broadcast_generator(generator: torch.Generator, group: Any, device: torch.device) -> None:
    """Give every rank of ``group`` the generator state of its rank 0 (a collective)."""
    state = generator.get_state().to(device)
    dist.broadcast(state, src=dist.get_global_rank(group, 0), group=group)
    generator.set_state(state.cpu())


# --------------------------------------------------------------------------- Algorithm 1


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

    Returns:
        ``{width: loss}`` as Python floats, in processing order (largest first). With the
        sandwich rule a width drawn more than once reports the mean of its losses.

    Distributed: ``model`` may be a ``DistributedDataParallel`` (``wrap_distributed``) fed
    with this rank's shard of the batch. Every width but the last runs under
    ``model.no_sync()``; the last (smallest) width's backward all-reduces the gradients
    accumulated over all widths, averaged over the ranks, parameters that only larger
    widths use included (see the module docstring). The losses returned are this rank's.
    The widths must agree on every rank (seed ``generator`` alike for the sandwich rule).
    """
    ddp = _ddp(model)
    if ddp is not None:
        _check_ddp(ddp)
    ws = _check_widths(model, widths)
    if sandwich is None:
        order = list(reversed(ws))
    else:
        order = sandwich_widths(ws, sandwich, generator,
                                continuous=width_range(_unwrap(model)) is not None)

    optimizer.zero_grad()
    losses: Dict[float, List[Tensor]] = {}
    teacher: Optional[Tensor] = None
    # The model's slimmable layers, walked once per step rather than at every width switch.
    layers = slimmable_layers(model)
    for i, w in enumerate(order):
        # DDP: accumulate locally in every pass but the last, whose backward all-reduces the
        # gradients accumulated over all passes (a no_sync() block must hold the forward).
        sync = ddp is None or i == len(order) - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with _override(_resolve(model, w, layers)):
                output = model(inputs)
            if inplace_distillation and teacher is not None:
                loss = soft_cross_entropy(output, teacher)
            else:
                loss = loss_fn(output, targets)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(
                    f"loss_fn must return a scalar tensor (e.g. reduction='mean'), got {shape}"
                )
            if inplace_distillation and teacher is None:
                # Only a detached copy of the largest width's prediction outlives its backward.
                teacher = F.softmax(output.detach(), dim=-1)
            loss.backward()
        # to floats after the step: no device sync between widths
        losses.setdefault(w, []).append(loss.detach())
        del output, loss  # this width's graph is freed by backward; drop its last handles
    optimizer.step()
    return {w: sum(float(v) for v in vs) / len(vs) for w, vs in losses.items()}


# --------------------------------------------------------------------------- BN calibration


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
                targets = [_calibration_target(layer, w) for layer in switchable]
                targets = [bn for bn in targets if bn is not None and bn.track_running_stats]
                momenta = [(bn, bn.momentum) for bn in targets]
                for bn in targets:
                    bn.reset_running_stats()
                    bn.momentum = None
                seen = 0
                with width_scope(module, w):
                    for batch in itertools.islice(loader, num_batches):
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


def _calibration_target(layer: SwitchableBatchNorm2d, w: float) -> Optional[nn.BatchNorm2d]:
    """The BN whose statistics calibrating width ``w`` recomputes: the listed width's own
    (``None`` if it tracks none), or fresh statistics for a width between the listed ones."""
    w = layer.canonical_width(w)
    i = layer._width_index.get(w)
    if i is not None:
        return layer.bn[i]
    if not layer.bn[-1].track_running_stats:
        return None
    return layer.new_calibration(w)


# --------------------------------------------------------------------------- weight decay


def _is_depthwise(conv: nn.modules.conv._ConvNd) -> bool:
    # One input channel per group and more than one group: depthwise (a slimmable depthwise
    # conv keeps groups == its full channel count, with weight [C, 1, kh, kw]).
    return conv.groups > 1 and conv.weight.shape[1] == 1


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Optimizer parameter groups with the original recipe's weight decay.

    Weight decay ``weight_decay`` on the weights of ordinary (and grouped) convolutions and
    of linear layers; none on depthwise convolution weights, on batch-norm (and other
    normalisation) parameters, and on biases. The original code decides by shape alone
    (4-D with a second dimension != 1, or 2-D); here convolutions are classified by their
    module, so a regular convolution over one input channel (weight ``[C, 1, kh, kw]``, e.g.
    a grayscale stem) keeps its weight decay; parameters of other modules fall back to the
    shape rule. Frozen parameters (``requires_grad=False``) are left out; shared parameters
    appear once.

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...],
        "weight_decay": 0.0}]`` (an empty group is left out), for any ``torch.optim``
        optimizer: ``torch.optim.SGD(param_groups(model, 4e-5), lr=0.1, momentum=0.9)``.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
             nn.modules.instancenorm._InstanceNorm)
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if isinstance(module, norms) or name == "bias":
                decays = False
            elif isinstance(module, nn.modules.conv._ConvNd) and name == "weight":
                decays = not _is_depthwise(module)
            elif isinstance(module, nn.Linear) and name == "weight":
                decays = True
            else:  # the original shape rule
                decays = (p.dim() == 4 and p.shape[1] != 1) or p.dim() == 2
            (decay if decays else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


# --------------------------------------------------------------------------- evaluation


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


# --------------------------------------------------------------------------- RNG state


def _rng_state(generator: torch.Generator) -> Dict[str, Any]:
    """Every RNG training draws from, as tensors and primitives (``weights_only``-loadable)."""
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but training does not need it
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached)}
    return state


def _set_rng_state(state: Dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()),
                     py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"],
                             s["has_gauss"], s["cached_gaussian"]))


# --------------------------------------------------------------------------- trainer


def _progress_bar(total: Optional[int], desc: str, enabled: bool):
    """A ``tqdm`` bar, or ``None`` when disabled or ``tqdm`` is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def _loss_order(losses: Dict[LossKey, Any]) -> List[LossKey]:
    """Listed widths largest first, then the random in-between widths' entry."""
    widths = sorted((w for w in losses if w != RANDOM_WIDTHS), reverse=True)
    return widths + ([RANDOM_WIDTHS] if RANDOM_WIDTHS in losses else [])


def _format_losses(losses: Dict[LossKey, float]) -> str:
    return " ".join(f"{w:g}x:{losses[w]:.4f}" if w != RANDOM_WIDTHS
                    else f"{w}:{losses[w]:.4f}" for w in _loss_order(losses))


class Trainer:
    """Slimmable training in epochs: ``slimmable_step`` on every batch, optional per-width
    evaluation, an optional LR scheduler, a progress bar and exact checkpoints.

    Args:
        model: the slimmable model (put it on its device first).
        optimizer: e.g. ``torch.optim.SGD(param_groups(model, 4e-5), lr=..., momentum=0.9)``.
        loss_fn: default ``nn.CrossEntropyLoss()``.
        scheduler: an LR scheduler stepped (without arguments) after every epoch, or after
            every batch with ``scheduler_interval="step"``.
        widths: the widths to train and evaluate (default: all of the model's).
        sandwich, inplace_distillation: as ``slimmable_step``.
        seed: seeds the trainer's own ``torch.Generator`` (the sandwich rule's draws);
            ``None`` seeds it non-deterministically. Its state is part of the checkpoint.
        device: where batches are moved (default: left where the loader puts them).
        progress: show a ``tqdm`` bar with each width's running loss (silently off when
            ``tqdm`` is not installed).
        scheduler_interval: ``"epoch"`` or ``"step"``.
        sync_buffers: with a ``DistributedDataParallel`` model, average every
            floating-point buffer (the BN running statistics) over the ranks at the end of
            each epoch (``average_buffers``), so evaluation and checkpoints see one model on
            every rank; ``False`` keeps each rank's own statistics.

    ``epoch`` counts completed epochs; ``history`` holds one entry per epoch
    (``{"epoch", "train_loss", "val_acc"}``).

    Distributed: pass the ``DistributedDataParallel`` model (``wrap_distributed``) and give
    each rank its shard of the data (a loader over a ``DistributedSampler``: ``train_epoch``
    calls ``loader.sampler.set_epoch(epoch)`` when the sampler has it), and construct, fit,
    evaluate and checkpoint on every rank. The constructor broadcasts rank 0's generator
    (so all ranks draw the same sandwich widths); ``train_epoch``'s losses (and so
    ``history``) are the means over all ranks' batches; evaluation counts over all ranks'
    samples; the progress bar and the per-epoch line are shown on rank 0 only; checkpoints
    hold ``module``'s state dict and only rank 0 writes them (see the module docstring).
    ``rank`` and ``world_size`` are those of the model's process group (0 and 1 without
    DDP); ``module`` is the unwrapped model.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Optional[LossFn] = None,
        scheduler: Optional[Any] = None,
        widths: Optional[Sequence[float]] = None,
        *,
        sandwich: Optional[int] = None,
        inplace_distillation: bool = False,
        seed: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = True,
        scheduler_interval: str = "epoch",
        sync_buffers: bool = True,
    ) -> None:
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        self._ddp = _ddp(model)
        if self._ddp is not None:
            _check_ddp(self._ddp)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
        self.scheduler = scheduler
        self.widths = _check_widths(model, widths)
        if sandwich is not None:  # fail now, not at the first batch
            _check_sandwich(self.widths, sandwich, width_range(_unwrap(model)) is not None)
        self.sandwich = sandwich
        self.inplace_distillation = inplace_distillation
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.device = device
        self.progress = progress
        self.scheduler_interval = scheduler_interval
        self.sync_buffers = sync_buffers
        self.rank, self.world_size = 0, 1
        if self._ddp is not None:
            group = self._ddp.process_group
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
            _broadcast_generator(self.generator, group, _comm_device(self.module))
        self.epoch = 0
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []

    @property
    def module(self) -> nn.Module:
        """The model itself (``model.module`` for a ``DistributedDataParallel``)."""
        return _unwrap(self.model)

    def train_step(self, inputs: Any, targets: Any) -> Dict[float, float]:
        """One ``slimmable_step`` on a batch (moved to ``device``); returns per-width loss."""
        losses = slimmable_step(
            self.model, _to(inputs, self.device), _to(targets, self.device), self.loss_fn,
            self.optimizer, self.widths, sandwich=self.sandwich,
            inplace_distillation=self.inplace_distillation, generator=self.generator,
        )
        self.global_step += 1
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        return losses

    def train_epoch(self, loader: Iterable[Any]) -> Dict[LossKey, float]:
        """One epoch over ``loader`` in train mode; returns each width's mean batch loss.

        Keys: the listed widths, largest first; with the sandwich rule on a model that runs
        at any width in between, the random widths' losses are averaged under one key,
        ``RANDOM_WIDTHS`` (``"random"``), last.

        Advances ``epoch`` (and steps an epoch-interval scheduler). Raises ``ValueError``
        if the loader yields no batch. Calls ``loader.sampler.set_epoch(epoch)`` first when
        the sampler has it (a ``DistributedSampler``: a new shuffle every epoch). With DDP
        the returned means are over all ranks' batches, and the buffers are averaged over
        the ranks afterwards (``sync_buffers``).
        """
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        bar = _progress_bar(total, f"epoch {self.epoch + 1}", self.progress and self.rank == 0)
        sums: Dict[LossKey, float] = {}
        counts: Dict[LossKey, int] = {}
        listed = set(self.widths)
        self.model.train()
        try:
            for batch in loader:
                inputs, targets = _split_batch(batch)
                for w, loss in self.train_step(inputs, targets).items():
                    # the sandwich rule's random widths between the switches: one entry
                    key: LossKey = w if w in listed else RANDOM_WIDTHS
                    sums[key] = sums.get(key, 0.0) + loss
                    counts[key] = counts.get(key, 0) + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_format_losses({w: sums[w] / counts[w] for w in sums}))
        finally:
            if bar is not None:
                bar.close()
        if not counts:
            raise ValueError("train_epoch: the loader yielded no batch")
        if self._ddp is not None:
            group = self._ddp.process_group
            ws: List[LossKey] = [*self.widths, RANDOM_WIDTHS]
            totals = torch.tensor([sums.get(w, 0.0) for w in ws] + [counts.get(w, 0) for w in ws],
                                  dtype=torch.float64, device=_comm_device(self.module))
            dist.all_reduce(totals, group=group)
            sums = {w: float(v) for w, v, n in zip(ws, totals[:len(ws)], totals[len(ws):]) if n}
            counts = {w: int(n) for w, n in zip(ws, totals[len(ws):]) if n}
            if self.sync_buffers:
                average_buffers(self.model)
        self.epoch += 1
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        return {w: sums[w] / counts[w] for w in _loss_order(sums)}

    def evaluate(self, loader: Iterable[Any]) -> Dict[float, float]:
        """Per-width top-1 accuracy over ``loader`` (see ``evaluate``)."""
        return evaluate(self.model, loader, self.widths, self.device)

    def fit(
        self, train_loader: Iterable[Any], epochs: int, val_loader: Optional[Iterable[Any]] = None
    ) -> List[Dict[str, Any]]:
        """Train until ``epoch == epochs`` (a total: a resumed trainer continues where its
        checkpoint stopped), evaluating on ``val_loader`` after each epoch if given.

        Returns the new history entries.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        new = []
        while self.epoch < epochs:
            train_loss = self.train_epoch(train_loader)
            entry: Dict[str, Any] = {"epoch": self.epoch, "train_loss": train_loss}
            if val_loader is not None:
                entry["val_acc"] = self.evaluate(val_loader)
            self.history.append(entry)
            new.append(entry)
            if self.progress and self.rank == 0:
                line = f"epoch {self.epoch}/{epochs} loss {_format_losses(train_loss)}"
                if "val_acc" in entry:
                    line += " acc " + " ".join(
                        f"{w:g}x:{a:.4f}" for w, a in entry["val_acc"].items())
                print(line)
        return new

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly, as tensors and primitive containers only."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "widths": list(self.widths),
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": _rng_state(self.generator),
            "history": [dict(e) for e in self.history],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output: model, optimizer, scheduler, counters, RNGs."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"not a slimops trainer checkpoint (format {found!r}, expected "
                f"{CHECKPOINT_FORMAT!r})"
            )
        if tuple(state["widths"]) != self.widths:
            raise ValueError(
                f"the checkpoint trained widths {tuple(state['widths'])}, this trainer "
                f"trains {self.widths}"
            )
        if (state["scheduler"] is None) != (self.scheduler is None):
            has = "has" if state["scheduler"] is not None else "has no"
            raise ValueError(
                f"the checkpoint {has} scheduler state, but this trainer "
                f"{'has no' if self.scheduler is None else 'has a'} scheduler"
            )
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = [dict(e) for e in state["history"]]
        _set_rng_state(state["rng"], self.generator)

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write ``state_dict()`` to ``path`` atomically: a temporary file beside it, flushed to
        disk (fsync), renamed over ``path``, the folder fsync'ed (``slimops._files``); a failed
        save removes its temporary file and leaves ``path`` as it was.

        Distributed: only rank 0 writes (the others return at once; no collective), the
        unwrapped module's state dict; ranks that read the file next should wait for it
        (``torch.distributed.barrier()``).
        """
        if self.rank != 0:
            return
        state = self.state_dict()
        atomic_write(os.fspath(path), lambda f: torch.save(state, f))

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> int:
        """Resume from ``save_checkpoint``'s file (``torch.load(weights_only=True)``: no
        arbitrary code runs); returns the number of completed epochs."""
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        self.load_state_dict(state)
        return self.epoch
