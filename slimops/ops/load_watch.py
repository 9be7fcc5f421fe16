"""The load watch: slimops' CPU ops run on one thread while another process holds a core.

On a 2-core machine shared with another busy process, every OpenMP region waits at its
closing barrier for a worker the OS has not scheduled (up to a time slice), and libgomp's
waiting thread spins on the free core meanwhile; a model made of hundreds of regions runs
several times slower on two threads than on one. Measured on a 2-core Intel Xeon with one
core kept busy (``bench/matrix.py --busy``): an S-MobileNet v2 training step at 32x32,
batch 64, 2,434 ms on two threads against 219 ms on one; batch-1 S-ResNet-50 eval 468 ms
against 55.

So the C++ ops watch the machine (``csrc/cpu/parallel.h``, rule 5; ``csrc/cpu/load_watch.cpp``)
for two signs of load: a region's second thread joining it more than 1 ms late twice within
250 ms (idle joins take microseconds; a lone late one is a hypervisor pausing a virtual CPU
as often as load), and a 200 ms window in which other processes took so much of this
process's CPUs (``/proc/stat`` minus this process's own CPU time) that less is left than the
thread team needs. Either marks the machine *contended* for one second (a busy machine renews
it), and while it is, every slimops CPU op runs on its calling thread alone, the BLAS and
oneDNN calls inside it included. That covers slimops' ops only: the plain torch ops between
them (pooling, additions, the optimizer, the autograd engine's gradient sums) still open
two-thread regions. :class:`serial_while_contended` takes a whole block (a training step, a
forward) to one thread when the machine is contended; ``slimops.train.slimmable_step`` (and
so ``Trainer``), ``evaluate`` and ``calibrate_bn`` use it. With one core busy, S-ResNet-50's
batch-1 eval at 1x took 468 ms with the watch off, 79 ms with the ops alone serial and 55 ms
inside the block (the same Xeon, one process, interleaved; the joins alone as the signal).

Rounding: a serial op rounds as under ``torch.set_num_threads(1)``; slimops' own kernels keep
the same reduction order either way, but oneDNN and MKL may not, so a result can differ in
the last bits between a contended and an idle call. ``SLIMOPS_LOAD_POLICY=off`` (or
``set_load_policy("off")``) keeps the thread team always (the behaviour before the watch):
bitwise the same on every call, at the busy machine's speed.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch

from slimops.ops import _backend
from slimops.ops._backend import HAS_C

# slimops._C's direct entries (csrc/python_module.cpp), None without the extension.
_SERIAL_ENTER: Optional[Callable[[], Optional[Tuple[int, int]]]] = \
    _backend.direct_entry("serial_enter")
_SERIAL_EXIT: Optional[Callable[[int, int], None]] = _backend.direct_entry("serial_exit")

POLICIES = ("adaptive", "off", "serial")
"""``adaptive`` (the default): serial while a sign of load (a slow join, a busy CPU-time
window) was seen in the last second; ``off``: always the thread team; ``serial``: always one
thread (tests and benchmarks)."""


def _query(policy: int = -1, slow_join_us: int = -1) -> list:
    return torch.ops.slimops.load_watch(policy, slow_join_us)


def load_watch() -> Dict[str, Union[str, bool, int, None]]:
    """The load watch's state: ``{"policy", "contended", "joins", "slow_joins", "serial_ops",
    "slow_join_us", "samples", "busy_samples"}``: the policy (one of :data:`POLICIES`; None
    without the compiled extension), whether ops run serial now; since the process started,
    the team joins timed, the slow ones among them and the op calls and blocks that ran
    serial; the join time counted as slow (microseconds; None without the extension); the
    CPU-time windows sampled and those in which other processes left too little of the
    CPUs."""
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


def machine_contended() -> bool:
    """True while the load watch runs slimops' ops serial (see the module's docstring)."""
    return HAS_C and bool(_query()[1])


class serial_while_contended:  # noqa: N801 (a context manager, named like one)
    """Run the block on one thread when the load watch finds the machine contended as the
    block starts (the calling thread's OpenMP and MKL thread counts, put back on exit); ``as``
    gives whether it did.

    Wrap whole units of work (a training step, an inference forward) in it: the plain torch
    ops between slimops' ops then run serial too, instead of each waiting for a descheduled
    worker. On an idle machine (or policy ``off``) it changes nothing; it costs about a
    microsecond. Not ``torch.set_num_threads(1)``: that also resizes torch's thread pool for
    XNNPACK (threads created and joined on every call)::

        with torch.inference_mode(), slimops.serial_while_contended():
            logits = model(x)
    """

    __slots__ = ("_saved",)

    def __init__(self) -> None:
        self._saved: Optional[Tuple[int, int]] = None

    def __enter__(self) -> bool:
        # serial_enter probes first: inside the block the ops see one thread and time no
        # join, so the block's start is where the watch looks (at most every 100 ms).
        self._saved = _SERIAL_ENTER() if _SERIAL_ENTER is not None else None
        return self._saved is not None

    def __exit__(self, *exc: object) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            _SERIAL_EXIT(*saved)
