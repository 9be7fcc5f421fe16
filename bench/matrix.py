"""The CPU performance matrix: slimops vs the reference style (and the dense networks) per cell.

    python bench/matrix.py                 # training and eval cells, this machine as it is
    python bench/matrix.py --busy          # the same with another process spinning on one core
    python bench/matrix.py --busy --repeat 3   # three passes over the cells: medians, ranges
    SLIMOPS_CPU_ISA=avx2 python bench/matrix.py   # the AVX2 kernels on an AVX-512 machine
    python bench/matrix.py --emulate avx2  # every library at AVX2 (oneDNN, MKL, ATen too)
    python bench/matrix.py --quick --cells train  # a smoke run of the training cells
    python bench/matrix.py --cells train224       # S-MobileNet v1/v2 training at 224, b1 / b8
    python bench/matrix.py --cells sweep --sweep-count 100 --sweep-seed 1  # random conv shapes

A cell is one workload: a training step of Algorithm 1 (``slimops.train.slimmable_step``: all
four widths, forward + cross-entropy + backward each, one SGD step), one eval forward of a model
at one width, or one op family's layer (``--cells ops``: 3x3 s1/s2, 1x1, depthwise, each as
conv + switchable BN + ReLU, BN alone, linear) at one width, eval forward at batch 1 and
training forward + backward at batch 8. Each variant of a cell runs the *same* model (shared Parameters): ``slimops`` (the
model's own layers, the compiled kernels), ``reference`` (``baselines.reference_style``: slice
the shared weight + ``F.conv2d`` + the width's ``nn.BatchNorm2d``, the original code's style)
and, for eval, ``dense-jit`` (the network built densely at that width, traced, frozen and
``optimize_for_inference``: the best plain PyTorch offers on CPU) and ``slimops-frozen`` (the
slimmable model deployed the same way: ``slimops.export.torchscript_widths(model, x, [w],
freeze=True)``, its slimops ops on the shared weights with no Python between them; the
like-for-like comparison with ``dense-jit``, as the eager ``slimops`` is with ``reference``).

The load watch (``slimops.ops.load_watch``): the ``slimops`` variants run under the process's
load policy (``adaptive`` unless ``SLIMOPS_LOAD_POLICY`` says otherwise), each call inside
``slimops.serial_while_contended()`` as the README's loops run (a training step already is);
the plain-PyTorch variants run with the watch ``off``, as they would without slimops. With a
core busy, the watch takes slimops' calls to one thread; the others keep two.

Timings are interleaved (round r runs every variant once, in an order shuffled per round) so
that drift of the machine hits every variant alike and no variant always runs after the same
other one (a fixed order favoured the second of two identical kernels by 9-14% on the Xeon
here, docs/BENCHMARKS.md's twenty-fourth round), and each variant's median is reported with
the ratio ``slimops / reference`` (and ``slimops / dense-jit``). With ``--busy`` the mean
instead (the calls' total time over their number; ``--stat`` chooses): with a core busy a
two-thread call's time is bimodal, most calls fast and some 10-60x slower, and the median
would hide the slow mode, which is the cost being measured; the table then also gives the
ratio of the medians. A ratio above 1.0 against the
reference style is a bug (the kernels must never lose to the plain-PyTorch path they replace);
such cells are marked ``SLOWER`` and the run exits with status 1 when ``--guard`` is given. With
``--repeat N`` every cell is measured in N passes over the whole list (minutes apart); the
table gives each variant's median over the passes, the median of the passes' ratios (what
SLOWER and ``--guard`` judge) and their range: with a core busy one pass's ratio moves by up
to 2x with no change in what runs.

``SLIMOPS_CPU_ISA=avx2`` caps slimops' kernels only: the plain-PyTorch variants keep oneDNN's,
MKL's and ATen's AVX-512 code, which an AVX2 machine would not have. ``--emulate avx2`` runs the
whole process as such a machine would (it restarts itself with ``SLIMOPS_CPU_ISA=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2`` and ``ATEN_CPU_CAPABILITY=avx2``,
which those libraries read when they load).

The header states the CPU model, the kernels' instruction set (``SLIMOPS_CPU_ISA`` caps it),
the other libraries' caps where set,
torch threads, whether a core was kept busy, and the allocator settings. glibc hands big freed
blocks straight back to the OS (above its mmap threshold, which moves with the program's
history), so the same op can pay a page fault per 4 KiB of output on one call and none on the
next: 10x swings on a single conv were seen here. By default this script therefore raises
glibc's mmap threshold (1 GiB where accepted, else 32 MiB) and trim threshold (1 GiB) at
start (``mallopt``; the same for every variant, like ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` in the environment); ``--glibc-defaults`` leaves it alone.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import slimops  # noqa: E402
from baselines import dense_jit, reference_style  # noqa: E402
from benchutil import cpu_model  # noqa: E402
from slimops._table import markdown_table  # noqa: E402
from slimops.apps.demo import demo_model  # noqa: E402
from slimops.export import torchscript_widths  # noqa: E402
from slimops.models import s_mobilenet_v1, s_mobilenet_v2, s_resnet50  # noqa: E402
from slimops.nn import (  # noqa: E402
    SlimConvBNAct,
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
)
from slimops.train import slimmable_step  # noqa: E402

WIDTHS = (0.25, 0.5, 0.75, 1.0)
# The load policy slimops' variants run under (the process's, from SLIMOPS_LOAD_POLICY).
SLIMOPS_LOAD_POLICY = slimops.ops.load_watch()["policy"] or "off"


# How a variant's calls in one pass are summarised. Idle, the median: the typical call, robust
# to the rare call the machine delays for every variant alike. With a core busy, the mean (the
# pass's total time over its calls): the times are then bimodal, and the slow mode is what is
# measured, not noise. On the Xeon here, a lone dilated 3x3 conv (16 -> 24, 14x14, batch 32)
# on two threads beside a spinning process took 0.32 ms at its 10th percentile and 4.3 ms at
# its 90th (a worker the OS had given to the other process); on one thread 0.47 and 0.63 ms.
# The median (0.35 against 0.50 ms) says two threads win; the time the calls took in total
# (2.2 against 0.68 ms per call) says they lose 3x. docs/BENCHMARKS.md, the twenty-eighth
# round.
STATISTICS: Dict[str, Callable[[Sequence[float]], float]] = {
    "median": statistics.median, "mean": statistics.fmean}


@dataclass
class Cell:
    """One workload; ``variants`` maps a variant's name to a zero-argument callable."""

    name: str
    variants: Dict[str, Callable[[], object]]
    budget_s: float
    rows: Dict[str, float] = field(default_factory=dict)
    # one {variant: statistic} per pass over the cells (--repeat); rows is their median
    runs: List[Dict[str, float]] = field(default_factory=list)
    min_rounds: int = 5  # fewer for multi-second cells (S-ResNet-50 training at 224)
    # untimed calls first: a conv pass's 1st call measures its routes and its 3rd to 8th
    # time them in place (route.h's first window), so the timed calls run the route the op
    # settled on
    warmups: int = 8
    # what rows and runs hold per variant: a key of STATISTICS (see STATISTICS)
    statistic: str = "median"
    # each pass's per-variant medians, kept beside runs when statistic is not the median
    median_runs: List[Dict[str, float]] = field(default_factory=list)


