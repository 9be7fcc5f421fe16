"""``Trainer``: epochs of ``slimmable_step``, evaluation, exact checkpoints, a progress bar."""

from __future__ import annotations

import os
import random
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from slimops._files import atomic_write
from slimops.width import width_range
from slimops.train._common import LossFn, _check_widths, _split_batch, _to
from slimops.train.distributed import (
    _broadcast_generator,
    _check_ddp,
    _comm_device,
    _ddp,
    _unwrap,
    average_buffers,
)
from slimops.train.step import _check_sandwich, slimmable_step
from slimops.train.evaluation import evaluate

# The Trainer's epoch losses: one entry per listed width, and the sandwich rule's random
# widths between the switches (each drawn once, so per-width means would be noise) as one.
RANDOM_WIDTHS = "random"
LossKey = Union[float, str]

CHECKPOINT_FORMAT = "slimops.train/1"



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
        ema_decay: keep ``ema``, an exponential moving average of the weights and buffers
            (``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)``,
            updated after every step); ``evaluate_ema`` evaluates it and checkpoints hold
            it (``"ema"``: its module's state dict).
        autocast_dtype, scaler: mixed precision, as ``slimmable_step`` (the scaler's state
            is checkpointed); evaluation runs in float32.

    ``epoch`` counts completed epochs; ``history`` holds one entry per epoch
    (``{"epoch", "train_loss", "val_acc"}``); ``meta`` is a dict of primitives the caller
    may fill (the command line records the model name, classes and image size) that the
    checkpoint keeps.

    Distributed: pass the ``DistributedDataParallel`` model (``wrap_distributed``) and give
    each rank its shard of the data (a loader over a ``DistributedSampler``: ``train_epoch``
    calls ``loader.sampler.set_epoch(epoch)`` when the sampler has it), and construct, fit,
    evaluate and checkpoint on every rank. The constructor broadcasts rank 0's generator
    (so all ranks draw the same sandwich widths); ``train_epoch``'s losses (and so
    ``history``) are the means over all ranks' batches; evaluation counts over all ranks'
    samples; the progress bar and the per-epoch line are shown on rank 0 only; checkpoints
    hold ``module``'s state dict and only rank 0 writes them (docs/TRAINING.md).
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
        ema_decay: Optional[float] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        scaler: Optional[Any] = None,
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
        self.autocast_dtype, self.scaler = autocast_dtype, scaler
        self.ema: Optional[AveragedModel] = None
        if ema_decay is not None:
            if not 0.0 <= float(ema_decay) < 1.0:
                raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
            # Parameters and buffers (every width's BN statistics) averaged after every step.
            self.ema = AveragedModel(self.module, multi_avg_fn=get_ema_multi_avg_fn(
                float(ema_decay)), use_buffers=True)
        self.epoch = 0
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        # What the checkpoint says about the run besides the state (e.g. the command line's
        # model name, classes, image size): primitives only, saved and restored as is.
        self.meta: Dict[str, Any] = {}

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
            autocast_dtype=self.autocast_dtype, scaler=self.scaler,
        )
        self.global_step += 1
        if self.ema is not None:
            self.ema.update_parameters(self.module)
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
                if self.ema is not None:
                    average_buffers(self.ema.module, group)
        self.epoch += 1
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        return {w: sums[w] / counts[w] for w in _loss_order(sums)}

    def evaluate(self, loader: Iterable[Any], topk: Sequence[int] = (1,)) -> Dict[float, Any]:
        """Per-width top-1 accuracy over ``loader`` (``topk``: see ``evaluate``)."""
        return evaluate(self.model, loader, self.widths, self.device, topk=topk)

    def evaluate_ema(self, loader: Iterable[Any], topk: Sequence[int] = (1,)) -> Dict[float, Any]:
        """``evaluate`` of the EMA weights (``ema_decay``); with DDP, over all ranks too."""
        if self.ema is None:
            raise ValueError("evaluate_ema: this trainer keeps no EMA (ema_decay=None)")
        group = self._ddp.process_group if self._ddp is not None else None
        return evaluate(self.ema.module, loader, self.widths, self.device, topk=topk,
                        process_group=group)

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
            "meta": dict(self.meta),
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "ema_n_averaged": 0 if self.ema is None else int(self.ema.n_averaged),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
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
        if self.ema is not None and state.get("ema") is None:
            raise ValueError("the checkpoint has no EMA weights, but this trainer keeps an EMA")
        self.module.load_state_dict(state["model"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.n_averaged.fill_(int(state["ema_n_averaged"]))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = [dict(e) for e in state["history"]]
        self.meta = dict(state.get("meta") or {})  # absent in checkpoints before it
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
