"""Deployment: pick a slimmable model's width from its latency on the device it runs on.

A deployed slimmable network is one set of weights that can run at any of its widths; which
width to use is a run-time decision: the widest one that meets a latency budget *on this
machine*. ``LatencyTable.measure`` times the model at each width (eval, inference mode,
median and 90th percentile of ``repeats`` runs after ``warmup``); the table is saved as JSON
with where and how it was measured, loaded back (validated) on the device, and
``pick_width(budget_ms)`` answers the widest width whose median latency fits::

    table = LatencyTable.measure(model, (1, 3, 224, 224))
    table.save("latency.json")
    ...
    table = LatencyTable.load("latency.json")
    with slimops.width(model, table.pick_width(10.0)):   # this thread only
        y = model(x)

Layering: this module uses ``slimops.width`` / ``slimops.timing`` (the timing loop) /
``slimops.profile`` only (never ``slimops.models``); the command line (``python -m slimops
pick-width``) and ``examples/serve_widths.py`` sit above it.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from slimops._files import atomic_write_text
from slimops._table import text_table
from slimops.timing import check_counts, summarize, time_calls
from slimops.width import model_widths, normalize_widths, width

__all__ = ["LatencyEntry", "LatencyTable", "FORMAT_VERSION"]

# Bumped when the JSON layout changes incompatibly.
FORMAT_VERSION = 1


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _as_float(v: Any) -> Optional[float]:
    """``v`` as a float, or None when it is not a number or too large for one (a 400-digit
    integer from a JSON file)."""
    if not _is_number(v):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def _positive_ms(v: Any, what: str) -> float:
    f = _as_float(v)
    if f is None or not math.isfinite(f) or f <= 0:
        raise ValueError(f"{what} must be a positive finite number of milliseconds, "
                         f"got {_short(v)}")
    return f


def _short(v: Any, limit: int = 60) -> str:
    """``repr(v)``, cut to ``limit`` characters (a hostile file's values can be huge)."""
    try:
        r = repr(v)
    except ValueError:  # an int past Python's int -> str digit limit
        return f"<{type(v).__name__} too large to print>"
    return r if len(r) <= limit else r[:limit] + "..."


@dataclass(frozen=True)
class LatencyEntry:
    """One width's measured latency, in milliseconds (``p90_ms``: optional)."""

    width: float
    median_ms: float
    p90_ms: Optional[float] = None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


class LatencyTable:
    """Per-width latency of one model on one device, and the width choice it implies.

    Build it with ``measure`` (time a model), ``load`` (a saved JSON file), ``from_dict``
    (the JSON's content) or directly from ``{width: median_ms}``::

        LatencyTable({0.35: 2.1, 0.5: 3.0, 1.0: 6.5}).pick_width(4)   # -> 0.5

    ``meta`` is free-form information on where the numbers come from (model, input shape,
    threads, CPU ISA, torch version, time); ``measure`` fills it.
    """

    def __init__(self, latencies: Union[Mapping[float, float], Iterable[LatencyEntry]],
                 meta: Optional[Mapping[str, Any]] = None) -> None:
        if isinstance(latencies, Mapping):
            entries = [LatencyEntry(w, ms) for w, ms in latencies.items()]
        else:
            entries = list(latencies)
        if not entries:
            raise ValueError("a LatencyTable needs at least one width")
        checked: List[LatencyEntry] = []
        for e in entries:
            if not isinstance(e, LatencyEntry):
                raise TypeError(f"expected LatencyEntry items, got {e!r}")
            w = _as_float(e.width)
            if w is None:
                raise ValueError(f"width must be a number, got {_short(e.width)}")
            median = _positive_ms(e.median_ms, f"latency of width {w:g}")
            p90 = None if e.p90_ms is None else _positive_ms(e.p90_ms, f"p90 of width {w:g}")
            if p90 is not None and p90 < median:
                raise ValueError(f"p90 of width {w:g} ({p90:g} ms) is below its median "
                                 f"({median:g} ms)")
            checked.append(LatencyEntry(w, median, p90))
        normalize_widths([e.width for e in checked])  # finite, positive, distinct
        self.entries: Tuple[LatencyEntry, ...] = tuple(sorted(checked, key=lambda e: e.width))
        self.meta: Dict[str, Any] = dict(meta or {})

    # --- measuring -------------------------------------------------------------------

    @classmethod
    def measure(cls, model: nn.Module, input_shape: Sequence[int] = (1, 3, 224, 224),
                widths: Optional[Sequence[float]] = None, warmup: int = 3, repeats: int = 20,
                threads: Optional[int] = None,
                timer: Callable[[], float] = time.perf_counter,
                frozen: bool = False) -> "LatencyTable":
        """Time ``model`` at each width (default: its listed widths) on a random input.

        Each width runs in eval mode under ``torch.inference_mode`` inside
        ``slimops.width(model, w)`` (this thread only: the model's default width and
        train/eval mode are left as they were): ``warmup`` untimed runs, then ``repeats``
        timed ones; the entry holds their median and 90th percentile.

        ``frozen=True`` times the deployment instead of the eager model: the module
        ``slimops.export.torchscript_widths(model, x, widths, freeze=True)`` builds (every
        width's BN folded, slimops ops with no Python between them: the fastest CPU
        inference, see that function), called as ``deployed(x, w)``. Pick a width from the
        table of what will run: on a 2-core Zen 3 the eager S-MobileNet v2 at 224 took
        1.1-1.4x the frozen module's time (docs/BENCHMARKS.md). ``meta["deployment"]`` says
        which was timed.

        Args:
            input_shape: the input's shape; the latency is for the whole batch.
            threads: torch intra-op threads during the measurement (restored afterwards;
                default: the current setting). Latency depends on it: measure with the
                setting the deployment uses.
            timer: a clock in seconds (tests pass a fake one).
        Raises:
            ValueError: bad ``warmup``/``repeats``/``threads``, or a width the model does
                not run at (from ``slimops.width``).
        """
        check_counts(warmup, repeats)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        shape = tuple(int(s) for s in input_shape)
        ws = normalize_widths(widths) if widths is not None else model_widths(model)
        if not ws:
            raise ValueError(f"{type(model).__name__} lists no widths; pass widths=")
        param = next(model.parameters(), None)
        x = torch.randn(*shape, dtype=param.dtype if param is not None else torch.float32,
                        device=param.device if param is not None else "cpu")
        old_threads = torch.get_num_threads()
        was_training = model.training
        entries = []
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            model.eval()
            deployed = None
            if frozen:
                from slimops.export import torchscript_widths  # TorchScript: only when asked

                deployed = torchscript_widths(model, x, ws, freeze=True)
            with torch.inference_mode():
                for w in ws:
                    with width(model, w):
                        run = ((lambda: model(x)) if deployed is None
                               else (lambda w=w: deployed(x, w)))
                        # CUDA: synchronised around each timed run (a GPU forward returns
                        # before it has run)
                        times = time_calls(run, repeats, warmup, device=x.device,
                                           clock=timer, scale=1e3)
                    stats = summarize(times)
                    entries.append(LatencyEntry(w, stats.median, stats.p90))
            used_threads = torch.get_num_threads()
        finally:
            model.train(was_training)
            torch.set_num_threads(old_threads)
        from slimops.ops._backend import backend_info

        info = backend_info()
        meta = {
            "model": type(model).__name__,
            "deployment": "frozen TorchScript" if frozen else "eager",
            "input_shape": list(shape),
            "threads": used_threads,
            "warmup": warmup,
            "repeats": repeats,
            "device": _device_name(x.device),
            "backend": info.get("cuda" if x.device.type == "cuda" else "cpu"),
            "cpu_isa": info.get("cpu_isa"),
            "torch": torch.__version__,
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
        }
        return cls(entries, meta)

    # --- queries -------------------------------------------------------------------------

    @property
    def widths(self) -> Tuple[float, ...]:
        """The table's widths, ascending."""
        return tuple(e.width for e in self.entries)

    def latency(self, w: float) -> float:
        """The median latency (ms) of width ``w``; ``KeyError`` if the table lacks it."""
        for e in self.entries:
            if e.width == float(w):
                return e.median_ms
        raise KeyError(f"width {w!r} is not in the table (widths: {self._widths_str()})")

    def fastest(self) -> LatencyEntry:
        """The entry with the smallest median latency."""
        return min(self.entries, key=lambda e: e.median_ms)

    def pick_width(self, budget_ms: float, statistic: str = "median") -> float:
        """The widest width whose latency is at most ``budget_ms`` milliseconds.

        ``statistic``: ``"median"`` (default: about half the requests at the picked width
        can exceed a budget equal to its median) or ``"p90"`` (the 90th percentile: about
        90% of them meet it; needs a table with p90 figures, as ``measure`` makes).

        Raises:
            ValueError: ``budget_ms`` is not a positive finite number (bools and strings
                are refused), an unknown ``statistic`` or missing p90 figures, or no width
                fits (the message gives the fastest width's latency).
        """
        if not _is_number(budget_ms) or not math.isfinite(float(budget_ms)) or budget_ms <= 0:
            raise ValueError(f"budget_ms must be a positive finite number, got {budget_ms!r}")
        if statistic == "median":
            lat = {e.width: e.median_ms for e in self.entries}
        elif statistic == "p90":
            if any(e.p90_ms is None for e in self.entries):
                raise ValueError("this table has no p90 figures for every width; "
                                 "use statistic='median'")
            lat = {e.width: e.p90_ms for e in self.entries}
        else:
            raise ValueError(f"statistic must be 'median' or 'p90', got {statistic!r}")
        fitting = [w for w, ms in lat.items() if ms <= float(budget_ms)]
        if not fitting:
            fastest = min(lat, key=lat.__getitem__)
            raise ValueError(f"no width fits a budget of {float(budget_ms):g} ms: the fastest, "
                             f"width {fastest:g}, takes {lat[fastest]:.3f} ms ({statistic})")
        return max(fitting)

    # --- JSON ------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The JSON-ready content.

        ``{"format": 1, "meta": {...}, "entries": [{"width", "median_ms", "p90_ms"}, ...]}``
        """
        return {
            "format": FORMAT_VERSION,
            "meta": dict(self.meta),
            "entries": [{"width": e.width, "median_ms": e.median_ms, "p90_ms": e.p90_ms}
                        for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "latency table") -> "LatencyTable":
        """Rebuild a table from ``to_dict``'s content, validating it (``ValueError``)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in ("format", "entries") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        fmt = data["format"]
        if type(fmt) is not int or fmt != FORMAT_VERSION:  # noqa: E721 (true == 1 is refused)
            raise ValueError(f"{source}: unsupported format {_short(fmt)} "
                             f"(this slimops reads format {FORMAT_VERSION})")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{source}: 'meta' must be an object, got {type(meta).__name__}")
        raw = data["entries"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{source}: 'entries' must be a non-empty list")
        entries = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise ValueError(f"{source}: entries[{i}] must be an object, got {_short(item)}")
            for key in ("width", "median_ms"):
                if key not in item:
                    raise ValueError(f"{source}: entries[{i}] is missing {key!r}")
            w = _as_float(item["width"])
            if w is None:
                raise ValueError(f"{source}: entries[{i}].width must be a number, got "
                                 f"{_short(item['width'])}")
            try:
                median = _positive_ms(item["median_ms"], f"entries[{i}].median_ms")
                p90 = item.get("p90_ms")
                p90 = None if p90 is None else _positive_ms(p90, f"entries[{i}].p90_ms")
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
            entries.append(LatencyEntry(float(w), median, p90))
        try:
            return cls(entries, meta)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str) -> None:
        """Write the table as JSON to ``path``, atomically.

        The text is made and checked with ``load``'s rules first (metadata that is not JSON,
        NaN or Infinity: ``ValueError``, nothing written), then written to a temporary file
        beside ``path``, flushed to disk and renamed over it: an existing table is replaced
        whole or not at all.
        """
        try:
            text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise ValueError(f"cannot save the latency table to {path}: {e}") from None
        type(self).from_dict(json.loads(text), source=f"the table for {path}")
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        """Read a table saved by ``save``; ``ValueError`` naming ``path`` if it is broken.

        (A missing file raises ``FileNotFoundError``.)
        """
        with open(path) as f:
            text = f.read()
        try:
            # NaN / Infinity are not JSON; refuse them here rather than as latencies later.
            data = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as e:  # json.JSONDecodeError, NaN / Infinity, too many digits
            raise ValueError(f"{path}: not valid JSON ({_short(str(e), 200)})") from None
        except RecursionError:
            raise ValueError(f"{path}: not a latency table (JSON nested too deeply)") from None
        return cls.from_dict(data, source=path)

    # --- printing ------------------------------------------------------------------------

    def _widths_str(self) -> str:
        return ", ".join(f"{w:g}" for w in self.widths)

    def format(self, budget_ms: Optional[float] = None) -> str:
        """A plain-text table: width, median and p90 ms (with a budget: which widths fit)."""
        header = ["width", "median ms", "p90 ms"] + (["fits"] if budget_ms is not None else [])
        rows = []
        for e in self.entries:
            row = [f"{e.width:g}x", f"{e.median_ms:.2f}",
                   "-" if e.p90_ms is None else f"{e.p90_ms:.2f}"]
            if budget_ms is not None:
                row.append("yes" if e.median_ms <= budget_ms else "no")
            rows.append(row)
        lines = text_table(header, rows).split("\n")
        m = self.meta
        if m:
            keys = ("model", "deployment", "input_shape", "threads", "cpu_isa", "torch",
                    "measured_at")
            desc = ", ".join(f"{k} {m[k]}" for k in keys if k in m)
            lines.insert(0, f"latency table ({desc})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        body = ", ".join(f"{e.width:g}: {e.median_ms:.3g}" for e in self.entries)
        return f"LatencyTable({{{body}}})"


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid latency")