def pin_glibc_heap() -> Optional[str]:
    """Raise glibc's mmap threshold (1 GiB, else the largest some glibc builds accept, 32 MiB)
    and trim threshold (1 GiB) with ``mallopt``, so freed buffers stay in the heap for reuse
    instead of being unmapped and faulted in again. Returns what was set, None when nothing
    could be (not glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    mmap = next((f"{v >> 20} MiB" for v in (1 << 30, 32 << 20)
                 if libc.mallopt(m_mmap_threshold, v)), None)
    trim = "1024 MiB" if libc.mallopt(m_trim_threshold, 1 << 30) else None
    if mmap is None and trim is None:
        return None
    return f"glibc, mallopt mmap threshold {mmap or 'default'}, trim threshold {trim or 'default'}"


def _train_cell(name: str, model: nn.Module, x: torch.Tensor, classes: int,
                budget_s: float) -> Cell:
    torch.manual_seed(0)
    y = torch.randint(0, classes, (x.shape[0],))
    loss_fn = nn.CrossEntropyLoss()
    ref = reference_style(model)
    variants: Dict[str, Callable[[], object]] = {}
    for label, net in (("slimops", model), ("reference", ref)):
        # lr 0: the two variants share Parameters, and the weights must stay the same while
        # they alternate (momentum buffers are per optimizer, zero updates keep them zero).
        opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
        variants[label] = (lambda net=net, opt=opt:
                           slimmable_step(net, x, y, loss_fn, opt, widths=WIDTHS))
    return Cell(name, variants, budget_s)


def _eval_cells(label: str, model: nn.Module, x: torch.Tensor, budget_s: float,
                widths: Sequence[float]) -> List[Cell]:
    model = model.eval()
    ref = reference_style(model)
    cells = []
    for w in widths:
        jit = dense_jit(model, w, x)

        def run(net: nn.Module, w: float = w) -> Callable[[], object]:
            def call() -> object:
                with torch.inference_mode(), slimops.width(net, w):
                    return net(x)
            return call

        # The slimmable model's own TorchScript deployment at this width, frozen the way the
        # dense baseline is (same weights, no copies: slimops.export.torchscript_widths).
        frozen = torchscript_widths(model, x, [w], freeze=True)

        def run_jit(jit=jit) -> object:
            with torch.inference_mode():
                return jit(x)

        def run_frozen(frozen=frozen, w: float = w) -> object:
            with torch.inference_mode():
                return frozen(x, w)

        cells.append(Cell(f"eval {label} {w:g}x", {"slimops": run(model), "reference": run(ref),
                                                  "dense-jit": run_jit,
                                                  "slimops-frozen": run_frozen}, budget_s))
    return cells


def _mb(c: int) -> List[int]:
    return slimops.channels(c, WIDTHS, divisor=8)


# The op families, one layer each at MobileNet / ResNet shapes: name -> (builder, input side).
OP_LAYERS: Dict[str, Tuple[Callable[[], nn.Module], int]] = {
    "3x3 s1 64->64 (conv+BN+ReLU)": (
        lambda: SlimConvBNAct(_mb(64), _mb(64), 3, widths=WIDTHS), 56),
    "3x3 s2 32->64 (conv+BN+ReLU)": (
        lambda: SlimConvBNAct(_mb(32), _mb(64), 3, 2, widths=WIDTHS), 112),
    "1x1 256->256 (conv+BN+ReLU)": (
        lambda: SlimConvBNAct(_mb(256), _mb(256), 1, widths=WIDTHS), 28),
    "depthwise 3x3 128 (conv+BN+ReLU)": (
        lambda: SlimConvBNAct(_mb(128), _mb(128), 3, groups=128, widths=WIDTHS), 56),
    "BN 128": (lambda: SwitchableBatchNorm2d(_mb(128), widths=WIDTHS), 56),
    "linear 1024->1000": (lambda: SlimmableLinear(_mb(1024), [1000] * 4, widths=WIDTHS), 0),
}


def _layer_call(net: nn.Module, x: torch.Tensor, w: float, mode: str) -> Callable[[], object]:
    """One layer cell's variant: ``net`` at width ``w`` on ``x``, an eval forward (inference
    mode) or a training forward + backward (``mode`` "eval" / "train")."""
    def call() -> object:
        if mode == "eval":
            net.eval()
            with torch.inference_mode(), slimops.width(net, w):
                return net(x)
        net.train()
        with slimops.width(net, w):
            y = net(x)
        y.backward(torch.ones_like(y))
        return y
    return call


def _op_cells(budget_s: float, quick: bool) -> List[Cell]:
    """Per op family and width: eval forward at batch 1 and a training forward + backward at
    batch 8 (input and parameter gradients), slimops vs the reference style."""
    cells = []
    widths = (0.5, 1.0) if not quick else (1.0,)
    for name, (build, side) in OP_LAYERS.items():
        torch.manual_seed(0)
        layer = build()
        ref = reference_style(layer)
        for w in widths:
            with slimops.width(layer, w):
                if isinstance(layer, SlimmableLinear):
                    cin = layer.active_features()[0]
                elif isinstance(layer, SwitchableBatchNorm2d):
                    cin = layer.active_features()
                else:
                    cin = layer.conv.active_channels()[0]
            for mode, batch in (("eval", 1), ("train", 8)):
                shape = (batch, cin) if side == 0 else (batch, cin, side, side)
                x = torch.randn(*shape, requires_grad=mode == "train")
                cells.append(Cell(f"op {mode} {name} {w:g}x b{batch}",
                                  {"slimops": _layer_call(layer, x, w, mode),
                                   "reference": _layer_call(ref, x, w, mode)}, budget_s))
    return cells


# The random sweep (--cells sweep): conv-family layers of every kind at geometries no model cell
# reaches. Why: the kernels must not lose to the reference style on *any* shape, and a fixed
# list of model layers cannot show that; a seeded sample of odd sizes, kernels, strides,
# dilations, groups, batches and widths found fixed-group convs 1.2-10x slower than the
# reference (they had no oneDNN route) that no model cell of this matrix exercised.
SWEEP_KINDS = ("dense", "dense", "pointwise", "depthwise", "grouped", "conv-only")
SWEEP_MAX_INPUT = 2_000_000  # elements of one input batch: a cell stays well under a second


def sweep_geometries(seed: int, count: int) -> List[Dict[str, object]]:
    """``count`` layer geometries drawn with ``random.Random(seed)`` (the same list for the
    same arguments, on any machine). Keys: kind (dense, pointwise, depthwise, grouped: conv
    + switchable BN + ReLU; conv-only: a biased ``SlimmableConv2d``), k, stride, dilation,
    cin, cout (full channels), groups, side (input H = W), batch, width, mode (eval or
    train). Geometries whose output would be empty are not drawn."""
    rng = random.Random(seed)
    out: List[Dict[str, object]] = []
    while len(out) < count:
        kind = rng.choice(SWEEP_KINDS)
        k = 1 if kind == "pointwise" else rng.choice([1, 3, 3, 5, 7])
        stride = rng.choice([1, 1, 2, 3]) if k > 1 else rng.choice([1, 1, 2])
        dilation = rng.choice([1, 1, 2]) if k > 1 else 1
        cin = rng.choice([3, 8, 16, 24, 32, 64, 96, 128, 256, 512])
        cout = rng.choice([8, 16, 24, 32, 64, 96, 128, 256, 512])
        groups = 1
        if kind == "depthwise":
            cin = cout = max(cin, 8)
            groups = cin
        elif kind == "grouped":
            groups, cin, cout = rng.choice([2, 4]), max(cin, 32), max(cout, 32)
        side = rng.choice([3, 4, 7, 8, 13, 14, 28, 32, 56, 57])
        side = min(side, max(3, int((300_000 / cin) ** 0.5)))
        batch = rng.choice([1, 1, 2, 8, 32])
        if batch * cin * side * side > SWEEP_MAX_INPUT:
            batch = 1
        width, mode = rng.choice(WIDTHS), rng.choice(["eval", "train"])
        reach = dilation * (k - 1) + 1
        out_side = (side + 2 * (reach // 2) - reach) // stride + 1  # "same" padding
        # an empty output, or one value per channel in training (batch norm rejects it)
        if out_side < 1 or (mode == "train" and kind != "conv-only"
                            and batch * out_side * out_side < 2):
            continue
        out.append(dict(kind=kind, k=k, stride=stride, dilation=dilation, cin=cin, cout=cout,
                        groups=groups, side=side, batch=batch, width=width, mode=mode))
    return out


def _sweep_channels(c: int) -> List[int]:
    return slimops.channels(c, WIDTHS, divisor=8 if c >= 16 else 1)


def sweep_layer(g: Dict[str, object]) -> nn.Module:
    """The slimmable layer of one sweep geometry (padding: "same" at stride 1)."""
    k, d, groups = int(g["k"]), int(g["dilation"]), int(g["groups"])
    cin, cout = _sweep_channels(int(g["cin"])), _sweep_channels(int(g["cout"]))
    if g["kind"] == "depthwise":
        cout = cin
        groups = max(cin)
    elif g["kind"] == "grouped":
        # every width's channel count a multiple of the groups (the layer requires it)
        cin = [max(groups, c - c % groups) for c in cin]
        cout = [max(groups, c - c % groups) for c in cout]
    if g["kind"] == "conv-only":
        return SlimmableConv2d(cin, cout, k, int(g["stride"]), d * (k - 1) // 2, d,
                               widths=WIDTHS)
    return SlimConvBNAct(cin, cout, k, int(g["stride"]), dilation=d, groups=groups,
                         widths=WIDTHS)


def sweep_name(g: Dict[str, object]) -> str:
    return (f"sweep {g['mode']} {g['kind']} {g['k']}x{g['k']} s{g['stride']} d{g['dilation']}"
            f" g{g['groups']} {g['cin']}->{g['cout']} {g['side']}x{g['side']} b{g['batch']}"
            f" {g['width']:g}x")


def _sweep_cells(seed: int, count: int, budget_s: float) -> List[Cell]:
    """One cell per geometry of ``sweep_geometries(seed, count)``: slimops vs the reference
    style on the same layer (shared Parameters), eval forward or training forward +
    backward, at the geometry's width and batch."""
    cells = []
    for g in sweep_geometries(seed, count):
        torch.manual_seed(0)
        layer = sweep_layer(g)
        ref = reference_style(layer)
        w = float(g["width"])  # type: ignore[arg-type]
        conv = layer.conv if isinstance(layer, SlimConvBNAct) else layer
        with slimops.width(layer, w):
            cin = conv.active_channels()[0]
        side = int(g["side"])
        mode = str(g["mode"])
        x = torch.randn(int(g["batch"]), cin, side, side, requires_grad=mode == "train")
        cell = Cell(sweep_name(g), {"slimops": _layer_call(layer, x, w, mode),
                                    "reference": _layer_call(ref, x, w, mode)}, budget_s)
        # past a conv pass's route measurements up to its second in-place window (its 17th
        # to 22nd calls, route.h), so the cell times the route the op settled on
        cell.warmups = 24
        cells.append(cell)
    return cells


