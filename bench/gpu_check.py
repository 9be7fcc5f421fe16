"""The GPU check: run on a machine with a CUDA GPU, in under 10 minutes (an H100 / H200),
it answers the two questions nothing in this project could answer without one.

1. **Correctness.** Every slimops op, forward and backward (autograd calls every backward
   op of ``slimops.op_families``), on the GPU against the same op on the CPU in float64
   (the C++ kernels), from the same inputs rounded to the dtype under test: float32 (TF32
   off), float16, bfloat16, and float32 inputs under ``torch.autocast`` float16 / bfloat16.
   Slimmable prefixes of the shared weights throughout; every epilogue term, groups,
   strides, dilation, batch norm in training and eval, the fused training ops. With
   ``--cuda-kernels both`` (the default) the checks run again with the extension's CUDA
   C++ kernels (``slimops.ops.use_cuda_cpp_kernels``) where the build has them.
2. **Speed.** S-MobileNet v2 at each width, float16, channels_last input, eval: slimops
   (its Triton kernels; the shared weights stay contiguous, the layout they read), slimops
   under autocast (a float32 model), the reference style (``F.conv2d`` on the sliced shared
   weights, weights channels_last) and the dense network of that width (``nn.Conv2d``,
   weights channels_last); batch 1 and 32. Each timed call ends with a
   ``torch.cuda.synchronize`` (``slimops.timing.time_calls``). The outputs of slimops and
   the dense network are compared at every width too.

Writes ``gpu_check.json`` (everything) and ``gpu_check.md`` (the tables) into ``--out``.
Exit status: 0 when every check passed, 1 when one failed, 3 when there is no GPU (nothing
is run then, and nothing written). A time budget (``--budget-s``, default 540 s) bounds the
run: checks not started within three quarters of it are recorded as not run (and fail),
timing cells not started within it as skipped.

Usage::

    python bench/gpu_check.py                   # the whole check (~minutes on an H100)
    python bench/gpu_check.py --quick           # a smoke run: fewer cases, widths, rounds
    python bench/gpu_check.py --device cpu --quick --dtype fp32 --image-size 64
        # a dry run of the script's logic on the CPU (tests/test_bench_gpu_check.py); its
        # figures are CPU figures, not GPU results

Imports only slimops' public API and the bench helpers (``bench/baselines.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimops
from slimops.op_families import FAMILY_OF
from slimops.timing import summarize, time_calls

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import dense_eager, reference_style  # noqa: E402  (bench helpers)

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3
NO_GPU_MESSAGE = (
    "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False, torch {torch}); "
    "nothing was run and nothing written. Run it on a machine with an NVIDIA GPU and a CUDA "
    "build of torch, or try the script's logic on the CPU with "
    "`python bench/gpu_check.py --device cpu --quick`."
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest error allowed, relative to the expected tensor's largest magnitude: a few units of
# the dtype's rounding (plus float32 accumulation over the reductions of the cases below).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
# float16/bfloat16: the share of a tensor's elements allowed above the tolerance (see _compare).
OUTLIER_SHARE = 0.005
FUSED_OPS = ("conv2d_bn_act_train", "depthwise_conv2d_bn_act_train")
MODEL = "s_mobilenet_v2"


# ------------------------------------------------------------------------------------------
# per-op checks


@dataclass
class Case:
    """One call of a public op. ``make(gen)`` returns the tensors (float32, CPU, from ``gen``)
    by name; ``call(t)`` runs the op on them (a dict in the dtype and on the device under
    test) and returns its output; ``grad`` names the tensors a gradient is checked for;
    ``state`` names tensors the op updates in place (running statistics), checked too."""

    op: str
    name: str
    make: Callable[[torch.Generator], Dict[str, torch.Tensor]]
    call: Callable[[Dict[str, torch.Tensor]], Any]
    grad: Tuple[str, ...]
    state: Tuple[str, ...] = ()
    quick: bool = True
    # the same computation from other public ops, for the float16/bfloat16 baseline on the
    # CPU where the op itself has no CPU path in that dtype (the fused training ops)
    baseline: Optional[Callable[[Dict[str, torch.Tensor]], Any]] = None


def _r(gen: torch.Generator, *shape: int, positive: bool = False) -> torch.Tensor:
    t = torch.rand(shape, generator=gen) + 0.5 if positive else torch.randn(shape, generator=gen)
    return t


def _cases() -> List[Case]:
    ops = slimops.ops
    return [
        Case("conv2d", "3x3 s1 prefix 12->20 of 16->24, bias+scale+shift+residual, relu6",
             lambda g: dict(x=_r(g, 2, 12, 14, 14), w=_r(g, 24, 16, 3, 3), b=_r(g, 24),
                            s=_r(g, 20, positive=True), h=_r(g, 20), r=_r(g, 2, 20, 14, 14)),
             lambda t: ops.conv2d(t["x"], t["w"], t["b"], 20, 1, 1, 1, 1, t["s"], t["h"],
                                  t["r"], "relu6"),
             ("x", "w", "b", "s", "h", "r")),
        Case("conv2d", "1x1 prefix 24->40 of 32->64 (the pointwise layers)",
             lambda g: dict(x=_r(g, 4, 24, 9, 9), w=_r(g, 64, 32, 1, 1)),
             lambda t: ops.conv2d(t["x"], t["w"], None, 40),
             ("x", "w")),
        # One gradient only: a first layer (the image needs none) and a frozen weight; with
        # both needed autograd runs the pair as one op (conv2d_backward), so these are what
        # run the two backward ops there.
        Case("conv2d", "first layer 3x3 s2 prefix 3->16 of 3->24, input without gradient",
             lambda g: dict(x=_r(g, 2, 3, 16, 16), w=_r(g, 24, 3, 3, 3), b=_r(g, 24)),
             lambda t: ops.conv2d(t["x"], t["w"], t["b"], 16, 2, 1, activation="relu"),
             ("w", "b")),
        Case("conv2d", "frozen weight 1x1 prefix 24->40 of 32->64, input gradient only",
             lambda g: dict(x=_r(g, 4, 24, 9, 9), w=_r(g, 64, 32, 1, 1)),
             lambda t: ops.conv2d(t["x"], t["w"], None, 40),
             ("x",)),
        Case("conv2d", "3x3 s2 groups=2 dilation 2, relu",
             lambda g: dict(x=_r(g, 2, 8, 15, 13), w=_r(g, 16, 6, 3, 3), b=_r(g, 16)),
             lambda t: ops.conv2d(t["x"], t["w"], t["b"], 12, 2, 2, 2, 2, activation="relu"),
             ("x", "w", "b"), quick=False),
        Case("depthwise_conv2d", "3x3 s1 prefix 24 of 32, bias+scale+shift+residual, relu6",
             lambda g: dict(x=_r(g, 2, 24, 14, 14), w=_r(g, 32, 1, 3, 3), b=_r(g, 32),
                            s=_r(g, 24, positive=True), h=_r(g, 24), r=_r(g, 2, 24, 14, 14)),
             lambda t: ops.depthwise_conv2d(t["x"], t["w"], t["b"], 1, 1, 1, t["s"], t["h"],
                                            t["r"], "relu6"),
             ("x", "w", "b", "s", "h", "r")),
        Case("depthwise_conv2d", "3x3 s2 prefix 40 of 48",
             lambda g: dict(x=_r(g, 3, 40, 17, 17), w=_r(g, 48, 1, 3, 3)),
             lambda t: ops.depthwise_conv2d(t["x"], t["w"], None, 2, 1),
             ("x", "w")),
        Case("depthwise_conv2d", "5x5 s1 dilation 2",
             lambda g: dict(x=_r(g, 2, 16, 12, 12), w=_r(g, 16, 1, 5, 5)),
             lambda t: ops.depthwise_conv2d(t["x"], t["w"], None, 1, 4, 2),
             ("x", "w"), quick=False),
        Case("linear", "prefix 96->100 of 128->160, bias, 3-D input",
             lambda g: dict(x=_r(g, 3, 5, 96), w=_r(g, 160, 128), b=_r(g, 160)),
             lambda t: ops.linear(t["x"], t["w"], t["b"], 100),
             ("x", "w", "b")),
        Case("batch_norm_act", "training, residual, relu",
             lambda g: dict(x=_r(g, 8, 24, 7, 7) * 2 + 1, gamma=_r(g, 24, positive=True),
                            beta=_r(g, 24), rm=_r(g, 24), rv=_r(g, 24, positive=True),
                            r=_r(g, 8, 24, 7, 7)),
             lambda t: ops.batch_norm_act(t["x"], t["gamma"], t["beta"], t["rm"], t["rv"],
                                          True, 0.1, 1e-5, t["r"], "relu"),
             ("x", "gamma", "beta", "r"), state=("rm", "rv")),
        Case("batch_norm_act", "eval, relu6",
             lambda g: dict(x=_r(g, 4, 24, 7, 7), gamma=_r(g, 24, positive=True),
                            beta=_r(g, 24), rm=_r(g, 24), rv=_r(g, 24, positive=True)),
             lambda t: ops.batch_norm_act(t["x"], t["gamma"], t["beta"], t["rm"], t["rv"],
                                          False, 0.1, 1e-5, None, "relu6"),
             ("x", "gamma", "beta")),
        Case("conv2d_bn_act_train", "3x3 prefix 12->20 of 16->24, BN train, relu6 (fused)",
             lambda g: dict(x=_r(g, 4, 12, 10, 10), w=_r(g, 24, 16, 3, 3),
                            gamma=_r(g, 20, positive=True), beta=_r(g, 20)),
             lambda t: ops.conv2d_bn_act_train(t["x"], t["w"], None, 20, [1, 1], [1, 1],
                                               [1, 1], 1, t["gamma"], t["beta"], 1e-5, None,
                                               2),
             ("x", "w", "gamma", "beta"),
             baseline=lambda t: ops.batch_norm_act(ops.conv2d(t["x"], t["w"], None, 20, 1, 1),
                                                   t["gamma"], t["beta"], None, None, True,
                                                   activation="relu6")),
        Case("depthwise_conv2d_bn_act_train", "3x3 s2 prefix 24 of 32, BN train, relu6 (fused)",
             lambda g: dict(x=_r(g, 4, 24, 11, 11), w=_r(g, 32, 1, 3, 3),
                            gamma=_r(g, 24, positive=True), beta=_r(g, 24)),
             lambda t: ops.depthwise_conv2d_bn_act_train(t["x"], t["w"], None, [2, 2],
                                                         [1, 1], [1, 1], t["gamma"],
                                                         t["beta"], 1e-5, None, 2),
             ("x", "w", "gamma", "beta"),
             baseline=lambda t: ops.batch_norm_act(ops.depthwise_conv2d(t["x"], t["w"], None,
                                                                        2, 1),
                                                   t["gamma"], t["beta"], None, None, True,
                                                   activation="relu6")),
    ]


class _OpRecorder(TorchDispatchMode):
    """Records the ``slimops::`` ops that reach the dispatcher (backward ops included)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("slimops::"):
            self.seen.add(name.split("::", 1)[1])
        return func(*args, **(kwargs or {}))


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_case(case: Case, inputs: Dict[str, torch.Tensor], device: str,
              dtype: Optional[torch.dtype], autocast: Optional[torch.dtype],
              grad_out: torch.Tensor, baseline: bool = False) -> Dict[str, torch.Tensor]:
    """The case's output, gradients and updated state, on ``device``: tensors in ``dtype``
    (None: float32 inputs under autocast to ``autocast``); ``baseline``: run the case's
    ``baseline`` composition instead of its op."""
    call = case.baseline if baseline and case.baseline is not None else case.call
    t = {k: v.to(device=device, dtype=dtype or torch.float32) for k, v in inputs.items()}
    for k in case.grad:
        t[k].requires_grad_()
    if autocast is not None:
        with torch.autocast(device_type=device, dtype=autocast):
            out = _first(call(t))
    else:
        out = _first(call(t))
    grads = torch.autograd.grad(out, [t[k] for k in case.grad], grad_out.to(device, out.dtype))
    result = {"out": out.detach()}
    result.update({f"grad.{k}": g for k, g in zip(case.grad, grads)})
    result.update({f"state.{k}": t[k].detach() for k in case.state})
    return result


