"""Extreme convolution geometry (strides, paddings, dilations near 2^31, 2^62, 2^63 - 1) never
crashes an op and never returns a wrong result: each call raises or equals slimops.reference.

The calls run in subprocesses (tests/fuzz_geometry.py), so a segfault fails the test with the
seed that found it instead of killing the suite. Fixed seeds: the same calls on every run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import slimops

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(slimops.backend_info()["cpu"] != "C++",
                                reason="needs the compiled extension slimops._C")


@pytest.mark.parametrize("seed", range(8))
def test_extreme_geometry_raises_or_matches_the_reference(seed):
    calls = 200
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_geometry.py"), str(seed),
                           str(calls)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (f"seed {seed}: the fuzz process died (rc {proc.returncode})"
                                  f"\n{proc.stderr[-3000:]}")
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["calls"] == calls
    assert counts["mismatched"] == 0, "\n".join(counts["failures"][:20])
    # The fuzz reaches both outcomes: ordinary geometry computes, extreme geometry is refused.
    assert counts["matched"] >= calls // 5 and counts["raised"] >= calls // 5, counts