def build_cells(which: str, quick: bool, sweep: Tuple[int, int] = (0, 40)) -> List[Cell]:
    torch.manual_seed(0)
    budget = 0.5 if quick else 4.0
    cells: List[Cell] = []
    if which == "sweep":  # not part of "all": a separate question (any shape, not the models)
        seed, count = sweep
        return _sweep_cells(seed, 6 if quick else count, budget / 16)
    if which in ("train", "all"):
        cells.append(_train_cell("train digits-cnn 8x8 b64", demo_model(WIDTHS),
                                 torch.randn(64, 1, 8, 8), 10, budget))
        res, batch = (32, 16) if quick else (32, 64)
        cells.append(_train_cell(f"train s-mobilenet-v2 {res}x{res} b{batch}",
                                 s_mobilenet_v2(WIDTHS, num_classes=10),
                                 torch.randn(batch, 3, res, res), 10, budget * 2))
        if not quick:
            cells.append(_train_cell("train s-mobilenet-v2 32x32 b128",
                                     s_mobilenet_v2(WIDTHS, num_classes=10),
                                     torch.randn(128, 3, 32, 32), 10, budget * 2))
    if which in ("train224", "all") and not quick:
        # The MobileNets at ImageNet size, the "224 batch 1/8" training cells: a step of
        # 8 images is ~0.6-1 s here; the first call measures every conv pass's route.
        for label, build in (("s-mobilenet-v1", s_mobilenet_v1),
                             ("s-mobilenet-v2", s_mobilenet_v2)):
            for batch in (1, 8):
                train = _train_cell(f"train {label} 224 b{batch}",
                                    build(WIDTHS, num_classes=1000),
                                    torch.randn(batch, 3, 224, 224), 1000, 0.0)
                train.min_rounds = 3
                cells.append(train)
    if which in ("ops", "all"):
        cells += _op_cells(budget / 8, quick)
    if which in ("resnet", "all") and not quick:
        # S-ResNet-50 at 224: its partial-width 3x3 and 1x1 convs are dense (no depthwise), the
        # shapes the MobileNet cells do not reach. A training step of 8 images is seconds.
        resnet = s_resnet50(WIDTHS, num_classes=1000)
        cells += _eval_cells("s-resnet-50 224 b1", resnet, torch.randn(1, 3, 224, 224),
                             budget / 2, WIDTHS)
        train = _train_cell("train s-resnet-50 224 b8", s_resnet50(WIDTHS, num_classes=1000),
                            torch.randn(8, 3, 224, 224), 1000, 0.0)
        # eight warm-up steps (Cell.warmups): the first measures every conv pass's route
        # (route.h: several runs of each candidate, ~4x a step's conv time), the 3rd to 8th
        # time the routes in place
        train.min_rounds = 3
        cells.append(train)
    if which in ("eval", "all"):
        widths = (0.25, 1.0) if quick else WIDTHS
        res = 96 if quick else 224
        cells += _eval_cells("digits-cnn 8x8 b1", demo_model(WIDTHS), torch.randn(1, 1, 8, 8),
                             budget / 2, widths)
        for label, build in (("s-mobilenet-v1", s_mobilenet_v1), ("s-mobilenet-v2", s_mobilenet_v2)):
            cells += _eval_cells(f"{label} {res} b1", build(WIDTHS), torch.randn(1, 3, res, res),
                                 budget / 2, widths)
    return cells


def _as_used(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """A variant's call as its user runs it: slimops' under the process's load policy, inside
    ``serial_while_contended()``; the plain-PyTorch variants with the load watch off (its
    mark, set by slimops' calls, must not reach them). The policy is set outside the timed
    call (``prepare``)."""
    if name.startswith("slimops"):
        def call() -> object:
            with slimops.serial_while_contended():
                return fn()
        return call
    return fn


def _prepare(name: str) -> None:
    slimops.ops.set_load_policy(SLIMOPS_LOAD_POLICY if name.startswith("slimops") else "off")


def measure(cell: Cell) -> None:
    """Interleaved rounds (each in a shuffled order) until the budget is spent (at least 5);
    per variant the cell's statistic over its calls (``STATISTICS``)."""
    names = list(cell.variants)
    calls = {n: _as_used(n, fn) for n, fn in cell.variants.items()}
    for n, fn in calls.items():  # warm-up: first-call costs, caches, allocator
        for _ in range(cell.warmups):
            _prepare(n)
            fn()
    times: Dict[str, List[float]] = {n: [] for n in names}
    order = random.Random(0)  # the same sequence of orders on every run
    start = time.perf_counter()
    rounds = 0
    while rounds < cell.min_rounds or (time.perf_counter() - start < cell.budget_s
                                       and rounds < 200):
        order.shuffle(names)
        for n in names:
            _prepare(n)
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t0)
        rounds += 1
    slimops.ops.set_load_policy(SLIMOPS_LOAD_POLICY)
    summarise = STATISTICS[cell.statistic]
    cell.rows = {n: summarise(ts) for n, ts in times.items()}
    cell.runs.append(dict(cell.rows))
    if cell.statistic != "median":
        cell.median_runs.append({n: statistics.median(ts) for n, ts in times.items()})