def _errors(got: torch.Tensor, expected: torch.Tensor, tol: float) -> Tuple[float, float]:
    """The largest |difference| relative to the expected tensor's largest magnitude, and the
    share of elements whose relative difference exceeds ``tol``."""
    diff = (got.detach().to("cpu", torch.float64) - expected).abs()
    if not diff.numel():
        return 0.0, 0.0
    rel = diff / max(float(expected.abs().max()), 1e-6)
    return float(rel.max()), float((rel > tol).double().mean())


def _compare(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
             baseline: Optional[torch.Tensor]) -> Dict[str, Any]:
    """Whether ``got`` is close enough to the float64 ``expected``.

    float32: the largest relative error within ``TOLERANCE``. float16/bfloat16 are held to
    what plain PyTorch achieves in the same dtype (``baseline``: the same computation on the
    CPU's reference path in that dtype): an error within ``max(TOLERANCE, 2 x baseline's)``;
    or at most ``OUTLIER_SHARE`` of the elements above ``TOLERANCE``: where rounding moves a
    value across an activation's kink (0, or 6 for ReLU6) the gradient mask flips and that
    element's gradient differs by its whole size, which is rounding, not a wrong kernel, and
    which elements flip differs between two correct implementations.
    """
    tol = TOLERANCE[dtype]
    err, share = _errors(got, expected, tol)
    finite = bool(torch.isfinite(got).all())
    if dtype == torch.float32 or dtype == torch.float64:
        return {"error": err, "outliers": share, "bound": tol, "ok": finite and err <= tol}
    base = _errors(baseline, expected, tol)[0] if baseline is not None else None
    bound = max(tol, 2 * base) if base is not None else tol
    return {"error": err, "outliers": share, "bound": bound, "baseline_error": base,
            "ok": finite and (err <= bound or share <= OUTLIER_SHARE)}


