"""slimops.timing: the one timing loop (warm-up, timed calls, CUDA synchronisation, an
injectable clock) and its summary; deterministic with a fake clock (no timing asserted)."""

import itertools
import math

import numpy as np
import pytest
import torch

from slimops.timing import Summary, percentile, summarize, synchronizer, time_calls


def _fake_clock(step_s: float = 0.001, log=None):
    ticks = itertools.count()

    def clock():
        t = next(ticks) * step_s
        if log is not None:
            log.append("clock")
        return t
    return clock


def test_counts_and_fake_clock():
    calls = []
    times = time_calls(lambda: calls.append(1), repeats=5, warmup=3, clock=_fake_clock())
    assert len(calls) == 8
    # the clock is read twice per timed call only: each call spans exactly one tick
    assert times == pytest.approx([0.001] * 5)


def test_scale_gives_milliseconds_exactly_as_before():
    # (after - before) * scale, the expression the latency table has always used
    clock = _fake_clock(0.0013)
    times = time_calls(lambda: None, repeats=3, clock=clock, scale=1e3)
    expected = [(b * 0.0013 - a * 0.0013) * 1e3 for a, b in ((0, 1), (2, 3), (4, 5))]
    assert times == expected


def test_order_of_setup_sync_clock_and_call(monkeypatch):
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync", device)))
    time_calls(lambda: log.append("fn"), repeats=2, warmup=1, device="cuda:0",
               clock=_fake_clock(log=log), setup=lambda: log.append("setup"))
    cuda0 = ("sync", torch.device("cuda", 0))
    one = ["setup", cuda0, "clock", "fn", cuda0, "clock"]
    assert log == ["fn"] + one + one  # warm-up: no setup, no sync, no clock


def test_synchronizer_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronizer(torch.device("cuda", 0))()
    assert calls == [torch.device("cuda", 0)]
    synchronizer(torch.device("cpu"))()
    synchronizer(None)()
    synchronizer("cpu")()
    assert len(calls) == 1
    time_calls(lambda: None, repeats=3, device="cpu")
    assert len(calls) == 1


@pytest.mark.parametrize("kwargs", [dict(repeats=0), dict(repeats=1.0), dict(repeats=True),
                                    dict(repeats=2, warmup=-1), dict(repeats=2, warmup=None)])
def test_bad_counts(kwargs):
    with pytest.raises(ValueError, match="must be an int"):
        time_calls(lambda: None, **kwargs)


def _reference_percentile(values, q):
    # what slimops/deploy.py computed before (linear interpolation)
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def test_percentile_is_linear_interpolation():
    assert percentile([5.0], 90) == 5.0
    assert percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert percentile(list(range(11)), 90) == 9.0
    assert percentile([3.0, 1.0, 2.0, 10.0], 50) == pytest.approx(2.5)
    rng = np.random.default_rng(0)
    for n in range(1, 40):
        xs = rng.lognormal(size=n).tolist()
        for q in (0, 10, 50, 90, 100):
            assert percentile(xs, q) == pytest.approx(_reference_percentile(xs, q), rel=1e-12)


def test_summarize():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s == Summary(2.5, pytest.approx(3.7))
    assert summarize([1.0, 1.0]) == Summary(1.0, 1.0)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        percentile([], 90)
