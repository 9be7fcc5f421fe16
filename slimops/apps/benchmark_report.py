"""``python -m slimops bench``: run the benchmark suite of a source checkout and report it.

The suite itself lives in the repository's ``bench/`` folder (pytest-benchmark; the library
never imports it): per layer and per model, every width, four variants (slimops, the
original implementation's style on the same weights, the dense network at that width in
eager PyTorch, and that network traced + frozen + optimized for inference), plus an
Algorithm 1 training step (time and peak memory). This module runs it through
``pytest.main`` and turns its JSON into tables (median ms per variant, and the ratios
slimops / reference, slimops / dense-eager, slimops / dense-jit: below 1 means slimops is
faster) and a plot of latency against width per model.

The report functions only read the JSON, so they also work on saved runs:
``python -m slimops bench --report runs/bench/<file>.json [more.json ...]`` (several runs
of the same code merge, keeping per benchmark the least contended measurement).
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from slimops._table import text_table

VARIANTS = ("slimops", "reference", "dense-eager", "dense-jit", "dense-compile")
RATIOS = (("reference", "slimops/ref"), ("dense-eager", "slimops/eager"),
          ("dense-jit", "slimops/jit"), ("dense-compile", "slimops/compile"))

Key = Tuple[str, str, int]  # (suite, subject, batch)


def bench_dir() -> Path:
    """The ``bench/`` folder next to the ``slimops`` package (a source checkout), or a
    ``FileNotFoundError`` saying so."""
    root = Path(__file__).resolve().parents[2]  # slimops/apps/benchmark_report.py
    bench = root / "bench"
    if not (bench / "conftest.py").is_file():
        raise FileNotFoundError(
            f"no benchmark suite at {bench}: `python -m slimops bench` runs the bench/ folder "
            "of a source checkout (git clone + `pip install -e .`), which an installed "
            "package does not ship")
    return bench


def load(path: os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def results(data: dict) -> List[dict]:
    """One flat record per benchmark: its ``extra_info`` tags plus ``median_ms``."""
    out = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        if "suite" not in info or "variant" not in info:
            continue  # not one of ours (e.g. a benchmark added without tags)
        info["median_ms"] = b["stats"]["median"] * 1e3
        info["rounds"] = b["stats"]["rounds"]
        out.append(info)
    return out


def _grouped(records: Iterable[dict], suite: str) -> "OrderedDict[Key, Dict[float, Dict[str, dict]]]":
    groups: "OrderedDict[Key, Dict[float, Dict[str, dict]]]" = OrderedDict()
    for r in records:
        if r["suite"] != suite:
            continue
        key = (r["suite"], r["subject"], int(r["batch"]))
        groups.setdefault(key, {}).setdefault(float(r["width"]), {})[r["variant"]] = r
    return groups


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


# Rows timed while the benchmark's threads waited for a CPU more than this share of the
# time (other processes on the machine) are flagged.
WAIT_FLAG = 0.05
WAIT_NOTE = (f"wait: the largest share of time the benchmark's threads were runnable but "
             f"waiting for a CPU (other work on the machine) while a variant of the row was "
             f"timed; '!' above {WAIT_FLAG:.0%}: that row's timings are inflated and not "
             "comparable (an OpenMP region waits for its descheduled thread)")


def _wait(records: Iterable[dict]) -> str:
    shares = [r["cpu_wait"] for r in records if r.get("cpu_wait") is not None]
    if not shares:
        return "-"
    top = max(shares)
    return f"{top:.0%}" + ("!" if top > WAIT_FLAG else "")


def latency_tables(data: dict) -> str:
    """Per layer and per model/batch: one row per width, median ms of each variant and the
    ratios of slimops to the others."""
    recs = results(data)
    wait_column = any("cpu_wait" in r for r in recs)
    parts = []
    for suite, title in (("layer", "layer"), ("model", "model")):
        for (_, subject, batch), by_width in _grouped(recs, suite).items():
            variants = [v for v in VARIANTS if any(v in d for d in by_width.values())]
            rows = []
            for w in sorted(by_width):
                d = by_width[w]
                ms = {v: d[v]["median_ms"] for v in variants if v in d}
                row = [f"{w:g}x"] + [_fmt_ms(ms.get(v)) for v in variants]
                for other, _ in RATIOS:
                    if other in variants:
                        ok = "slimops" in ms and ms.get(other)
                        row.append(f"{ms['slimops'] / ms[other]:.2f}" if ok else "-")
                if wait_column:
                    row.append(_wait(d.values()))
                rows.append(row)
            header = ["width"] + [f"{v} ms" for v in variants] + \
                     [name for other, name in RATIOS if other in variants] + \
                     (["wait"] if wait_column else [])
            parts.append(f"{title} {subject}, batch {batch} (median ms; ratio < 1: slimops "
                         f"faster)\n{text_table(header, rows)}")
    if wait_column:
        parts.append(WAIT_NOTE)
    return "\n\n".join(parts)


def train_tables(data: dict) -> str:
    """The training-step benchmark: median ms and peak MiB per variant, slimops' ratios."""
    parts = []
    for (_, subject, batch), by_width in _grouped(results(data), "train").items():
        d = next(iter(by_width.values()))
        any_rec = next(iter(d.values()))
        rows = [[v, _fmt_ms(d[v]["median_ms"]),
                 f"{d[v]['peak_mib']:.1f}" if "peak_mib" in d[v] else "-", str(d[v]["rounds"]),
                 _wait([d[v]])]
                for v in VARIANTS if v in d]
        text = (f"train step (Algorithm 1) {subject}, batch {batch}, input "
                f"{any_rec.get('input', '?')}px, widths {any_rec.get('widths', '?')}\n"
                + text_table(["variant", "median ms", "peak MiB", "rounds", "wait"], rows))
        if "slimops" in d and "reference" in d:
            s, r = d["slimops"], d["reference"]
            text += f"\nslimops/reference: time {s['median_ms'] / r['median_ms']:.2f}"
            if "peak_mib" in s and "peak_mib" in r and r["peak_mib"]:
                text += f", peak memory {s['peak_mib'] / r['peak_mib']:.2f}"
        parts.append(text)
    return "\n\n".join(parts)


