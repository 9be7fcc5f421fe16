"""The demo (``python -m slimops demo``, ``make demo``): the paper's finding on real data.

A small slimmable CNN (``slim_cnn`` deepened by four separable blocks, ``demo_model``: 15
conv + switchable-BN layers, 27K parameters at 1.0x) is trained on scikit-learn's digits
(``sklearn.datasets.load_digits``: 1,797 real 8x8 grayscale handwritten digits 0-9,
shipped inside the scikit-learn package, so nothing is downloaded) with Algorithm 1
(``slimops.train``), and compared, width by width, on a held-out test set with

* the same network trained the same way with **one batch norm shared by all widths**
  (``slim_cnn(..., shared_bn=True)``, the paper's naive baseline), and
* one **individually trained** network per width (the same architecture at that width's
  channel counts, plain training).

The paper's finding is that (b) fails at test time, where each BN normalises with its
running statistics, which with one BN are a mix of every width's (in training, each
forward uses its own batch's statistics). How badly it fails grows with depth: on plain
``slim_cnn`` (``extra_blocks=0``, 7 BN layers) shared BN cost at most 2 points per width
here (seed 0, 30 epochs); with the default 4 extra blocks (15 BN layers) it falls apart
at the small widths.

Each row of the table is one width: its test top-1 accuracy under the three trainings,
then the active parameters, MACs and the measured batch-1 latency of the slimmable model
(``slimops.profile``). ``run_demo`` returns everything it prints (``DemoResult``).

Data: a fixed stratified split (360 test images, the other 1,437 for training; split seed
0 regardless of the training seed); pixels ``0..16`` are scaled to ``[0, 1]`` and then
standardised with the training set's mean and standard deviation. Training: SGD with
Nesterov momentum 0.9, weight decay 5e-4 on conv and FC weights (``param_groups``), a
linearly decaying learning rate per step, the same seed (model init, shuffling) for every
model, so the three trainings see the same batches in the same order.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from slimops._table import text_table

__all__ = ["DemoResult", "DemoRow", "DigitsSplit", "default_workers", "demo_model",
           "format_demo_table", "load_digits_split", "run_demo"]

# The split is part of the benchmark, not of the training run: fixed, whatever --seed is.
SPLIT_SEED = 0
TEST_SIZE = 360


# --------------------------------------------------------------------------- data


@dataclass
class DigitsSplit:
    """The digits data, split and scaled: ``x_*`` are float32 ``[N, 1, 8, 8]``, ``y_*``
    int64 class indices."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    total: int  # images in the whole data set


def load_digits_split(test_size: int = TEST_SIZE, split_seed: int = SPLIT_SEED) -> DigitsSplit:
    """scikit-learn's digits, split stratified into train / test (``test_size`` images) with
    ``split_seed``; scaled to ``[0, 1]`` and standardised with the training set's statistics."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # a dependency (requirements.txt); say what to do
        raise ImportError("the demo needs scikit-learn (pip install scikit-learn)") from e

    digits = load_digits()
    images = digits.images.astype("float32") / 16.0  # pixel values are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=test_size, stratify=digits.target,
        random_state=split_seed)
    x_train = torch.from_numpy(x_tr).unsqueeze(1)
    x_test = torch.from_numpy(x_te).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return DigitsSplit(
        x_train=(x_train - mean) / std, y_train=torch.from_numpy(y_tr).long(),
        x_test=(x_test - mean) / std, y_test=torch.from_numpy(y_te).long(),
        num_classes=int(len(digits.target_names)), total=int(len(digits.target)))


class TensorBatches:
    """Mini-batches of in-memory tensors (a lighter ``DataLoader(TensorDataset(x, y))``):
    reshuffled every epoch from its own seeded generator when ``shuffle``."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]


# --------------------------------------------------------------------------- results


@dataclass
class DemoRow:
    """One width: test accuracy (fractions in ``[0, 1]``) of the three trainings and the
    slimmable model's cost at that width (per sample; latency at batch 1)."""

    width: float
    acc_switchable: float  # (a) slimmable network, switchable BN, Algorithm 1
    acc_shared_bn: float  # (b) one BN shared by all widths, Algorithm 1
    acc_individual: float  # (c) a separate network trained at this width alone
    params: int
    bn_params: int
    macs: int
    latency_ms: Optional[float]


@dataclass
class DemoResult:
    rows: List[DemoRow]
    n_train: int  # images trained on (a subset in quick mode)
    n_test: int
    n_total: int  # images in the data set
    num_classes: int
    epochs: int
    seed: int
    train_seconds: Dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    table: str = ""