def pass_ratios(cell: Cell, runs: Optional[List[Dict[str, float]]] = None) -> List[float]:
    """slimops / reference of each of the cell's passes (``runs``, default its own), ascending
    (no pass recorded: the ratio of its rows)."""
    runs = cell.runs if runs is None else runs
    return sorted(r["slimops"] / r["reference"] for r in (runs or [cell.rows]))


def ratio(cell: Cell) -> float:
    """slimops / reference: the median of the passes' ratios. With a core busy one pass's
    ratio moves by up to 2x with no change in what runs (a contended window hits one variant
    and not the other); the median over passes spread in time is what a cell can be judged
    by."""
    return statistics.median(pass_ratios(cell))


def merge_runs(cell: Cell) -> None:
    """Each variant's time: the median over the cell's passes."""
    if cell.runs:
        cell.rows = {n: statistics.median(r[n] for r in cell.runs) for n in cell.runs[0]}


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 0.1 else f"{s * 1e3:.1f}"


def report(cells: Sequence[Cell], header: str) -> str:
    passes = max((len(c.runs) for c in cells), default=1)
    # a cell summarised otherwise than by the median (--busy) also shows its medians' ratio
    by_medians = any(c.statistic != "median" for c in cells)
    rows = []
    for c in cells:
        s, r, d = c.rows["slimops"], c.rows["reference"], c.rows.get("dense-jit")
        f = c.rows.get("slimops-frozen")
        each = pass_ratios(c)
        q = statistics.median(each)
        row = [c.name, _fmt_ms(s), _fmt_ms(r), _fmt_ms(d) if d else "-", f"{q:.2f}"]
        if passes > 1:
            row.append(f"{each[0]:.2f}-{each[-1]:.2f}")
        if by_medians:
            row.append(f"{statistics.median(pass_ratios(c, c.median_runs)):.2f}"
                       if c.median_runs else "-")
        rows.append(row + [f"{s / d:.2f}" if d else "-", _fmt_ms(f) if f else "-",
                           f"{f / d:.2f}" if f and d else "-", "SLOWER" if q > 1 else ""])
    names = ["cell", "slimops ms", "reference ms", "dense-jit ms", "slimops/reference"]
    if passes > 1:
        names.append(f"range ({passes} passes)")
    if by_medians:
        names.append("slimops/reference by medians")
    table = markdown_table(names + ["slimops/dense-jit", "slimops-frozen ms",
                                    "slimops-frozen/dense-jit", ""], rows,
                           align="lrrrr" + "r" * (len(names) - 5) + "rrrl")
    return f"{header}\n\n{table}"


# What --emulate sets for each instruction set: every library in the process capped to it.
EMULATE_ENV: Dict[str, Dict[str, str]] = {
    "avx2": {"SLIMOPS_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


def library_caps() -> str:
    """The other libraries' instruction-set caps set in the environment, for the header."""
    names = [n for n in EMULATE_ENV["avx2"] if n != "SLIMOPS_CPU_ISA"]  # the header has it
    caps = [f"{n}={os.environ[n]}" for n in names if os.environ.get(n)]
    return ", ".join(caps) if caps else "oneDNN/MKL/ATen uncapped"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells",
                   choices=("train", "train224", "ops", "eval", "resnet", "sweep", "all"),
                   default="all",
                   help="train224: S-MobileNet v1/v2 training steps at 224, batch 1 and 8 "
                        "(~1 min), part of all; resnet: S-ResNet-50 at 224 (eval b1 per width, "
                        "a training step at batch 8; ~2 min), part of all; sweep: "
                        "--sweep-count random conv layer geometries (kinds, kernels, strides, "
                        "dilations, groups, odd sizes, batches, widths; eval or training), not "
                        "part of all")
    p.add_argument("--sweep-count", type=int, default=40, metavar="N",
                   help="with --cells sweep: how many geometries (default 40, ~1 min)")
    p.add_argument("--sweep-seed", type=int, default=0, metavar="S",
                   help="with --cells sweep: the sample's seed (the same list on any machine)")
    p.add_argument("--quick", action="store_true", help="small shapes, short budgets (smoke)")
    p.add_argument("--busy", action="store_true",
                   help="keep one core busy with another process while timing")
    p.add_argument("--stat", choices=sorted(STATISTICS),
                   help="how a variant's calls in a pass are summarised: median (the default "
                        "idle) or mean (the default with --busy: the total time the calls "
                        "took; see STATISTICS); with mean the table also gives the medians' "
                        "ratio")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--guard", action="store_true",
                   help="exit 1 when slimops is slower than the reference style in any cell")
    p.add_argument("--out", help="also append the table to this Markdown file")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="measure every cell N times, the passes spread over the run; report "
                        "medians, the ratio's range, and judge SLOWER by the median ratio")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="leave glibc's mmap/trim thresholds as they are (see the module doc)")
    p.add_argument("--emulate", choices=sorted(EMULATE_ENV),
                   help="run every library in the process at this instruction set (restarts "
                        "the script with their caps set; see the module doc)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.emulate:
        env = EMULATE_ENV[args.emulate]
        if any(os.environ.get(k) != v for k, v in env.items()):
            # The libraries read their caps when they load: start again with them set.
            rest = list(sys.argv[1:] if argv is None else argv)
            sys.stdout.flush()
            os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *rest],
                      {**os.environ, **env})
    stat = args.stat or ("mean" if args.busy else "median")
    pinned = None if args.glibc_defaults else pin_glibc_heap()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = slimops.backend_info()
    alloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                     if k.startswith("MALLOC_")) or "glibc defaults"
    if pinned:
        alloc = pinned
    header = (f"**{cpu_model()}**, kernels `{info.get('cpu_isa')}` ({library_caps()}), "
              f"{torch.get_num_threads()} torch threads, "
              f"{'one core busy (another process spinning)' if args.busy else 'idle'}, "
              f"per variant the {stat} of its calls"
              f"{' (their total time over their number)' if stat == 'mean' else ''}, "
              f"allocator: {alloc}, slimops load policy `{SLIMOPS_LOAD_POLICY}`, "
              f"torch {torch.__version__}"
              + (f", {args.repeat} passes over the cells (medians)" if args.repeat > 1 else ""))
    cells = (build_cells(args.cells, args.quick, sweep=(args.sweep_seed, args.sweep_count))
             if args.cells == "sweep" else build_cells(args.cells, args.quick))
    for c in cells:
        c.statistic = stat
    spinner = subprocess.Popen(["sh", "-c", "while :; do :; done"]) if args.busy else None
    try:
        for _ in range(args.repeat):  # whole passes, so that each cell's passes are minutes apart
            for c in cells:
                measure(c)
                print(f"  {c.name}: " + ", ".join(f"{n} {_fmt_ms(t)} ms"
                                                  for n, t in c.rows.items()),
                      file=sys.stderr, flush=True)
        for c in cells:
            merge_runs(c)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    table = report(cells, header)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n\n")
    slower = [c.name for c in cells if ratio(c) > 1]
    return 1 if (args.guard and slower) else 0


if __name__ == "__main__":
    sys.exit(main())
