"""slimops.deploy (LatencyTable), the pick-width command and concurrent serving at several
widths on one model. No timing asserts: tables come from dicts or a fake clock."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

import slimops
from slimops.apps.cli import main
from slimops.deploy import FORMAT_VERSION, LatencyEntry, LatencyTable
from slimops.models import slim_cnn

TABLE = {0.25: 1.0, 0.5: 2.0, 0.75: 3.5, 1.0: 5.0}


def _table() -> LatencyTable:
    return LatencyTable(TABLE, meta={"model": "Fake", "threads": 2})


# ------------------------------------------------------------------------------ pick_width


@pytest.mark.parametrize("budget, expected", [(100, 1.0), (4.9, 0.75), (2.5, 0.5), (1.5, 0.25)])
def test_pick_width_is_the_widest_within_budget(budget, expected):
    assert _table().pick_width(budget) == expected


@pytest.mark.parametrize("w", sorted(TABLE))
def test_pick_width_exact_boundary_fits(w):
    assert _table().pick_width(TABLE[w]) == w


def test_pick_width_ignores_a_non_monotonic_slower_narrow_width():
    # a narrower width measured slower (noise) must not hide a wider one that fits
    t = LatencyTable({0.25: 3.0, 0.5: 2.0, 1.0: 9.0})
    assert t.pick_width(2.5) == 0.5


def test_nothing_fits_names_the_fastest():
    with pytest.raises(ValueError, match=r"no width fits a budget of 0.5 ms.*0.25.*1.000 ms"):
        _table().pick_width(0.5)


@pytest.mark.parametrize("budget", [0, -1, float("nan"), float("inf"), "10", True, None])
def test_bad_budgets(budget):
    with pytest.raises(ValueError, match="budget_ms must be a positive finite number"):
        _table().pick_width(budget)


def test_pick_width_by_p90():
    t = LatencyTable([LatencyEntry(0.5, 2.0, 3.0), LatencyEntry(1.0, 4.0, 6.0)])
    assert t.pick_width(4.5) == 1.0
    assert t.pick_width(4.5, "p90") == 0.5
    assert t.pick_width(6.0, "p90") == 1.0
    with pytest.raises(ValueError, match=r"3.000 ms \(p90\)"):
        t.pick_width(2.5, "p90")
    with pytest.raises(ValueError, match="statistic must be"):
        t.pick_width(4.5, "mean")
    with pytest.raises(ValueError, match="no p90"):
        _table().pick_width(4.5, "p90")


@pytest.mark.parametrize("bad", [{}, {0.5: 0.0}, {0.5: -1.0}, {0.5: float("nan")},
                                 {0.5: "2"}, {"0.5": 2.0}, {0.5: True}])
def test_constructor_refuses_bad_tables(bad):
    with pytest.raises(ValueError):
        LatencyTable(bad)


def test_format_marks_what_fits():
    text = _table().format(budget_ms=2.0)
    lines = text.splitlines()
    assert "model Fake" in lines[0]
    assert [ln.split()[-1] for ln in lines[3:]] == ["yes", "yes", "no", "no"]
    assert "0.75x" in str(_table())


# ------------------------------------------------------------------------------------ JSON


def test_json_round_trip(tmp_path):
    t = LatencyTable([LatencyEntry(0.5, 2.0, 2.5), LatencyEntry(1.0, 4.0, None)],
                     meta={"model": "M", "input_shape": [1, 3, 8, 8]})
    path = tmp_path / "t.json"
    t.save(str(path))
    u = LatencyTable.load(str(path))
    assert u.entries == t.entries and u.meta == t.meta
    assert json.loads(path.read_text())["format"] == FORMAT_VERSION


def _write(tmp_path, content) -> str:
    path = tmp_path / "t.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _good() -> dict:
    return _table().to_dict()


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('{"format": 1, "entries": [{"width": 1.0, "median_ms": NaN}]}', "not valid JSON"),
    ([], "expected a JSON object"),
    ({"entries": []}, "missing field"),
    ({"format": 1}, "missing field.*entries"),
    ({"format": 99, "entries": [{"width": 1, "median_ms": 1}]}, "unsupported format"),
    ({"format": 1, "entries": []}, "non-empty list"),
    ({"format": 1, "entries": [{"median_ms": 1.0}]}, "missing 'width'"),
    ({"format": 1, "entries": [{"width": 1.0}]}, "missing 'median_ms'"),
    ({"format": 1, "entries": [{"width": "1.0", "median_ms": 1.0}]}, "width must be a number"),
    ({"format": 1, "entries": [{"width": True, "median_ms": 1.0}]}, "width must be a number"),
    ({"format": 1, "entries": [{"width": 1.0, "median_ms": 0}]}, "median_ms must be a positive"),
    ({"format": 1, "entries": [{"width": 1.0, "median_ms": -2}]}, "median_ms must be a positive"),
    ({"format": 1, "entries": [{"width": 1.0, "median_ms": "3"}]}, "median_ms must be a positive"),
    ({"format": 1, "entries": [{"width": 1.0, "median_ms": 1, "p90_ms": -1}]}, "p90_ms"),
    ({"format": 1, "entries": [{"width": 1.0, "median_ms": 1}, {"width": 1.0, "median_ms": 2}]},
     "distinct"),
    ({"format": 1, "entries": [{"width": -1.0, "median_ms": 1}]}, "positive"),
    ({"format": 1, "meta": [], "entries": [{"width": 1.0, "median_ms": 1}]}, "'meta' must be"),
    ({"format": True, "entries": [{"width": 1.0, "median_ms": 1}]}, "unsupported format True"),
    ({"format": 1.0, "entries": [{"width": 1.0, "median_ms": 1}]}, "unsupported format"),
    ({"format": 1, "entries": [{"width": 1.0, "median_ms": 2, "p90_ms": 1}]},
     "p90 of width 1 .* below its median"),
    ('{"format": 1, "entries": [{"width": 1.0, "median_ms": 1' + "0" * 400 + '}]}',
     "median_ms must be a positive"),
    ('{"format": 1, "entries": [{"width": 1' + "0" * 400 + ', "median_ms": 1}]}',
     "width must be a number"),
    ('{"format": 1, "entries": [{"width": 1.0, "median_ms": 1' + "0" * 5000 + '}]}',
     "not valid JSON"),
    ('{"format": 1, "entries": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
])
def test_broken_files_give_clear_errors(tmp_path, content, match):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=match) as info:
        LatencyTable.load(path)
    assert path in str(info.value)


def test_save_is_atomic_and_refuses_what_load_would_refuse(tmp_path):
    path = tmp_path / "t.json"
    good = _table()
    good.save(str(path))
    saved = path.read_text()
    for meta, match in (({"when": object()}, "cannot save"), ({"x": float("nan")}, "cannot save"),
                        ({"x": [1, {"y": float("inf")}]}, "cannot save")):
        with pytest.raises(ValueError, match=match):
            LatencyTable(TABLE, meta=meta).save(str(path))
        assert path.read_text() == saved  # the good table is still there, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary left
    assert LatencyTable.load(str(path)).entries == good.entries


def test_p90_below_median_is_refused():
    with pytest.raises(ValueError, match="below its median"):
        LatencyTable([LatencyEntry(1.0, 2.0, 1.5)])


# --------------------------------------------------------------------------------- measure


def _fake_clock(step_s: float = 0.001):
    ticks = itertools.count()
    return lambda: next(ticks) * step_s


def test_measure_covers_every_width_and_restores_state():
    model = slim_cnn().train()
    slimops.set_width(model, 0.5)
    threads = torch.get_num_threads()
    t = LatencyTable.measure(model, (1, 3, 16, 16), repeats=2, warmup=1, threads=1,
                             timer=_fake_clock())
    assert t.widths == slimops.model_widths(model)
    # the fake clock ticks 1 ms between the two reads of each timed run
    assert all(e.median_ms == pytest.approx(1.0) and e.p90_ms == pytest.approx(1.0)
               for e in t.entries)
    assert slimops.get_width(model) == 0.5 and model.training
    assert torch.get_num_threads() == threads
    assert t.meta["input_shape"] == [1, 3, 16, 16] and t.meta["model"] == type(model).__name__
    assert t.meta["threads"] == 1 and t.meta["repeats"] == 2
    for key in ("cpu_isa", "torch", "measured_at"):
        assert key in t.meta
    assert t.meta["device"] == "cpu" and t.meta["backend"] in ("C++", "reference")


def test_timed_region_waits_for_a_cuda_device(monkeypatch):
    """On a GPU the forward returns before it has run: the timer must read after a
    synchronize (checked with a recorder in place of torch.cuda.synchronize and a model on
    the CPU whose input device is reported as CUDA; no GPU here)."""
    import slimops.deploy as deploy

    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    real = deploy.time_calls

    def on_cuda(fn, repeats, warmup, **kwargs):
        assert kwargs["device"] == torch.device("cpu")
        return real(lambda: (fn(), log.append("fwd")), repeats, warmup,
                    **dict(kwargs, device=torch.device("cuda", 0)))

    monkeypatch.setattr(deploy, "time_calls", on_cuda)
    clock = _fake_clock()
    LatencyTable.measure(slim_cnn(), (1, 3, 16, 16), widths=[1.0], repeats=2, warmup=1,
                         timer=lambda: (log.append("clock"), clock())[1])
    assert log == ["fwd"] + ["sync", "clock", "fwd", "sync", "clock"] * 2


def test_measure_frozen_times_the_deployed_module(monkeypatch):
    """frozen=True times torchscript_widths(..., freeze=True) called as deployed(x, w), once
    built for all the widths, and leaves the model as it was."""
    export = importlib.import_module("slimops.export")  # slimops.export is also a function
    built, calls = [], []
    real = export.torchscript_widths

    def recording(model, x, widths, freeze=False):
        module = real(model, x, widths, freeze=freeze)
        built.append((tuple(widths), freeze))

        def deployed(inp, w):
            calls.append(w)
            return module(inp, w)
        return deployed

    monkeypatch.setattr(export, "torchscript_widths", recording)
    model = slim_cnn().train()
    t = LatencyTable.measure(model, (1, 3, 16, 16), widths=[0.25, 1.0], repeats=2, warmup=1,
                             timer=_fake_clock(), frozen=True)
    assert built == [((0.25, 1.0), True)]
    assert calls == [0.25] * 3 + [1.0] * 3  # warm-up + timed runs, through the module
    assert t.widths == (0.25, 1.0) and t.meta["deployment"] == "frozen TorchScript"
    assert "deployment frozen TorchScript" in t.format()
    assert model.training
    eager = LatencyTable.measure(model, (1, 3, 16, 16), widths=[1.0], repeats=1, warmup=0,
                                 timer=_fake_clock())
    assert eager.meta["deployment"] == "eager" and len(built) == 1


def test_cli_pick_width_frozen(capsys):
    rc = main(["pick-width", "slim_cnn", "--budget-ms", "1000", "--input-size", "1", "3", "16",
               "16", "--repeats", "2", "--frozen"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "measuring frozen TorchScript of slim_cnn" in out
    assert "deployment frozen TorchScript" in out and "-> width 1x" in out


def test_measure_real_clock_positive_and_subset_of_widths():
    model = slim_cnn()
    t = LatencyTable.measure(model, (1, 3, 16, 16), widths=[1.0, 0.25], repeats=2, warmup=0)
    assert t.widths == (0.25, 1.0)
    assert all(e.median_ms > 0 and math.isfinite(e.median_ms) for e in t.entries)


def test_measure_unknown_width_and_bad_args():
    model = slim_cnn()
    with pytest.raises(ValueError):
        LatencyTable.measure(model, (1, 3, 16, 16), widths=[0.1], repeats=1)
    with pytest.raises(ValueError, match="repeats"):
        LatencyTable.measure(model, (1, 3, 16, 16), repeats=0)
    with pytest.raises(ValueError, match="threads"):
        LatencyTable.measure(model, (1, 3, 16, 16), threads=0)


# ------------------------------------------------------------------ serving several widths


def test_threads_serve_different_widths_on_one_model():
    model = slim_cnn().eval()
    widths = slimops.model_widths(model)
    assert len(widths) == 4
    x = torch.randn(2, 3, 16, 16)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with torch.inference_mode():
        expected = {}
        for w in widths:
            with slimops.width(model, w):
                expected[w] = model(x).clone()
    barrier = threading.Barrier(len(widths))
    results, errors = {}, []

    def serve(w: float) -> None:
        try:
            barrier.wait(timeout=30)
            outs = []
            with torch.inference_mode():
                for _ in range(5):
                    with slimops.width(model, w):
                        outs.append(model(x).clone())
                        assert slimops.get_width(model) == w
            results[w] = outs
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(w,)) for w in widths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for w in widths:
        assert len(results[w]) == 5
        for out in results[w]:
            torch.testing.assert_close(out, expected[w], rtol=1e-5, atol=1e-6)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert slimops.get_width(model) == widths[-1]  # the default width is untouched


# ------------------------------------------------------------------------------------- CLI


def _saved(tmp_path) -> str:
    """A table for slim_cnn (the model the CLI tests name), saved."""
    path = str(tmp_path / "table.json")
    LatencyTable(TABLE, meta={"model": "SlimCNN", "threads": 2}).save(path)
    return path


def test_cli_pick_width_from_saved_table(tmp_path, capsys, monkeypatch):
    def no_measuring(*a, **k):
        raise AssertionError("--table must not measure")

    monkeypatch.setattr(LatencyTable, "measure", no_measuring)
    assert main(["pick-width", "slim_cnn", "--budget-ms", "3", "--table", _saved(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "budget 3 ms -> width 0.5x" in out
    assert "0.75x" in out and "median ms" in out


def test_cli_pick_width_nothing_fits(tmp_path, capsys):
    assert main(["pick-width", "slim_cnn", "--budget-ms", "0.5",
                 "--table", _saved(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no width fits" in err and "1.000 ms" in err


def test_cli_pick_width_unknown_model(capsys):
    assert main(["pick-width", "resnet1000", "--budget-ms", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet1000'" in err and "slim_cnn" in err


def test_cli_pick_width_broken_table(tmp_path, capsys):
    path = _write(tmp_path, "{oops")
    assert main(["pick-width", "slim_cnn", "--budget-ms", "3", "--table", path]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_pick_width_measures_and_saves(tmp_path, capsys):
    path = str(tmp_path / "measured.json")
    rc = main(["pick-width", "slim_cnn", "--budget-ms", "1000", "--input-size", "1", "3", "16",
               "16", "--repeats", "2", "--save", path])
    assert rc == 0
    out = capsys.readouterr().out
    assert "backend:" in out and "-> width 1x" in out
    assert LatencyTable.load(path).widths == (0.25, 0.5, 0.75, 1.0)


def test_serving_example_runs():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "serve_widths.py"), "--model", "slim_cnn",
         "--input-size", "1", "3", "16", "16", "--requests", "40", "--repeats", "3"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "served 40 requests" in proc.stdout
    assert "parameters not copied" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cli_pick_width_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing the arguments
        main(["pick-width", "slim_cnn", "--budget-ms", "3", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def _saved_with_meta(tmp_path, meta, widths=None) -> str:
    t = LatencyTable({w: TABLE[w] for w in (widths or TABLE)}, meta)
    path = str(tmp_path / "table.json")
    t.save(path)
    return path


@pytest.mark.parametrize("meta,ok", [
    ({"model_name": "s_mobilenet_v2"}, False),   # recorded by the CLI for another model
    ({"model": "SMobileNetV2"}, False),          # recorded by LatencyTable.measure
    ({"model_name": "slim_cnn"}, True),
    ({}, True),                                  # hand-made: nothing to check
])
def test_cli_pick_width_checks_the_tables_model(meta, ok, tmp_path, capsys):
    """Issue 14: a table measured for s_mobilenet_v2 answered for another model, exit 0."""
    code = main(["pick-width", "slim_cnn", "--budget-ms", "3",
                 "--table", _saved_with_meta(tmp_path, meta)])
    err = capsys.readouterr().err
    if ok:
        assert code == 0
    else:
        assert code == 2 and "was measured for" in err and "slim_cnn" in err


def test_cli_pick_width_checks_the_tables_widths(tmp_path, capsys):
    from slimops.models import slim_cnn
    from slimops.width import model_widths

    cls = type(slim_cnn()).__name__
    listed = model_widths(slim_cnn())
    path = _saved_with_meta(tmp_path, {"model": cls}, widths=[w for w in TABLE if w in listed])
    assert main(["pick-width", "slim_cnn", "--budget-ms", "3", "--table", path]) == 0
    capsys.readouterr()
    table = LatencyTable({0.3: 1.0, 1.0: 4.0}, {"model": cls})
    path = str(tmp_path / "other.json")
    table.save(path)
    assert main(["pick-width", "slim_cnn", "--budget-ms", "3", "--table", path]) == 2
    assert "0.3" in capsys.readouterr().err