@dataclass
class CheckRow:
    op: str
    case: str
    dtype: str  # "fp16", or "autocast-fp16" (float32 inputs under autocast)
    kernels: str  # the CUDA implementation choice the check ran under
    error: float  # largest over the output, the gradients and the updated state
    tolerance: float
    ok: bool
    out_dtype: str
    worst: str = ""  # which tensor had the largest error
    outliers: float = 0.0  # that tensor's share of elements above the tolerance
    bound: float = 0.0  # the error allowed for that tensor (see _compare)
    baseline_error: Optional[float] = None  # plain PyTorch's error there, same dtype (CPU)
    note: str = ""


def run_op_checks(device: str, quick: bool, kernels: str = "triton",
                  deadline: Optional[float] = None) -> Tuple[List[CheckRow], set]:
    """Every case in every dtype (and under autocast) on ``device`` against the CPU float64
    result. Returns the rows and the names of the slimops ops that ran. Past ``deadline``
    (``time.monotonic()``) the remaining checks are recorded as not run (failed: a check
    that did not run did not pass)."""
    rows: List[CheckRow] = []
    recorder = _OpRecorder()
    casts = slimops.ops.autocast.registered(device)  # the ops autocast casts on ``device``
    settings = [(name, dt, None) for name, dt in DTYPES.items()]
    settings += [(f"autocast-{name}", None, DTYPES[name]) for name in ("fp16", "bf16")]
    for case in _cases():
        if quick and not case.quick:
            continue
        master = case.make(torch.Generator().manual_seed(0))
        for label, dtype, amp in settings:
            if amp is not None and device == "cpu" and amp == torch.float16:
                continue  # CPU autocast is bfloat16; slimops' ops are not cast on the CPU
            # the dtype the op computes in: autocast's where slimops' ops are cast there
            eff = dtype if amp is None else (amp if case.op in casts else torch.float32)
            if device == "cpu" and case.op in FUSED_OPS and eff != torch.float32:
                continue  # CUDA-only ops: on the CPU they run the float32/float64 kernels
            if deadline is not None and time.monotonic() > deadline:
                rows.append(CheckRow(case.op, case.name, label, kernels, float("nan"),
                                     TOLERANCE[eff], False, "-",
                                     note="not run: time budget"))
                continue
            rounded = {k: v.to(eff) for k, v in master.items()}
            grad_out = _grad_out(case, master, torch.Generator().manual_seed(1))
            expected = _run_case(case, {k: v.double() for k, v in rounded.items()}, "cpu",
                                 torch.float64, None, grad_out.to(eff).double())
            note = ""
            try:
                with recorder:
                    got = _run_case(case, rounded if amp is None else master, device,
                                    dtype, amp, grad_out.to(eff).float())
            except Exception as exc:  # a crash is a failed check, with its message
                rows.append(CheckRow(case.op, case.name, label, kernels, float("inf"),
                                     TOLERANCE[eff], False, "-", note=f"{type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:200]}"))
                continue
            baseline: Dict[str, torch.Tensor] = {}
            if eff in (torch.float16, torch.bfloat16):
                try:  # plain PyTorch in the same dtype on the CPU (the reference path)
                    baseline = _run_case(case, rounded, "cpu", eff, None,
                                         grad_out.to(eff).float(), baseline=True)
                except Exception:  # noqa: BLE001  (no baseline: the fixed tolerance alone)
                    baseline = {}
            results = {k: _compare(got[k], expected[k], eff, baseline.get(k)) for k in expected}
            failing = [k for k in results if not results[k]["ok"]]
            worst = max(failing or results, key=lambda k: results[k]["error"])
            out_dtype = got["out"].dtype
            ok = all(r["ok"] for r in results.values())
            if out_dtype != eff:
                ok, note = False, f"output dtype {out_dtype}, expected {eff}"
            state_dtypes = {got[k].dtype for k in got if k.startswith("state.")}
            if state_dtypes - {dtype or torch.float32}:
                ok, note = False, f"running statistics became {sorted(map(str, state_dtypes))}"
            w = results[worst]
            rows.append(CheckRow(case.op, case.name, label, kernels, w["error"], TOLERANCE[eff],
                                 ok, str(out_dtype).replace("torch.", ""), worst,
                                 w["outliers"], w["bound"], w.get("baseline_error"), note))
    return rows, recorder.seen


