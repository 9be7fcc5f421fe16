"""DistributedDataParallel helpers for slimmable training (docs/TRAINING.md explains what runs where and why)."""

from __future__ import annotations

import inspect
import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel




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
    """Refuse DDP settings under which Algorithm 1 cannot run (docs/TRAINING.md)."""
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
      broadcast once here): BN running statistics stay per rank (docs/TRAINING.md;
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
