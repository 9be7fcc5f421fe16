"""Timing a callable: ``warmup`` untimed calls, then ``repeats`` timed ones, one clock read
right before and one right after each; the per-call times, and their median and 90th
percentile.

The one timing loop of the project: ``LatencyTable.measure`` (slimops.deploy),
``profile(latency=True)`` (slimops.profile, and through it the demo), bench/switch_cost.py
and examples/serve_widths.py all call ``time_calls``::

    times_ms = time_calls(lambda: model(x), repeats=20, warmup=3, device=x.device, scale=1e3)
    s = summarize(times_ms)          # s.median, s.p90

On a CUDA device (``device=``) each timed call is bracketed by ``torch.cuda.synchronize``:
a forward returns before its kernels have run, so without it the clock would read the
launch, not the work. ``clock`` is injectable (a fake one makes tests deterministic: it is
read exactly twice per timed call and never during warm-up). ``setup`` runs before each
timed call, outside the timed region (e.g. switch to another width first).

Why not ``torch.utils.benchmark.Timer`` (checked against torch 2.13's source and by running
it):

* ``Timer.timeit(number)`` returns one mean over ``number`` calls and runs
  ``max(number // 100, 2)`` untimed warm-up calls of its own on every call: timing single
  calls with ``timeit(1)`` ran the statement 3 times per timed call. ``Timer.repeat`` raises
  ``NotImplementedError``.
* ``blocked_autorange`` / ``adaptive_autorange`` decide how many calls to run from what the
  clock reads, and return per-block means: no fixed ``warmup + repeats`` count (recorded in
  a latency table's metadata) and no per-call times to take a 90th percentile of. With a
  fake clock (every read +1 ms, what tests/test_deploy.py injects) its block-size estimate
  never finds the overhead negligible and multiplies the block up towards 2**31 calls: it
  ran for more than 20 s before it was killed.
* It synchronises accelerators only inside its default clock (and then on any available
  accelerator, whatever the statement runs on); an injected clock gets no synchronisation.

So: one plain loop, tested (tests/test_timing.py). The percentile is ``numpy.percentile``'s
default linear interpolation (position ``(n - 1) * q / 100`` between the sorted
neighbours), the definition the latency tables have always used.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["Summary", "check_counts", "percentile", "summarize", "synchronizer", "time_calls"]


def check_counts(warmup: int, repeats: int) -> None:
    """``ValueError`` unless ``warmup`` is an int >= 0 and ``repeats`` an int >= 1."""
    for name, v, lo in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def synchronizer(device: Union[torch.device, str, None]) -> Callable[[], None]:
    """What makes a timed region wait for ``device``: ``torch.cuda.synchronize(device)`` on
    a CUDA device (kernels run asynchronously), nothing elsewhere (CPU, None)."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 0, *,
               device: Union[torch.device, str, None] = None,
               clock: Callable[[], float] = time.perf_counter,
               setup: Optional[Callable[[], Any]] = None,
               scale: float = 1.0) -> List[float]:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; return the
    ``repeats`` per-call times, ``(after - before) * scale`` in ``clock``'s unit (seconds
    for the default ``time.perf_counter``; ``scale=1e3``: milliseconds).

    Args:
        device: where ``fn`` runs; a CUDA device is synchronised before the first clock
            read and again after ``fn`` returns, before the second (not during warm-up;
            nothing on other devices).
        clock: a clock (tests pass a fake one); read twice per timed call, never otherwise.
        setup: called before each timed call (after warm-up), outside the timed region.
    Raises:
        ValueError: ``warmup`` / ``repeats`` are not ints >= 0 / >= 1.
    """
    check_counts(warmup, repeats)
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        sync()
        t0 = clock()
        fn()
        sync()  # a CUDA call returns before it has run
        times.append((clock() - t0) * scale)
    return times


def percentile(times: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``times``, linear interpolation between the
    sorted neighbours of position ``(n - 1) * q / 100`` (``numpy.percentile``'s default)."""
    if len(times) == 0:
        raise ValueError("percentile of no times")
    return float(np.percentile(np.asarray(times, dtype=np.float64), q))


@dataclass(frozen=True)
class Summary:
    """The median and 90th percentile of some per-call times (their unit)."""

    median: float
    p90: float


def summarize(times: Sequence[float]) -> Summary:
    """``Summary(median, p90)`` of ``times`` (``statistics.median``; ``percentile(times, 90)``)."""
    if len(times) == 0:
        raise ValueError("summary of no times")
    return Summary(statistics.median(times), percentile(times, 90))