def _grad_out(case: Case, master: Dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """A fixed random output gradient of the case's output shape (float32, CPU)."""
    shape = _first(case.call({k: v.clone() for k, v in master.items()})).shape
    return torch.randn(shape, generator=gen)


# ------------------------------------------------------------------------------------------
# model timings


@dataclass
class TimingRow:
    batch: int
    width: float
    variant: str
    median_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    rounds: int = 0
    max_rel_diff_vs_dense: Optional[float] = None  # slimops variants: output vs dense
    skipped: str = ""


VARIANTS = ("slimops", "slimops-autocast", "reference", "dense")


def time_model(device: str, dtype: torch.dtype, widths: Sequence[float], batches: Sequence[int],
               rounds: int, warmup: int, image_size: int, deadline: float,
               extra_variants: Dict[str, Callable[[], None]] = None) -> List[TimingRow]:
    """S-MobileNet v2 per width and batch, every variant; cells past ``deadline``
    (``time.monotonic()``) are recorded as skipped. ``extra_variants``: more slimops runs,
    ``{name: switch}`` where ``switch()`` selects them (e.g. the CUDA C++ kernels) and the
    default is restored after."""
    torch.manual_seed(0)
    base = slimops.create_model(MODEL, widths=tuple(widths)).eval()
    cl = torch.channels_last
    slim = copy.deepcopy(base).to(device, dtype)  # weights contiguous: the kernels' layout
    amp = copy.deepcopy(base).to(device)  # float32, run under autocast
    ref = reference_style(copy.deepcopy(base).to(device, dtype).to(memory_format=cl))
    rows: List[TimingRow] = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for batch in batches:
        x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator()
                        .manual_seed(batch)).to(device, dtype).contiguous(memory_format=cl)
        for width in widths:
            dense = dense_eager(base, width).to(device, dtype).to(memory_format=cl)
            runs: Dict[str, Callable[[], torch.Tensor]] = {}
            slimops.set_width(slim, width)
            slimops.set_width(amp, width)
            slimops.set_width(ref, width)
            runs["slimops"] = lambda: slim(x)
            runs["slimops-autocast"] = lambda: _autocast_run(amp, x.float(), device, dtype)
            runs["reference"] = lambda: ref(x)
            runs["dense"] = lambda: dense(x)
            order = list(VARIANTS) + list(extra_variants or {})
            with torch.inference_mode():
                dense_out = dense(x).double().cpu()
                for variant in order:
                    row = TimingRow(batch, width, variant)
                    rows.append(row)
                    if time.monotonic() > deadline:
                        row.skipped = "time budget"
                        continue
                    switch = (extra_variants or {}).get(variant)
                    fn = runs.get(variant, runs["slimops"])
                    try:
                        if switch is not None:
                            switch(True)
                        out = fn()
                        sync()
                        if variant.startswith("slimops"):
                            diff = (out.double().cpu() - dense_out).abs().max()
                            row.max_rel_diff_vs_dense = float(diff) / max(
                                float(dense_out.abs().max()), 1e-6)
                        times = time_calls(fn, rounds, warmup, device=device, scale=1e3)
                    except Exception as exc:
                        row.skipped = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        continue
                    finally:
                        if switch is not None:
                            switch(False)
                    s = summarize(times)
                    row.median_ms, row.p90_ms, row.rounds = s.median, s.p90, len(times)
    return rows


