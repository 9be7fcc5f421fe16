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
``slimops.models``): it trains any ``nn.Module`` built from slimmable layers. Distributed
training is not handled here.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimops.nn import SwitchableBatchNorm2d
from slimops.width import model_widths, normalize_widths
from slimops.width import width as width_scope

__all__ = [
    "Trainer",
    "calibrate_bn",
    "evaluate",
    "param_groups",
    "sandwich_widths",
    "slimmable_step",
    "soft_cross_entropy",
]

LossFn = Callable[[Any, Any], Tensor]

CHECKPOINT_FORMAT = "slimops.train/1"


# --------------------------------------------------------------------------- helpers


def _check_widths(model: nn.Module, widths: Optional[Sequence[float]]) -> Tuple[float, ...]:
    """``widths`` (default: all the model's widths) as the model's own width values,
    ascending; a ``ValueError`` naming the model's widths for any it does not have."""
    available = model_widths(model)
    if not available:
        raise ValueError(f"{type(model).__name__}: its slimmable layers share no width")
    if widths is None:
        return available
    resolved = []
    for w in normalize_widths(widths):
        match = [a for a in available if math.isclose(a, w, rel_tol=1e-9, abs_tol=1e-12)]
        if not match:
            raise ValueError(
                f"{type(model).__name__}: unknown width {w!r}; the model has widths {available}"
            )
        resolved.append(match[0])
    return tuple(resolved)


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


# --------------------------------------------------------------------------- Algorithm 1


def _check_sandwich(widths: Sequence[float], n: int) -> Tuple[float, ...]:
    """Validate a sandwich-rule request; returns the widths ascending."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"sandwich: n must be a non-negative int, got {n!r}")
    ws = normalize_widths(widths)
    if len(ws) < 2:
        raise ValueError(f"the sandwich rule needs at least two widths, got {ws}")
    if n > 0 and len(ws) == 2:
        raise ValueError(
            f"sandwich={n}: no listed width lies strictly between {ws[0]} and {ws[-1]} "
            "(random widths between the listed ones need universally slimmable layers)"
        )
    return ws


def sandwich_widths(
    widths: Sequence[float], n: int, generator: Optional[torch.Generator] = None
) -> List[float]:
    """The widths of one sandwich-rule step, largest first: the largest, ``n`` random widths
    between the extremes, the smallest.

    The sandwich rule draws the ``n`` widths uniformly from the *interval*
    ``[min, max]``. That needs layers that run at any width (the "universally slimmable"
    layers, with BN calibration instead of switchable BN); today's layers only run at their
    listed widths (``SwitchableBatchNorm2d`` keeps one BN per listed width), so the ``n``
    widths are drawn from the listed widths strictly between the extremes, uniformly and
    without replacement. If ``n`` exceeds how many there are, the draw goes in rounds, each
    without replacement (every in-between width once per round), so some widths repeat.

    Args:
        widths: the candidate widths (any order; at least two).
        n: how many in-between widths (``0``: just the largest and the smallest).
        generator: a CPU ``torch.Generator`` for a reproducible draw (default: torch's
            global RNG).
    """
    ws = _check_sandwich(widths, n)
    middle = ws[1:-1]
    drawn: List[float] = []
    while len(drawn) < n:
        perm = torch.randperm(len(middle), generator=generator)
        drawn.extend(middle[int(i)] for i in perm[: n - len(drawn)])
    return [ws[-1]] + sorted(drawn, reverse=True) + [ws[0]]


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
            (see ``sandwich_widths``: today drawn from the listed widths, not the interval).
        inplace_distillation: the largest width learns from ``targets`` with ``loss_fn``;
            every smaller width learns from the largest width's soft prediction
            (``softmax`` of its logits, detached: no gradient flows back into the largest
            width through it) with ``soft_cross_entropy``, instead of from the labels. The
            model's output must be logits with the class dimension last.
        generator: a CPU ``torch.Generator`` for the sandwich rule's draw.

    Returns:
        ``{width: loss}`` as Python floats, in processing order (largest first). With the
        sandwich rule a width drawn more than once reports the mean of its losses.
    """
    ws = _check_widths(model, widths)
    if sandwich is None:
        order = list(reversed(ws))
    else:
        order = sandwich_widths(ws, sandwich, generator)

    optimizer.zero_grad()
    losses: Dict[float, List[Tensor]] = {}
    teacher: Optional[Tensor] = None
    for w in order:
        with width_scope(model, w):
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


def calibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    widths: Optional[Sequence[float]] = None,
    num_batches: Optional[int] = 100,
    device: Optional[Union[str, torch.device]] = None,
) -> None:
    """Recompute each width's switchable-BN running statistics from data (BN calibration).

    For each width: reset that width's running stats in every ``SwitchableBatchNorm2d``
    (``bn[i].reset_running_stats()``), set their ``momentum`` to ``None`` (a cumulative
    average: after ``k`` batches the running mean/var are the means of the ``k`` per-batch
    means / unbiased variances), and run forward passes in train mode under
    ``torch.no_grad()`` on the first ``num_batches`` batches of ``loader`` (all of it with
    ``None``). The loader is iterated once per width. Afterwards every BN's ``momentum``
    and every submodule's train/eval mode are restored; the other widths' statistics are
    untouched (each forward only updates the active width's BN). Plain (shared, not
    switchable) batch norms are kept in eval mode during calibration, so their statistics
    are not touched either. On an error every statistic is put back as it was.

    Args:
        model: a module built from slimmable layers, with ``SwitchableBatchNorm2d``.
        loader: yields ``(inputs, targets, ...)`` tuples/lists or bare input tensors.
        widths: the widths to calibrate (default: all of the model's).
        num_batches: batches per width (a positive int, or ``None`` for the whole loader).
        device: where to move each batch's inputs (default: leave them where they are).
    """
    ws = _check_widths(model, widths)
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    switchable = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    if not switchable:
        raise ValueError(f"{type(model).__name__} has no SwitchableBatchNorm2d to calibrate")
    if any(m.shared for m in switchable):
        raise ValueError("calibrate_bn needs per-width batch norms; this model shares one BN "
                         "across widths (SwitchableBatchNorm2d(shared=True))")
    owned = {id(bn) for layer in switchable for bn in layer.bn}
    shared = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in owned]

    all_bns = [bn for layer in switchable for bn in layer.bn if bn.track_running_stats]
    backup = [(bn, bn.running_mean.clone(), bn.running_var.clone(),
               bn.num_batches_tracked.clone(), bn.momentum) for bn in all_bns]
    modes = _modes(model)
    ok = False
    try:
        model.train()
        for m in shared:
            m.eval()
        with torch.no_grad():
            for w in ws:
                targets = [layer.bn[layer._width_index[layer.canonical_width(w)]]
                           for layer in switchable]
                targets = [bn for bn in targets if bn.track_running_stats]
                for bn in targets:
                    bn.reset_running_stats()
                    bn.momentum = None
                seen = 0
                with width_scope(model, w):
                    for batch in itertools.islice(loader, num_batches):
                        model(_to(_inputs_only(batch), device))
                        seen += 1
                if seen == 0:
                    raise ValueError("calibrate_bn: the loader yielded no batch")
                for bn, *_, momentum in backup:
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
        _restore_modes(modes)


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
    """
    ws = tuple(reversed(_check_widths(model, widths)))
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
                    with width_scope(model, w):
                        output = model(inputs)
                    correct[w] += int((output.argmax(dim=-1) == targets).sum())
                total += int(targets.numel())
    finally:
        _restore_modes(modes)
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


def _format_losses(losses: Dict[float, float]) -> str:
    return " ".join(f"{w:g}x:{v:.4f}" for w, v in sorted(losses.items(), reverse=True))


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

    ``epoch`` counts completed epochs; ``history`` holds one entry per epoch
    (``{"epoch", "train_loss", "val_acc"}``).
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
    ) -> None:
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
        self.scheduler = scheduler
        self.widths = _check_widths(model, widths)
        if sandwich is not None:
            _check_sandwich(self.widths, sandwich)  # fail now, not at the first batch
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
        self.epoch = 0
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []

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

    def train_epoch(self, loader: Iterable[Any]) -> Dict[float, float]:
        """One epoch over ``loader`` in train mode; returns each width's mean batch loss.

        Advances ``epoch`` (and steps an epoch-interval scheduler). Raises ``ValueError``
        if the loader yields no batch.
        """
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        bar = _progress_bar(total, f"epoch {self.epoch + 1}", self.progress)
        sums: Dict[float, float] = {}
        counts: Dict[float, int] = {}
        self.model.train()
        try:
            for batch in loader:
                inputs, targets = _split_batch(batch)
                for w, loss in self.train_step(inputs, targets).items():
                    sums[w] = sums.get(w, 0.0) + loss
                    counts[w] = counts.get(w, 0) + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_format_losses({w: sums[w] / counts[w] for w in sums}))
        finally:
            if bar is not None:
                bar.close()
        if not counts:
            raise ValueError("train_epoch: the loader yielded no batch")
        self.epoch += 1
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        return {w: sums[w] / counts[w] for w in sorted(sums, reverse=True)}

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
            if self.progress:
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
            "model": self.model.state_dict(),
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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = [dict(e) for e in state["history"]]
        _set_rng_state(state["rng"], self.generator)

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write ``state_dict()`` to ``path`` (atomically: a temporary file, then a rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> int:
        """Resume from ``save_checkpoint``'s file (``torch.load(weights_only=True)``: no
        arbitrary code runs); returns the number of completed epochs."""
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        self.load_state_dict(state)
        return self.epoch