def format_demo_table(rows: Sequence[DemoRow]) -> str:
    """Plain-text table: a row per width; test accuracy of the three trainings, then the
    slimmable model's parameters, BN parameters, MACs and latency."""
    header = ["width", "switchable BN", "shared BN", "individual", "params", "BN params",
              "MACs", "latency ms"]
    from slimops.profile import human

    body = [[f"{r.width:g}x", f"{100 * r.acc_switchable:.1f}%", f"{100 * r.acc_shared_bn:.1f}%",
             f"{100 * r.acc_individual:.1f}%", f"{r.params:,}", f"{r.bn_params:,}", human(r.macs),
             "-" if r.latency_ms is None else f"{r.latency_ms:.3f}"] for r in rows]
    return text_table(header, body)


# --------------------------------------------------------------------------- training


def _train(model: nn.Module, loader: TensorBatches, epochs: int, lr: float,
           weight_decay: float, seed: int) -> None:
    """Algorithm 1 (every width of ``model`` on every batch; with one width, plain
    training): SGD Nesterov 0.9, LR decaying linearly to 0 over all steps."""
    from slimops.train import Trainer, param_groups

    # fused=True: one kernel over all parameters. The model has ~140 small parameter tensors
    # (each width's BN has its own); the default per-tensor loop took 3.3 ms of a ~25 ms
    # step, the fused one 0.7 ms (2-core AMD EPYC Zen 3). The reference-path training uses
    # the same optimizer, so the comparison the demo prints is unchanged in kind.
    optimizer = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=0.9,
                                nesterov=True, fused=True)
    total = max(1, epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total))
    trainer = Trainer(model, optimizer, scheduler=scheduler, scheduler_interval="step",
                      seed=seed, progress=False)
    trainer.fit(loader, epochs)


def demo_model(widths: Sequence[float], num_classes: int = 10, in_channels: int = 1,
               base: Sequence[int] = (16, 32, 64), extra_blocks: int = 4,
               shared_bn: bool = False) -> nn.Module:
    """``slim_cnn(widths, num_classes, in_channels, base, shared_bn)`` with ``extra_blocks``
    more stride-1 separable blocks (residual) at its last stage: 7 + 2 * ``extra_blocks``
    conv + BN layers. Depth is what makes shared BN fail at test time: each layer's
    statistics differ between widths a little and the mismatch compounds through the layers
    (with ``extra_blocks=0``, plain ``slim_cnn``'s 7 layers, shared BN cost at most 2 points
    per width on this data, seed 0)."""
    from slimops.models import slim_cnn

    return slim_cnn(widths, num_classes, in_channels, tuple(base), shared_bn, extra_blocks)


@dataclass(frozen=True)
class _TrainingJob:
    """One of the demo's trainings, as a worker process gets it: what to build and how to
    train it (everything picklable; the data rides along, 1,437 images of 8x8)."""

    key: str  # "switchable", "reference", "shared" or "individual"
    widths: Tuple[float, ...]
    base: Tuple[int, ...]
    shared_bn: bool
    reference: bool  # through slimops.baselines.reference_style (plain PyTorch)
    epochs: int
    num_classes: int
    extra_blocks: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    x_train: Tensor
    y_train: Tensor


def _build(job: _TrainingJob) -> nn.Module:
    torch.manual_seed(job.seed)
    return demo_model(job.widths, job.num_classes, 1, job.base, job.extra_blocks, job.shared_bn)