def _autocast_run(model: torch.nn.Module, x: torch.Tensor, device: str,
                  dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return model(x)
    with torch.autocast(device_type=device, dtype=dtype):
        return model(x)


# ------------------------------------------------------------------------------------------
# report


@dataclass
class Report:
    settings: Dict[str, Any]
    environment: Dict[str, Any]
    checks: List[CheckRow] = field(default_factory=list)
    ops_run: List[str] = field(default_factory=list)
    ops_not_run: List[str] = field(default_factory=list)
    timings: List[TimingRow] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks) and not self.ops_not_run

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(report: Report) -> str:
    """The report's tables: the checks, then the timings (median ms, p90) per batch and
    width with slimops' ratios to the dense network and to the reference style."""
    s, env = report.settings, report.environment
    lines = [f"# slimops GPU check: {env.get('device_name', s['device'])}", "",
             f"device {s['device']}, torch {env['torch']}, triton {env.get('triton') or '-'}, "
             f"slimops {env['slimops']}, CUDA kernels: {env.get('cuda_kernels')}; "
             f"{'quick, ' if s['quick'] else ''}{report.elapsed_s:.0f} s; "
             f"**{'PASSED' if report.passed else 'FAILED'}**", ""]
    if s["device"] == "cpu":
        lines += ["Dry run on the CPU: these are not GPU results.", ""]
    lines += ["## Ops against the CPU (float64) on the same rounded inputs", "",
              "error: the largest |difference| relative to the expected tensor's largest "
              "magnitude, for the worst of the output, the gradients and the running "
              "statistics (the first failing one, if any). float32 passes with error <= "
              "bound (the tolerance). float16/bfloat16: bound = max(tolerance, 2 x the error "
              "of plain PyTorch in that dtype on the CPU: baseline); or at most "
              f"{OUTLIER_SHARE:.1%} of the elements above the tolerance (outliers: "
              "activation masks flipped by rounding).", "",
              "| op | case | dtype | kernels | out dtype | error (tensor) | bound | baseline "
              "| outliers | ok | note |",
              "|---|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for c in report.checks:
        base = "-" if c.baseline_error is None else f"{c.baseline_error:.2e}"
        lines.append(f"| {c.op} | {c.case} | {c.dtype} | {c.kernels} | {c.out_dtype} | "
                     f"{c.error:.2e} ({c.worst}) | {c.bound:.1e} | {base} | {c.outliers:.2%} | "
                     f"{'yes' if c.ok else '**NO**'} | {c.note} |")
    lines += ["", f"slimops ops run: {', '.join(report.ops_run) or '-'}",
              f"not run: {', '.join(report.ops_not_run) or 'none'}", ""]
    variants = list(dict.fromkeys(t.variant for t in report.timings))
    if variants:
        lines += [f"## {MODEL}, {s['dtype']}, channels_last input, eval: median ms (p90)", "",
                  "| batch | width | " + " | ".join(variants)
                  + " | slimops / dense | slimops / reference | slimops vs dense output |",
                  "|---:|---:|" + "---:|" * (len(variants) + 3)]
        cells: Dict[Tuple[int, float], Dict[str, TimingRow]] = {}
        for t in report.timings:
            cells.setdefault((t.batch, t.width), {})[t.variant] = t
        for (batch, width), row in cells.items():
            def med(v: str) -> Optional[float]:
                return row[v].median_ms if v in row else None

            texts = [(f"{row[v].median_ms:.3f} ({row[v].p90_ms:.3f})" if med(v) is not None
                      else f"skipped: {row[v].skipped}" if v in row else "-") for v in variants]
            ratio = lambda a, b: (f"{a / b:.2f}" if a is not None and b else "-")  # noqa: E731
            diff = row.get("slimops")
            lines.append(f"| {batch} | {width} | " + " | ".join(texts) + " | "
                         + ratio(med("slimops"), med("dense")) + " | "
                         + ratio(med("slimops"), med("reference")) + " | "
                         + (f"{diff.max_rel_diff_vs_dense:.1e}"
                            if diff and diff.max_rel_diff_vs_dense is not None else "-") + " |")
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: str) -> Tuple[str, str]:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "gpu_check.json")
    md_path = os.path.join(out_dir, "gpu_check.md")
    with open(json_path, "w") as f:
        json.dump(report.to_json(), f, indent=1, default=str)
    with open(md_path, "w") as f:
        f.write(markdown(report))
    return json_path, md_path


