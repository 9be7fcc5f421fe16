"""Benchmarks state the settings they run under: threads, allocator, backend, machine load.

Options (also passed by ``python -m slimops bench``):

* ``--bench-quick``: a smoke run: the smallest and largest width, batch 1, a few rounds,
  a small training input (tests marked ``full`` are deselected). Not a result.

Environment:

* ``SLIMOPS_BENCH_THREADS=N``: ``torch.set_num_threads(N)`` before anything runs (default:
  torch's default, one per core).
* ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``LD_PRELOAD``: read by the
  allocator at process start; reported, never changed here.

The same settings go into the pytest-benchmark JSON (``machine_info["slimops"]``), with the
load average at the start and at the end of the run, for the report.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from benchutil import cpu_model

_START = {"time": time.time(), "loadavg": None, "code": None}


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", default=False,
                     help="slimops smoke run: extreme widths, batch 1, few rounds")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: only in the full benchmark run (not --bench-quick)")
    threads = os.environ.get("SLIMOPS_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    _START["time"] = time.time()
    _START["loadavg"] = _loadavg()
    _START["code"] = _code_state()


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--bench-quick"):
        return
    keep = [it for it in items if it.get_closest_marker("full") is None]
    dropped = [it for it in items if it.get_closest_marker("full") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """True in a ``--bench-quick`` smoke run."""
    return bool(request.config.getoption("--bench-quick"))


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _code_state() -> dict:
    """What is being measured, taken at the start (pytest-benchmark's commit_info is taken
    at the end, and the kernels may be rebuilt meanwhile): HEAD, whether sources differ
    from it, and the compiled extension's modification time."""
    import subprocess

    import slimops

    root = os.path.dirname(os.path.dirname(os.path.abspath(slimops.__file__)))
    state = {}
    try:
        state["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                         capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "slimops", "models"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        state["dirty_sources"] = sorted(line[3:] for line in dirty.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from slimops import _C

        state["extension_mtime"] = time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(_C.__file__)))
    except (ImportError, OSError, AttributeError):
        state["extension_mtime"] = None
    return state


def allocator() -> str:
    """The CPU allocator in effect: glibc malloc (with its MALLOC_* settings) or a preload."""
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        libc = "libc"
    desc = f"{libc} malloc, " + (", ".join(f"{k}={v}" for k, v in sorted(malloc.items()))
                                 if malloc else "defaults (large buffers go back to the OS: "
                                 "set MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ to change)")
    preload = os.environ.get("LD_PRELOAD")
    return desc + (f"; LD_PRELOAD={preload}" if preload else "")


def settings() -> dict:
    import slimops

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "allocator": allocator(),
        "backend": slimops.backend_info(),
        "loadavg_start": _START["loadavg"],
        "code": _START["code"],
    }


def pytest_report_header(config):
    s = settings()
    quick = config.getoption("--bench-quick")
    return [
        f"slimops backends: {s['backend']}",
        f"cpu: {s['cpu']}, {s['cores']} cores; torch {s['torch']} threads: "
        f"{s['torch_threads']} (interop {s['torch_interop_threads']}, OMP_NUM_THREADS="
        f"{s['OMP_NUM_THREADS'] or 'unset'})",
        f"allocator: {s['allocator']}",
        f"load average at start (1, 5, 15 min): {s['loadavg_start']} -- other work on the "
        "machine inflates and spreads the timings",
        f"code: {s['code']}",
        "slimops bench: " + ("QUICK smoke run (not a result)" if quick else "full run"),
    ]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["slimops"] = dict(settings(), quick=bool(config.getoption("--bench-quick")))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    info = output_json.setdefault("machine_info", {}).setdefault("slimops", {})
    info["loadavg_end"] = _loadavg()
    info["suite_wall_s"] = round(time.time() - _START["time"], 1)
    try:
        import benchutil

        info["quiet_wait_s"] = round(benchutil._SESSION["waited_s"], 1)
    except ImportError:
        pass
