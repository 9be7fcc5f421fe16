"""The load watch: slimops' CPU ops run on one thread while another process holds a core.

On a 2-core machine shared with another busy process, every OpenMP region waits at its
closing barrier for a worker the OS has not scheduled (up to a time slice), and libgomp's
waiting thread spins on the free core meanwhile; a model made of hundreds of regions runs
several times slower on two threads than on one. Measured on a 2-core Intel Xeon with one
core kept busy (``bench/matrix.py --busy``): an S-MobileNet v2 training step at 32x32,
batch 64, 2,434 ms on two threads against 219 ms on one; batch-1 S-ResNet-50 eval 468 ms
against 55.

So the C++ ops time how long their thread team takes to join each region
(``csrc/cpu/parallel.h``, rule 5). A join slower than 1 ms (idle joins take microseconds)
marks the machine *contended* for one second, and while it is, every slimops CPU op runs on
its calling thread alone, the BLAS and oneDNN calls inside it included; the first region
after that second probes again. That covers slimops' ops only: the plain torch ops between
them (pooling, additions, the optimizer, the autograd engine's gradient sums) still open
two-thread regions. :func:`serial_while_contended` takes a whole block (a training step, a
forward) to one thread when the machine is contended; ``slimops.train.slimmable_step`` (and so
``Trainer``) uses it for every step. With one core busy, S-ResNet-50's batch-1 eval at 1x
took 468 ms with the watch off, 79 ms with the ops alone serial and 55 ms inside
:func:`serial_while_contended` (the same Xeon, one process, interleaved).

Rounding: a serial op rounds as under ``torch.set_num_threads(1)``; slimops' own kernels keep
the same reduction order either way, but oneDNN and MKL may not, so a result can differ in
the last bits between a contended and an idle call. ``SLIMOPS_LOAD_POLICY=off`` (or
``set_load_policy("off")``) keeps the thread team always (the behaviour before the watch):
bitwise the same on every call, at the busy machine's speed.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Union

import torch

from slimops.ops._backend import HAS_C

POLICIES = ("adaptive", "off", "serial")
"""``adaptive`` (the default): serial while a slow join was seen in the last second; ``off``:
always the thread team; ``serial``: always one thread (tests and benchmarks)."""


def _query(policy: int = -1, slow_join_us: int = -1, probe: bool = False) -> list:
    return torch.ops.slimops.load_watch(policy, slow_join_us, probe)


def load_watch() -> Dict[str, Union[str, bool, int, None]]:
    """The load watch's state: ``{"policy", "contended", "joins", "slow_joins", "serial_ops",
    "slow_join_us", "samples", "busy_samples"}``: the policy (one of :data:`POLICIES`; None
    without the compiled extension), whether ops run serial now; since the process started,
    the team joins timed, the slow ones among them and the op calls that ran serial; the join
    time counted as slow (microseconds; None without the extension); the CPU-time windows
    sampled and those in which other processes left too little of the CPUs."""
    if not HAS_C:
        return {"policy": None, "contended": False, "joins": 0, "slow_joins": 0,
                "serial_ops": 0, "slow_join_us": None, "samples": 0, "busy_samples": 0}
    policy, contended, joins, slow, serial, slow_join_us, samples, busy = _query()
    return {"policy": POLICIES[policy], "contended": bool(contended), "joins": joins,
            "slow_joins": slow, "serial_ops": serial, "slow_join_us": slow_join_us,
            "samples": samples, "busy_samples": busy}


def set_load_policy(policy: str, slow_join_us: Optional[int] = None) -> str:
    """Set the load watch's policy for this process (one of :data:`POLICIES`); returns the
    previous one. The environment variable ``SLIMOPS_LOAD_POLICY`` sets the initial one.
    ``slow_join_us`` (default: unchanged, initially 1000) is how late a thread may join a
    region before the machine counts as contended: raise it where idle joins are slower.
    Without the compiled extension (no C++ ops to watch) it only checks its arguments and
    returns ``"off"``."""
    if policy not in POLICIES:
        raise ValueError(f"slimops: load policy must be one of {POLICIES}, got {policy!r}")
    if slow_join_us is not None and (not isinstance(slow_join_us, int) or slow_join_us < 0):
        raise ValueError(f"slimops: slow_join_us must be an int >= 0, got {slow_join_us!r}")
    if not HAS_C:
        return "off"
    previous = POLICIES[_query()[0]]
    _query(POLICIES.index(policy), -1 if slow_join_us is None else slow_join_us)
    return previous


def machine_contended(probe: bool = False) -> bool:
    """True while the load watch runs slimops' ops serial (see the module's docstring).
    ``probe``: time the thread team's join first, as an op would (at most every 100 ms)."""
    return HAS_C and bool(_query(probe=probe)[1])


@contextlib.contextmanager
def serial_while_contended() -> Iterator[bool]:
    """Run the block on one thread (``torch.set_num_threads(1)``, restored on exit) when the
    load watch finds the machine contended as the block starts; yields whether it did.

    Wrap whole units of work (a training step, an inference forward) in it: the plain torch
    ops between slimops' ops then run serial too, instead of each waiting for a descheduled
    worker. On an idle machine (or policy ``off``) it changes nothing::

        with torch.inference_mode(), slimops.serial_while_contended():
            logits = model(x)
    """
    threads = torch.get_num_threads()
    # probe: inside the block the ops see one thread and time no join, so the block's start
    # is where the watch looks (at most every 100 ms).
    serial = threads > 1 and machine_contended(probe=True)
    if serial:
        torch.set_num_threads(1)
    try:
        yield serial
    finally:
        if serial:
            torch.set_num_threads(threads)