def settings_text(data: dict) -> str:
    info = data.get("machine_info", {}).get("slimops", {})
    if not info:
        return "(no slimops settings in this JSON)"
    backend = info.get("backend", {})
    lines = [
        f"cpu: {info.get('cpu')}, {info.get('cores')} cores; torch {info.get('torch')}, "
        f"threads {info.get('torch_threads')} (OMP_NUM_THREADS={info.get('OMP_NUM_THREADS') or 'unset'}); "
        f"slimops cpu backend: {backend.get('cpu', '?')}",
        f"allocator: {info.get('allocator')}",
        f"load average (1, 5, 15 min) at start {info.get('loadavg_start')}, at end "
        f"{info.get('loadavg_end')}; suite wall time {info.get('suite_wall_s')} s"
        + (f" (of which waiting for contention to pass: {info['quiet_wait_s']} s)"
           if info.get("quiet_wait_s") else "")
        + ("; QUICK smoke run, not a result" if info.get("quick") else ""),
    ]
    code = info.get("code")
    if code:
        dirty = code.get("dirty_sources")
        lines.append(f"code: commit {code.get('commit')}"
                     + (f" + uncommitted {', '.join(dirty)}" if dirty else "")
                     + f"; extension built {code.get('extension_mtime')}")
    if data.get("merged_from"):
        lines.append(f"merged from {len(data['merged_from'])} runs (per benchmark the one "
                     f"whose threads waited least for a CPU): {', '.join(data['merged_from'])}")
    return "\n".join(lines)


def _cell(b: dict) -> Optional[tuple]:
    info = b.get("extra_info", {})
    if "suite" not in info or "variant" not in info:
        return None
    return (info["suite"], info["subject"], info.get("batch"), info.get("width"), info["variant"])


def merge(runs: Sequence[Tuple[str, dict]]) -> dict:
    """Several runs of the suite (``(name, data)``) as one: per benchmark (suite, subject,
    batch, width, variant) the measurement taken under the least contention (lowest
    ``cpu_wait``; the later run on a tie). Settings are the first run's; runs of different
    code raise ``ValueError`` (their timings do not compare)."""
    if len(runs) == 1:
        return runs[0][1]
    codes = {json.dumps(d.get("machine_info", {}).get("slimops", {}).get("code"), sort_keys=True)
             for _, d in runs}
    if len(codes) > 1:
        raise ValueError(f"cannot merge runs of different code: {sorted(codes)}")
    best: "OrderedDict[tuple, dict]" = OrderedDict()
    for _, d in runs:
        for b in d.get("benchmarks", []):
            key = _cell(b)
            if key is None:
                continue
            wait = b["extra_info"].get("cpu_wait")
            old = best.get(key)
            if old is None or (wait if wait is not None else 1.0) <= \
                    old["extra_info"].get("cpu_wait", 1.0):
                best[key] = b
    merged = dict(runs[0][1])
    merged["benchmarks"] = list(best.values())
    merged["merged_from"] = [name for name, _ in runs]
    return merged