# ------------------------------------------------------------------------------------------
# main


def _environment(device: str) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "torch": torch.__version__, "slimops": slimops.__version__,
        "python": platform.python_version(), "backend": slimops.backend_info(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["cuda_kernels"] = env["backend"]["cuda_kernels"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json / .md")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: fewer cases, the extreme widths, batch 1, few rounds")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of the script's logic (not a GPU result)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="for the timings")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="default: 1 32 (quick: 1)")
    p.add_argument("--widths", type=float, nargs="+", default=None,
                   help="default: the model's widths (quick: the smallest and the largest)")
    p.add_argument("--rounds", type=int, default=None, help="timed calls (default 50; quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default 10; quick 2)")
    p.add_argument("--cuda-kernels", choices=("triton", "both"), default="both",
                   help="both: also check and time the extension's CUDA C++ kernels where "
                        "the build has them (slimops.ops.use_cuda_cpp_kernels)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting timing cells after this many seconds")
    p.add_argument("--skip-timings", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE.format(torch=torch.__version__), file=sys.stderr)
        return EXIT_NO_GPU
    start = time.monotonic()
    deadline = start + args.budget_s
    widths_all = slimops.model_widths(slimops.create_model(MODEL))
    widths = tuple(args.widths or ((widths_all[0], widths_all[-1]) if args.quick
                                   else widths_all))
    batches = args.batches or ([1] if args.quick else [1, 32])
    rounds = args.rounds or (5 if args.quick else 50)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    settings = dict(device=args.device, quick=args.quick, dtype=args.dtype,
                    image_size=args.image_size, widths=list(widths), batches=batches,
                    rounds=rounds, warmup=warmup, budget_s=args.budget_s,
                    cuda_kernels=args.cuda_kernels, tf32_in_checks=False,
                    tolerance={str(k).replace("torch.", ""): v for k, v in TOLERANCE.items()})
    report = Report(settings, _environment(args.device))
    print(f"gpu_check on {report.environment['device_name']} ({args.device}); "
          f"torch {torch.__version__}; CUDA kernels {report.environment['cuda_kernels']}",
          flush=True)

    # the CUDA C++ kernels, where the build has them (opt-in: slimops.ops.use_cuda_cpp_kernels)
    cpp_ops: List[str] = []
    if args.device == "cuda" and args.cuda_kernels == "both":
        cpp_ops = sorted(op for op, k in slimops.ops.use_cuda_cpp_kernels(True).items()
                         if k == "cuda")
        slimops.ops.use_cuda_cpp_kernels(False)
    report.environment["cuda_cpp_kernel_ops"] = cpp_ops

    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        # the checks may take most of the budget, not all: the timings need some too
        checks_deadline = start + 0.75 * args.budget_s
        rows, seen = run_op_checks(args.device, args.quick,
                                   "triton" if args.device == "cuda" else "cpu",
                                   checks_deadline)
        if cpp_ops:
            slimops.ops.use_cuda_cpp_kernels(True)
            try:
                more, seen_cpp = run_op_checks(args.device, args.quick, "cuda+triton",
                                               checks_deadline)
            finally:
                slimops.ops.use_cuda_cpp_kernels(False)
            rows += more
            seen |= seen_cpp
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    report.checks = rows
    report.ops_run = sorted(seen)
    report.ops_not_run = sorted((set(FAMILY_OF) | set(FUSED_OPS)) - seen)
    failed = [c for c in rows if not c.ok]
    print(f"op checks: {len(rows) - len(failed)}/{len(rows)} passed"
          + (f"; ops not run: {report.ops_not_run}" if report.ops_not_run else "")
          + f" ({time.monotonic() - start:.0f} s)", flush=True)
    for c in failed:
        print(f"  FAILED {c.op} [{c.case}] {c.dtype} {c.kernels}: error {c.error:.2e} "
              f"> {c.tolerance:.0e} ({c.worst}) {c.note}", flush=True)

    if not args.skip_timings:
        extra = {}
        if cpp_ops:
            extra["slimops[cuda-cpp]"] = lambda on: slimops.ops.use_cuda_cpp_kernels(on)
        report.timings = time_model(args.device, DTYPES[args.dtype], widths, batches, rounds,
                                    warmup, args.image_size, deadline, extra)
    report.elapsed_s = time.monotonic() - start
    json_path, md_path = write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}; {'PASSED' if report.passed else 'FAILED'} "
          f"in {report.elapsed_s:.0f} s")
    return EXIT_OK if report.passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