def _run_training(job: _TrainingJob) -> Tuple[Dict[str, Tensor], float]:
    """Build the job's model and train it; returns its state dict and the training's
    seconds (model construction included)."""
    from slimops.baselines import reference_style

    t0 = time.perf_counter()
    model = _build(job)
    # every model sees the same batches in the same order
    loader = TensorBatches(job.x_train, job.y_train, job.batch_size, shuffle=True, seed=job.seed)
    # reference: the same model trained through plain PyTorch (slice the shared weights,
    # F.conv2d, the width's nn.BatchNorm2d), sharing its Parameters, so `model` is the
    # result either way.
    _train(reference_style(model) if job.reference else model, loader, job.epochs, job.lr,
           job.weight_decay, job.seed)
    return model.state_dict(), time.perf_counter() - t0


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def default_workers() -> int:
    """Trainings the demo runs at once: 2 where this process may use 2 or more cores, else 1.

    Why processes: on the demo's 8x8 images a training step is ~1 ms of arithmetic per
    width between ~100 op calls, so a second thread inside each op buys nothing (one and two
    threads ran a step in the same 19-22 ms, 2-core AMD EPYC Zen 3), while two trainings side
    by side, one thread each, ran their steps at 23-25 ms each: the demo's independent
    trainings finish in about half the time."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 if cores >= 2 else 1


def _threads_per_worker(workers: int) -> int:
    """Torch threads each of ``workers`` processes gets: this process's share, at least 1."""
    return max(1, torch.get_num_threads() // workers)


def _train_all(jobs: Sequence[_TrainingJob], workers: int
               ) -> List[Tuple[Dict[str, Tensor], float]]:
    """Each job's (state dict, seconds), in the jobs' order: in this process one after the
    other (``workers == 1``), else in ``workers`` spawned processes with
    ``_threads_per_worker(workers)`` threads each, longest jobs first."""
    if workers <= 1:
        return [_run_training(job) for job in jobs]
    threads = _threads_per_worker(workers)
    # Longest first (epochs x widths x the widest channel count) keeps the workers even.
    order = sorted(range(len(jobs)), reverse=True,
                   key=lambda i: jobs[i].epochs * len(jobs[i].widths) * max(jobs[i].base))
    # spawn, not fork: a forked child of a process whose OpenMP pool has run can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {i: pool.submit(_run_training, jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(jobs))]


def run_demo(
    epochs: int = 30,
    seed: int = 0,
    widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    base: Sequence[int] = (16, 32, 64),
    extra_blocks: int = 4,
    batch_size: int = 64,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    repeats: int = 50,
    quick: bool = False,
    verbose: bool = True,
    reference_epochs: int = 5,
    workers: Optional[int] = None,
) -> DemoResult:
    """Train and compare the three variants on the digits; print (``verbose``) and return
    the per-width table.

    Args:
        epochs: epochs of every training (the same for all models).
        seed: model initialisation, shuffling and the trainer's generator (the data split
            is fixed, ``SPLIT_SEED``).
        widths: the slimmable model's widths; ``base``: its channels at 1.0x;
            ``extra_blocks``: separable blocks added to ``slim_cnn`` (``demo_model``).
        repeats: latency runs per width (median after 3 warm-up runs).
        quick: for tests: 1 epoch on the first 192 training images, 3 latency runs.
        reference_epochs: train (a) again for this many epochs (at most ``epochs``; 0: not
            at all) through plain PyTorch (``slimops.baselines.reference_style``: slice the
            shared weights, ``F.conv2d``, the width's ``nn.BatchNorm2d``) and print both
            trainings' seconds per epoch (``train_seconds["reference"]``: its seconds).
        workers: how many trainings run at once, each in its own process with
            ``torch.get_num_threads() // workers`` threads (default ``default_workers()``:
            2 on a machine with 2 or more cores); 1 runs them one after the other in this
            process. Every training's seconds are its own, measured where it ran; the
            plain-PyTorch training runs under the same conditions as slimops' (a). The
            workers are spawned (they import the caller's main module): a script that calls
            ``run_demo`` with more than one worker needs the ``if __name__ == "__main__":``
            guard, as any ``multiprocessing`` program does.
    """
    from slimops.profile import environment, profile
    from slimops.width import channels, normalize_widths

    t_start = time.perf_counter()
    widths = normalize_widths(widths)
    if workers is None:
        workers = default_workers()
    if workers < 1:
        raise ValueError(f"run_demo: workers must be at least 1, got {workers}")
    if quick:
        epochs, repeats = 1, 3
    log = print if verbose else (lambda *a, **k: None)

    data = load_digits_split()
    x_train, y_train = data.x_train, data.y_train
    if quick:
        x_train, y_train = x_train[:192], y_train[:192]

    test = TensorBatches(data.x_test, data.y_test, len(data.x_test))

    log(f"slimops demo: one slimmable CNN, one set of shared weights, {len(widths)} widths, "
        "trained and tested on real data")
    log(environment())
    log(f"data: scikit-learn digits, {data.total} real 8x8 grayscale images, "
        f"{data.num_classes} classes; stratified split (seed {SPLIT_SEED}): "
        f"{len(x_train)} train / {len(data.x_test)} test; standardised")
    log(f"training: {epochs} epoch{'s' if epochs != 1 else ''}, batch {batch_size}, "
        f"SGD Nesterov 0.9, lr {lr:g} decaying linearly, weight decay {weight_decay:g}, "
        f"seed {seed}; widths {', '.join(f'{w:g}x' for w in widths)}")
    log(f"model: slim_cnn(base={tuple(base)}) + {extra_blocks} separable blocks: "
        f"{7 + 2 * extra_blocks} conv + BN layers, then pooling and the classifier")
    log()

    from slimops.train import evaluate

    ref_epochs = min(epochs, reference_epochs)
    per_width = [channels(b, widths, divisor=8) for b in base]

    def job(key: str, widths_: Sequence[float], base_: Sequence[int], shared_bn: bool = False,
            reference: bool = False, epochs_: int = epochs) -> _TrainingJob:
        return _TrainingJob(key, tuple(widths_), tuple(base_), shared_bn, reference, epochs_,
                            data.num_classes, extra_blocks, batch_size, lr, weight_decay, seed,
                            x_train, y_train)

    # (a) the slimmable network: switchable BN, Algorithm 1. (a) again without slimops'
    # kernels for the first `reference_epochs` epochs: the same network, seed and batches
    # through plain PyTorch, so every user sees what the kernels buy on their own machine (a
    # full second training would add half again to the demo's time). (b) the naive
    # baseline: one BN shared by all widths, same training. (c) one network per width, with
    # that width's channels, trained alone.
    jobs = [job("switchable", widths, base), job("shared", widths, base, shared_bn=True)]
    if ref_epochs > 0:
        jobs.append(job("reference", widths, base, reference=True, epochs_=ref_epochs))
    jobs += [job("individual", (1.0,), [c[i] for c in per_width]) for i in range(len(widths))]
    if workers > 1:
        log(f"the {len(jobs)} trainings run {workers} at a time, each in its own process with "
            f"{_threads_per_worker(workers)} thread(s) (--workers 1: one after "
            "the other in this process)")
    t_train = time.perf_counter()
    results = _train_all(jobs, min(workers, len(jobs)))
    train_wall = time.perf_counter() - t_train

    seconds: Dict[str, float] = {}
    models: List[nn.Module] = []
    for j, (state, sec) in zip(jobs, results):
        model = _build(j)
        model.load_state_dict(state)
        models.append(model)
        seconds[j.key] = seconds.get(j.key, 0.0) + sec
    slim, naive = models[0], models[1]
    acc_a = evaluate(slim, test)
    acc_b = evaluate(naive, test)
    acc_c = {w: evaluate(single, test)[1.0] for w, single in zip(widths, models[-len(widths):])}

    log("trained (a) switchable BN, Algorithm 1 (all widths, every batch)  "
        f"{seconds['switchable']:5.1f} s")
    if ref_epochs > 0:
        per_epoch = seconds["switchable"] / epochs, seconds["reference"] / ref_epochs
        log(f"        (a) through plain PyTorch (slice + F.conv2d + per-width BN), "
            f"{ref_epochs} epoch{'s' if ref_epochs != 1 else ''}: {per_epoch[1]:.2f} s/epoch "
            f"vs slimops' {per_epoch[0]:.2f}: slimops takes {per_epoch[0] / per_epoch[1]:.2f}x "
            "the time")
    log(f"        (b) one BN shared by all widths, Algorithm 1          {seconds['shared']:5.1f} s")
    log(f"        (c) {len(widths)} networks, one per width, trained individually  "
        f"{seconds['individual']:5.1f} s")
    if workers > 1:
        log(f"        {sum(seconds.values()):.1f} s of training in {train_wall:.1f} s")

    costs = profile(slim, (1, 1, 8, 8), widths=widths, latency=True, repeats=repeats)
    rows = [DemoRow(width=c.width, acc_switchable=acc_a[c.width], acc_shared_bn=acc_b[c.width],
                    acc_individual=acc_c[c.width], params=c.params, bn_params=c.bn_params,
                    macs=c.macs, latency_ms=c.latency_ms) for c in costs]
    table = format_demo_table(rows)
    total = time.perf_counter() - t_start
    log()
    log(f"test top-1 accuracy on {len(data.x_test)} held-out images (eval mode: each BN's "
        "running statistics); params, MACs per sample and latency (batch 1, median of "
        f"{repeats}) of the slimmable model at each width")
    log()
    log(table)
    log()

    def diffs(attr: str) -> str:
        return ", ".join(f"{r.width:g}x {100 * (getattr(r, attr) - r.acc_switchable):+.1f}"
                         for r in rows)

    log(f"accuracy minus switchable BN's, in points (one test image = "
        f"{100 / len(data.x_test):.2f}):")
    log(f"  shared BN:  {diffs('acc_shared_bn')}")
    log(f"  individual: {diffs('acc_individual')}")
    log()
    log(f"total: {total:.1f} s")
    return DemoResult(rows=rows, n_train=len(x_train), n_test=len(data.x_test),
                      n_total=data.total, num_classes=data.num_classes, epochs=epochs,
                      seed=seed, train_seconds=seconds, total_seconds=total, table=table)