def report(data: dict) -> str:
    """The whole text report of one pytest-benchmark JSON."""
    parts = [settings_text(data), latency_tables(data), train_tables(data)]
    return "\n\n".join(p for p in parts if p) + "\n"


def plot(data: dict, path: os.PathLike) -> Optional[Path]:
    """Latency against width, one panel per model and batch (and one per layer), one line
    per variant; written to ``path`` (PNG, matplotlib's Agg backend). Returns the path, or
    None when the JSON has no per-width results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = results(data)
    panels = list(_grouped(recs, "model").items()) + list(_grouped(recs, "layer").items())
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, ((suite, subject, batch), by_width) in zip(axes.flat, panels):
        ws = sorted(by_width)
        for v in VARIANTS:
            pts = [(w, by_width[w][v]["median_ms"]) for w in ws if v in by_width[w]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v,
                        linewidth=2.2 if v == "slimops" else 1.2)
        ax.set_title(f"{subject}, batch {batch}" if suite == "model" else f"layer: {subject}",
                     fontsize=10)
        ax.set_xlabel("width")
        ax.set_ylabel("median ms")
        ax.set_xticks(ws)
        ax.set_xticklabels([f"{w:g}" for w in ws])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    info = data.get("machine_info", {}).get("slimops", {})
    fig.suptitle(f"slimops latency per width (CPU: {info.get('cores', '?')} cores, "
                 f"{info.get('torch_threads', '?')} threads, torch {info.get('torch', '?')})",
                 fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_suite(json_path: Path, quick: bool = False, keyword: Optional[str] = None,
              extra: Sequence[str] = ()) -> int:
    """``pytest.main`` on the checkout's ``bench/`` (``--benchmark-only``), JSON to
    ``json_path``; returns pytest's exit code."""
    import pytest

    bench = bench_dir()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    args = [str(bench), "--benchmark-only", f"--benchmark-json={json_path}",
            "--benchmark-sort=name", "--benchmark-columns=min,median,iqr,rounds", "-q",
            "-p", "no:cacheprovider",
            f"--rootdir={bench.parent}"]
    if quick:
        args.append("--bench-quick")
    if keyword:
        args += ["-k", keyword]
    args += list(extra)
    return int(pytest.main(args))


def main(quick: bool = False, keyword: Optional[str] = None, out_dir: str = "runs/bench",
         json_path: Optional[str] = None, plot_path: Optional[str] = None,
         report_only: Optional[Sequence[str]] = None, threads: Optional[int] = None,
         with_compile: bool = False) -> int:
    """The ``bench`` command: run (unless ``report_only``: saved JSON files, merged), print
    the report, plot."""
    import sys

    if report_only:
        paths = [Path(p) for p in ([report_only] if isinstance(report_only, str) else report_only)]
        try:
            data = merge([(str(p), load(p)) for p in paths])
        except (OSError, ValueError) as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
        path = paths[-1]
    else:
        try:
            bench_dir()
        except FileNotFoundError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(json_path) if json_path else Path(out_dir) / f"bench-{stamp}.json"
        if threads:
            os.environ["SLIMOPS_BENCH_THREADS"] = str(threads)
        if with_compile:
            os.environ["SLIMOPS_BENCH_COMPILE"] = "1"
        t0 = time.time()
        code = run_suite(path, quick=quick, keyword=keyword)
        print(f"\nbench: suite ran in {time.time() - t0:.0f} s; JSON: {path}")
        if code != 0 or not path.is_file():
            print(f"bench: pytest exited with code {code}", file=sys.stderr)
            return code or 1
        data = load(path)
    print()
    print(report(data))
    png = Path(plot_path) if plot_path else path.with_suffix(".png")
    try:
        written = plot(data, png)
    except ImportError:
        print("bench: matplotlib is not installed: no plot (pip install matplotlib)",
              file=sys.stderr)
    else:
        if written:
            print(f"plot: {written}")
    return 0
