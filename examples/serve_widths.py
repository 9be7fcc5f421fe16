"""Serve one slimmable model to concurrent requests, each at the width its latency budget allows.

Run (from the repository root, with the project's environment; under a minute on 2 cores)::

    python examples/serve_widths.py --requests 200
    python examples/serve_widths.py --model slim_cnn --input-size 1 3 32 32 --requests 500

What it does:

1. builds ONE model instance (random weights: latency does not depend on them), eval mode;
2. times the first forward of the fresh model (plan preparation) and the cost of switching
   width (``slimops.set_width`` and entering/leaving ``slimops.width``);
3. measures a ``LatencyTable`` at startup (``slimops.deploy``), with the torch thread count
   the server uses (``--torch-threads``, default 1: each worker thread runs its request on
   one core, ``--workers`` requests at a time): one request at a time (``measure``), then
   under load (``--workers`` threads forwarding at once); widths are picked from the latter
   (``--idle-table``: from the former);
4. sends ``--requests`` requests through a ``ThreadPoolExecutor``; each carries a latency
   budget that changes over the stream (phases of 25 requests: from looser than the widest
   width down to tighter than the fastest); each request picks
   ``table.pick_width(budget)`` (the fastest width if none fits) and runs inside
   ``with slimops.width(model, w):`` -- a thread-local width, so the workers run different
   widths on the same weights at the same time, with no copy of any parameter;
5. prints, per width: requests served, service latency median / p90 and how many met
   their budget.

Under concurrent load the cores, caches and memory bandwidth are shared: on the 2-core
development VM two concurrent requests each take about twice the idle latency, so a table
measured idle misses nearly every budget (try ``--idle-table``); the under-load table is
what a server should pick from.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import slimops  # noqa: E402
from slimops.deploy import LatencyEntry, LatencyTable  # noqa: E402
from slimops.models import MODELS  # noqa: E402
from slimops.profile import environment  # noqa: E402
from slimops.timing import summarize, time_calls  # noqa: E402


def budget_stream(table: LatencyTable, n: int, phase: int = 25,
                  pick_by: str = "median") -> List[float]:
    """``n`` budgets (ms) in phases of ``phase`` requests, cycling loose -> tight -> loose.

    One level per width, halfway between its latency (``pick_by``) and the next wider
    width's (15% above it for the widest), so that width is the pick; plus one below the
    fastest width (nothing fits: the server falls back to the fastest and the request misses).
    """
    lat = sorted(e.p90_ms if pick_by == "p90" else e.median_ms for e in table.entries)
    levels = {round(a + (b - a) / 2, 3) for a, b in zip(lat, lat[1:])}
    levels |= {round(lat[-1] * 1.15, 3), round(lat[0] * 0.8, 3)}
    levels = sorted(levels, reverse=True)
    cycle = levels + levels[-2:0:-1]  # down, then back up
    return [cycle[(i // phase) % len(cycle)] for i in range(n)]


def switching_cost(model: torch.nn.Module, widths: Tuple[float, ...],
                   n: int = 2000) -> Dict[str, float]:
    """Median microseconds of ``set_width`` and of entering + leaving ``slimops.width``."""
    default = slimops.get_width(model)

    def enter_and_leave(w: float) -> None:
        with slimops.width(model, w):
            pass

    medians = {}
    for key, fn in (("set_width_us", lambda w: slimops.set_width(model, w)),
                    ("width_block_us", enter_and_leave)):
        cycle = itertools.cycle(widths)  # widths in turn, as a server switches
        medians[key] = summarize(time_calls(lambda: fn(next(cycle)), n, scale=1e6)).median
    slimops.set_width(model, default)
    return medians


def table_under_load(model: torch.nn.Module, x: torch.Tensor, workers: int,
                     repeats: int) -> LatencyTable:
    """A ``LatencyTable`` measured the way the server runs: ``workers`` threads forwarding at
    once, all at the same width (each thread inside its own ``slimops.width`` block).

    On a small machine the threads share cores, caches and memory bandwidth, so a request's
    latency under load can be well above the idle table's; picking from this table keeps
    the budgets honest.
    """
    entries = []
    for w in slimops.model_widths(model):
        times: List[float] = []
        lock = threading.Lock()

        def run() -> None:
            with torch.inference_mode(), slimops.width(model, w):
                mine = time_calls(lambda: model(x), repeats, warmup=1, scale=1e3)
            with lock:
                times.extend(mine)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for f in [pool.submit(run) for _ in range(workers)]:
                f.result()
        stats = summarize(times)
        entries.append(LatencyEntry(w, stats.median, stats.p90))
    return LatencyTable(entries, meta={"model": type(model).__name__,
                                       "input_shape": list(x.shape),
                                       "threads": f"{workers} workers x {torch.get_num_threads()}"})


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="s_mobilenet_v2", choices=sorted(MODELS))
    p.add_argument("--input-size", type=int, nargs=4, default=[1, 3, 224, 224],
                   metavar=("N", "C", "H", "W"))
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--workers", type=int, default=2, help="serving threads (2)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads, for the table and the serving (1)")
    p.add_argument("--repeats", type=int, default=20, help="table: timed runs per width (20)")
    p.add_argument("--idle-table", action="store_true",
                   help="pick widths from the table measured one request at a time (default: "
                   "from the one measured with --workers threads running at once)")
    p.add_argument("--pick-by", choices=("median", "p90"), default="p90",
                   help="which table latency must fit the budget (p90: about 90%% of the "
                   "requests at the picked width meet it; median: about half)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.torch_threads)
    model = MODELS[args.model]().eval()
    widths = slimops.model_widths(model)
    x = torch.randn(*args.input_size)
    print(environment())
    print(f"model {args.model}, widths {', '.join(f'{w:g}' for w in widths)}, input "
          f"{tuple(args.input_size)}, {args.workers} serving threads x {args.torch_threads} "
          f"torch thread(s)")

    # First use: the fresh model's first forward prepares every listed width's plan.
    with torch.inference_mode():
        t0 = time.perf_counter()
        with slimops.width(model, widths[-1]):
            model(x)
        first_ms = (time.perf_counter() - t0) * 1e3
    cost = switching_cost(model, widths)

    table = LatencyTable.measure(model, tuple(args.input_size), repeats=args.repeats,
                                 threads=args.torch_threads)
    warm_full = table.latency(widths[-1])  # idle, like the first forward
    print("idle (one request at a time):")
    print(table)
    if not args.idle_table and args.workers > 1:
        table = table_under_load(model, x, args.workers, args.repeats)
        print(f"under load ({args.workers} requests at a time; the widths are picked from this):")
        print(table)
    print(f"switching: set_width {cost['set_width_us']:.1f} us, `with slimops.width` "
          f"{cost['width_block_us']:.1f} us (median); first forward of the fresh model "
          f"{first_ms:.2f} ms vs {warm_full:.2f} ms warm (idle) at {widths[-1]:g}x")

    budgets = budget_stream(table, args.requests, pick_by=args.pick_by)
    params_before = {n: t.data_ptr() for n, t in model.named_parameters()}
    lock = threading.Lock()
    served: Dict[float, List[Tuple[float, bool]]] = {w: [] for w in widths}
    active: Dict[int, float] = {}
    overlap = {"distinct_widths_at_once": 1}

    def handle(budget_ms: float) -> None:
        try:
            w = table.pick_width(budget_ms, args.pick_by)
        except ValueError:
            w = table.fastest().width  # nothing fits: degrade to the fastest
        with torch.inference_mode(), slimops.width(model, w):
            with lock:
                active[threading.get_ident()] = w
                overlap["distinct_widths_at_once"] = max(overlap["distinct_widths_at_once"],
                                                         len(set(active.values())))
            t0 = time.perf_counter()
            model(x)
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                active.pop(threading.get_ident(), None)
                served[w].append((ms, ms <= budget_ms))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for f in [pool.submit(handle, b) for b in budgets]:
            f.result()
    wall = time.perf_counter() - t0
    assert {n: t.data_ptr() for n, t in model.named_parameters()} == params_before

    print(f"\nserved {args.requests} requests in {wall:.2f} s ({args.requests / wall:.1f} req/s); "
          f"budgets {min(budgets):.2f}..{max(budgets):.2f} ms, changing every 25 requests; "
          f"up to {overlap['distinct_widths_at_once']} different widths ran at the same time; "
          f"widths picked by {args.pick_by}")
    header = f"{'width':>6} {'requests':>8} {'median ms':>10} {'p90 ms':>8} {'budget met':>10}"
    print(header + "\n" + "-" * len(header))
    for w in widths:
        rows = served[w]
        if not rows:
            print(f"{w:>5g}x {0:>8} {'-':>10} {'-':>8} {'-':>10}")
            continue
        stats = summarize([r[0] for r in rows])
        met = 100.0 * sum(r[1] for r in rows) / len(rows)
        print(f"{w:>5g}x {len(rows):>8} {stats.median:>10.2f} {stats.p90:>8.2f} "
              f"{met:>9.0f}%")
    total_met = sum(r[1] for rows in served.values() for r in rows)
    print(f"all: {100.0 * total_met / args.requests:.0f}% of requests met their budget "
          "(requests whose budget no width fits ran at the fastest width and count as missed); "
          "parameters not copied (data_ptrs unchanged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
