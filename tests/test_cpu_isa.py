"""The C++ kernels' vectorised loops are compiled per instruction set and picked at run time
(csrc/cpu/isa.h); every path is tested here, capped with SLIMOPS_CPU_ISA in a subprocess that
runs the op tests of the kernels that have per-ISA loops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import slimops

HAS_C = slimops.backend_info()["cpu"] == "C++"
ORDER = ["base", "avx2", "avx512"]
TESTS = Path(__file__).parent
# The op tests of the kernels with per-ISA loops.
PER_ISA = ["test_ops_depthwise_conv2d.py", "test_ops_conv2d.py", "test_ops_conv2d_direct.py",
           "test_ops_conv2d_winograd.py", "test_ops_conv2d_narrow.py", "test_ops_max_pool.py",
           "test_ops_depthwise_rows.py",
           "test_ops_batch_norm_act.py", "test_ops_non_finite.py"]


def _run(isa: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SLIMOPS_CPU_ISA=isa)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          cwd=TESTS.parent, timeout=600)


@pytest.mark.skipif(not HAS_C, reason="needs the compiled extension")
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_cap_is_reported_and_every_op_test_passes_on_that_path(isa):
    best = slimops.backend_info()["cpu_isa"]
    if ORDER.index(isa) >= ORDER.index(best):
        pytest.skip(f"the CPU's best is {best}: the main run already tests it")
    got = _run(isa, "-c", "import slimops; print(slimops.backend_info()['cpu_isa'])")
    assert got.stdout.strip() == isa, got.stderr
    result = _run(isa, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  *[str(TESTS / t) for t in PER_ISA])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(not HAS_C, reason="needs the compiled extension")
def test_an_unknown_or_higher_cap_keeps_the_cpus_best():
    best = slimops.backend_info()["cpu_isa"]
    for cap in ("nonsense", "avx512"):
        got = _run(cap, "-c", "import slimops; print(slimops.backend_info()['cpu_isa'])")
        assert got.stdout.strip() == best, got.stderr
