"""What every benchmark module shares: the round policy, models built once, tagging.

Round policy: one untimed warm-up call, one timed call to estimate the cost, then
``benchmark.pedantic`` with ``rounds = clamp(budget_s / estimate, min_rounds, max_rounds)``
rounds of one call each (so a 50 us layer gets hundreds of rounds and ResNet-50 at batch 8 a
handful, and the whole suite stays within minutes on 2 cores). Reports use the median.

Contention: a 2-core machine shared with other work gives inflated and erratic timings
(an OpenMP region waits for its descheduled worker thread). Each benchmark records the
share of time its threads were runnable but waiting for a CPU while it was timed (the
kernel's per-thread ``schedstat``, nanosecond resolution); the report flags rows above 5%.
Before timing, ``measure`` waits (bounded) for contention to pass.

Every benchmark is tagged in ``extra_info`` with ``suite`` (``layer`` / ``model`` /
``train``), ``subject`` (layer or model name), ``batch``, ``width`` and ``variant``: the
report groups on those, not on test names.
"""

from __future__ import annotations

import math
import os
import platform
import time
from functools import lru_cache
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch

from torch.profiler import ProfilerActivity, profile

from slimops.models import MODELS

# (budget_s, min_rounds, max_rounds) per suite; quick: a smoke run.
ROUNDS = {
    "layer": (0.3, 10, 300),
    "model": (1.0, 5, 100),
    "train": (4.0, 3, 10),
}
QUICK_ROUNDS = (0.05, 1, 3)
# Above this share of time waiting for a CPU a timing counts as contended (the report's flag).
CONTENDED = 0.05
QUIET_WAIT = float(os.environ.get("SLIMOPS_BENCH_QUIET_WAIT", "30"))
QUIET_BUDGET = float(os.environ.get("SLIMOPS_BENCH_QUIET_BUDGET", "120"))
_SESSION = {"waited_s": 0.0}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def full(value: Any) -> Any:
    """A parameter value only used in the full run (deselected by ``--bench-quick``)."""
    return pytest.param(value, marks=pytest.mark.full)


def tag(benchmark, suite: str, subject: str, batch: int, width: float, variant: str,
        **extra: Any) -> None:
    benchmark.group = (f"{suite} {subject} batch {batch} width {width:g}" if suite != "train"
                       else f"train {subject} batch {batch}")
    benchmark.extra_info.update(suite=suite, subject=subject, batch=batch, width=width,
                                variant=variant, **extra)


def _sched_snapshot() -> Optional[Tuple[int, int]]:
    """(ns on a CPU, ns runnable but waiting for a CPU), summed over this process's threads
    (``/proc/<pid>/task/*/schedstat``), or None where the kernel does not provide it."""
    run = wait = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    found = False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                r, w = f.read().split()[:2]
        except (OSError, ValueError):
            continue  # a thread that just ended
        run, wait, found = run + int(r), wait + int(w), True
    return (run, wait) if found else None


def cpu_wait(before, after) -> Optional[float]:
    """Share (0..1) of the time this process's threads wanted a CPU but waited for one,
    between two ``_sched_snapshot``s: the contention a timing was taken under (0 on an
    otherwise idle machine)."""
    if before is None or after is None:
        return None
    run, wait = after[0] - before[0], after[1] - before[1]
    if run <= 0 or wait < 0:
        return None
    return wait / (run + wait)


def _probe(fn: Callable[..., Any], args: tuple, min_s: float = 0.05) -> Tuple[float, Optional[float]]:
    """Call ``fn(*args)`` for at least ``min_s``: (seconds per call, ``cpu_wait`` share)."""
    before, t0, calls = _sched_snapshot(), time.perf_counter(), 0
    while True:
        fn(*args)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return elapsed / calls, cpu_wait(before, _sched_snapshot())


def measure(benchmark, fn: Callable[..., Any], *args: Any, suite: str, quick: bool) -> None:
    """Time ``fn(*args)`` with the round policy above.

    Before timing, a probe checks for contention; while the benchmark's threads wait for a
    CPU more than ``CONTENDED`` of the time it sleeps and probes again, up to
    ``SLIMOPS_BENCH_QUIET_WAIT`` seconds per benchmark (default 30) and
    ``SLIMOPS_BENCH_QUIET_BUDGET`` seconds per session (default 120; 0 disables waiting),
    so short bursts of other work (a test run, a build) do not land in the timings. Recorded
    in ``extra_info``: ``cpu_wait`` (the share measured over the timed rounds, see
    ``cpu_wait``) and ``quiet_wait_s`` (how long it waited).
    """
    budget, lo, hi = QUICK_ROUNDS if quick else ROUNDS[suite]
    fn(*args)  # warm-up: first-call allocations, oneDNN primitive creation, JIT profiling
    estimate, share = _probe(fn, args)
    start = time.perf_counter()
    while share is not None and share > CONTENDED and not quick:
        waited = time.perf_counter() - start
        if waited >= QUIET_WAIT or _SESSION["waited_s"] + waited >= QUIET_BUDGET:
            break
        time.sleep(1.0)
        estimate, share = _probe(fn, args)
    waited = time.perf_counter() - start
    _SESSION["waited_s"] += waited
    rounds = max(lo, min(hi, math.ceil(budget / max(estimate, 1e-6))))
    benchmark.extra_info["rounds"] = rounds
    benchmark.extra_info["quiet_wait_s"] = round(waited, 1)
    before = _sched_snapshot()
    benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=0)
    share = cpu_wait(before, _sched_snapshot())
    if share is not None:
        benchmark.extra_info["cpu_wait"] = round(share, 3)


@lru_cache(maxsize=None)
def eval_model(name: str, widths: tuple = ()) -> torch.nn.Module:
    """``MODELS[name]`` (default widths unless given), eval mode, seeded; built once per
    session and shared by all variants (the reference style shares its Parameters)."""
    torch.manual_seed(0)
    kwargs: Dict[str, Any] = {"widths": widths} if widths else {}
    return MODELS[name](**kwargs).eval()


@lru_cache(maxsize=None)
def reference_model(name: str, widths: tuple = ()) -> torch.nn.Module:
    from baselines import reference_style

    return reference_style(eval_model(name, widths))


def peak_step_bytes(step) -> int:
    """Peak live bytes of the tensors allocated while ``step()`` runs.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation (+bytes) and
    free (-bytes) of PyTorch's CPU allocator; summed in time order they give the live bytes
    of what the step allocated, whose maximum is returned. Blocks allocated before the step
    are not counted (their frees carry no size and are skipped), nor is memory that oneDNN or
    BLAS allocate outside PyTorch's allocator.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak
