"""bench/matrix.py, the performance matrix, without asserting on any timing: the table, the
SLOWER flag and --guard on synthetic cells, the cells it builds computing what slimops
computes, --emulate's restart, and one quick run through ``python -m slimops bench --matrix``."""

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from slimops.apps.cli import main

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import matrix  # noqa: E402  (bench/ is not a package)


def _cell(name, slow, fast):
    def wait(seconds):
        def run():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return run
    return matrix.Cell(name, {"slimops": wait(slow), "reference": wait(fast)}, budget_s=0.0)


def test_interleaved_medians_and_the_slower_flag():
    slower, faster = _cell("a", 0.004, 0.001), _cell("b", 0.001, 0.004)
    for c in (slower, faster):
        matrix.measure(c)
        assert set(c.rows) == {"slimops", "reference"}
    table = matrix.report([slower, faster], "header").splitlines()
    assert table[0] == "header"
    row_a = next(line for line in table if line.startswith("| a "))
    row_b = next(line for line in table if line.startswith("| b "))
    assert row_a.rstrip().endswith("| SLOWER |")
    assert not row_b.rstrip().endswith("SLOWER |")


def test_glibc_pin_reports_what_it_set():
    got = matrix.pin_glibc_heap()
    assert got is None or got.startswith("glibc, mallopt mmap threshold")


def test_training_cells_run_the_same_step_on_shared_weights():
    cells = matrix.build_cells("train", quick=True)
    assert [c.name.split()[1] for c in cells] == ["digits-cnn", "s-mobilenet-v2"]
    for c in cells:
        assert set(c.variants) == {"slimops", "reference"}
        c.variants["slimops"]()
        c.variants["reference"]()


def test_eval_cells_compute_the_same_output_every_way():
    """Every eval variant of a cell (eager slimops, reference style, the dense traced network
    and slimops' frozen TorchScript) gives one output: the ratios compare like with like."""
    model = matrix.demo_model(matrix.WIDTHS)
    cells = matrix._eval_cells("digits", model, torch.randn(1, 1, 8, 8), 0.0, (0.25, 1.0))
    assert [c.name for c in cells] == ["eval digits 0.25x", "eval digits 1x"]
    for c in cells:
        assert set(c.variants) == {"slimops", "reference", "dense-jit", "slimops-frozen"}
        want = c.variants["slimops"]()
        for name in ("reference", "dense-jit", "slimops-frozen"):
            torch.testing.assert_close(c.variants[name](), want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{c.name} {name}: {m}")
    c = cells[0]
    c.rows = {"slimops": 2e-3, "reference": 4e-3, "dense-jit": 1e-3, "slimops-frozen": 5e-4}
    row = next(line for line in matrix.report([c], "h").splitlines() if line.startswith("| eval"))
    assert row.split("|")[6:9] == [" 2.00 ", " 0.50 ", " 0.50 "]  # eager/jit, frozen ms, frozen/jit


def test_cli_matrix_quick_prints_the_table(capsys, monkeypatch):
    # The CLI imports bench/matrix.py (this module) and calls its main(); toy cells keep
    # this test short.
    monkeypatch.setattr(matrix, "build_cells", lambda which, quick: [_cell("toy", 0.0, 0.0)])
    monkeypatch.setitem(sys.modules, "matrix", matrix)
    code = main(["bench", "--matrix", "--quick"])
    out = capsys.readouterr().out
    assert code in (0, None)
    assert "| cell | slimops ms | reference ms |" in out


def test_op_cells_cover_every_family_eval_and_train():
    cells = matrix.build_cells("ops", quick=True)
    assert len(cells) == 2 * len(matrix.OP_LAYERS)  # eval and train, one width when quick
    assert {c.name.split()[1] for c in cells} == {"eval", "train"}
    for c in cells:
        assert set(c.variants) == {"slimops", "reference"}
        out, ref = c.variants["slimops"](), c.variants["reference"]()
        assert out.shape == ref.shape


def test_cli_forwards_the_cells_choice(capsys, monkeypatch):
    asked = []
    monkeypatch.setattr(matrix, "build_cells",
                        lambda which, quick: asked.append(which) or [_cell("toy", 0.0, 0.0)])
    monkeypatch.setitem(sys.modules, "matrix", matrix)
    main(["bench", "--matrix", "--quick", "--cells", "resnet"])
    assert asked == ["resnet"]


def test_resnet_cells_eval_per_width_and_a_short_training_cell(monkeypatch):
    # Tracing four dense ResNet-50s is slow and not what is tested here.
    monkeypatch.setattr(matrix, "dense_jit", lambda model, w, x: (lambda t: model(t)))
    cells = matrix.build_cells("resnet", quick=False)
    names = [c.name for c in cells]
    assert names == [f"eval s-resnet-50 224 b1 {w:g}x" for w in matrix.WIDTHS] + [
        "train s-resnet-50 224 b8"]
    assert cells[-1].min_rounds == 3 and set(cells[-1].variants) == {"slimops", "reference"}
    assert matrix.build_cells("resnet", quick=True) == []  # too slow for a smoke run


def test_repeated_passes_judge_by_the_median_ratio():
    """--repeat: rows are each variant's median over the passes, SLOWER and the ratio follow
    the median of the passes' ratios (one contended pass does not flag a cell), and the table
    gives the range."""
    cell = matrix.Cell("c", {"slimops": lambda: None, "reference": lambda: None}, 0.0)
    cell.runs = [{"slimops": 1.0, "reference": 2.0}, {"slimops": 3.0, "reference": 1.0},
                 {"slimops": 1.0, "reference": 1.25}]
    matrix.merge_runs(cell)
    assert cell.rows == {"slimops": 1.0, "reference": 1.25}
    assert matrix.ratio(cell) == 0.8  # median of 0.5, 3.0, 0.8
    lines = matrix.report([cell], "h").splitlines()
    assert "range (3 passes)" in lines[2]
    row = next(line for line in lines if line.startswith("| c "))
    assert "| 0.80 |" in row and "| 0.50-3.00 |" in row and "SLOWER" not in row
    cell.runs[2] = {"slimops": 1.5, "reference": 1.25}  # now two of three passes slower
    assert matrix.ratio(cell) == 1.2
    assert "SLOWER" in matrix.report([cell], "h")


def test_repeat_runs_every_cell_each_pass(capsys, monkeypatch):
    cells = [_cell("x", 0.0, 0.0), _cell("y", 0.0, 0.0)]
    monkeypatch.setattr(matrix, "build_cells", lambda which, quick: cells)
    assert matrix.main(["--quick", "--repeat", "3"]) == 0
    assert [len(c.runs) for c in cells] == [3, 3]
    out = capsys.readouterr().out
    assert "3 passes over the cells" in out and "range (3 passes)" in out
    with pytest.raises(SystemExit):
        matrix.main(["--repeat", "0"])


def test_cli_forwards_repeat(monkeypatch):
    seen = []
    monkeypatch.setattr(matrix, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "matrix", matrix)
    main(["bench", "--matrix", "--quick", "--repeat", "2"])
    assert seen and seen[0][-2:] == ["--repeat", "2"]


def test_sweep_geometries_are_seeded_valid_and_cover_every_kind():
    geoms = matrix.sweep_geometries(3, 80)
    assert geoms == matrix.sweep_geometries(3, 80)  # the same sample on any machine
    assert geoms != matrix.sweep_geometries(4, 80)
    assert {g["kind"] for g in geoms} == set(matrix.SWEEP_KINDS)
    assert {g["mode"] for g in geoms} == {"eval", "train"}
    for g in geoms:
        reach = g["dilation"] * (g["k"] - 1) + 1
        out_side = (g["side"] + 2 * (reach // 2) - reach) // g["stride"] + 1
        assert out_side >= 1
        assert g["batch"] * g["cin"] * g["side"] ** 2 <= matrix.SWEEP_MAX_INPUT
        if g["mode"] == "train" and g["kind"] != "conv-only":
            assert g["batch"] * out_side ** 2 >= 2  # batch norm needs two values a channel


def test_sweep_cells_run_slimops_and_the_reference_on_one_layer():
    """Each sweep cell's two variants compute the same thing on the same Parameters (eval
    output; in training the output and the weight gradient both accumulate)."""
    cells = matrix.build_cells("sweep", quick=False, sweep=(5, 12))
    assert len(cells) == 12
    assert [c.name for c in cells] == [matrix.sweep_name(g)
                                       for g in matrix.sweep_geometries(5, 12)]
    for c in cells:
        assert set(c.variants) == {"slimops", "reference"} and c.warmups == 24
        out, ref = c.variants["slimops"](), c.variants["reference"]()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{c.name}: {m}")
    assert len(matrix.build_cells("sweep", quick=True)) == 6


def test_cli_forwards_the_sweep_choice(capsys, monkeypatch):
    asked = []
    monkeypatch.setattr(matrix, "build_cells",
                        lambda which, quick, **kw: asked.append((which, kw))
                        or [_cell("toy", 0.0, 0.0)])
    monkeypatch.setitem(sys.modules, "matrix", matrix)
    main(["bench", "--matrix", "--quick", "--cells", "sweep"])
    assert asked == [("sweep", {"sweep": (0, 40)})]


def test_train224_cells_are_the_mobilenets_at_batch_1_and_8():
    """The issue's ImageNet-size training cells (built, not run: a step is ~1 s)."""
    cells = matrix.build_cells("train224", quick=False)
    assert [c.name for c in cells] == [f"train s-mobilenet-{v} 224 b{b}"
                                       for v in ("v1", "v2") for b in (1, 8)]
    assert all(set(c.variants) == {"slimops", "reference"} and c.warmups == 8 for c in cells)
    assert matrix.build_cells("train224", quick=True) == []


def test_library_caps_names_the_caps_set(monkeypatch):
    for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    assert matrix.library_caps() == "oneDNN/MKL/ATen uncapped"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert matrix.library_caps() == "ONEDNN_MAX_CPU_ISA=AVX2"


def test_emulate_restarts_with_every_library_capped(monkeypatch):
    """--emulate avx2 restarts the script with all four caps set (the libraries read them at
    load); once they are set it runs in place."""
    calls = []

    class Restarted(Exception):
        pass

    def fake_execve(path, args, env):
        calls.append((args, env))
        raise Restarted

    monkeypatch.setattr(matrix.os, "execve", fake_execve)
    for name in matrix.EMULATE_ENV["avx2"]:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Restarted):
        matrix.main(["--emulate", "avx2", "--cells", "train", "--quick"])
    args, env = calls[0]
    assert args[1:] == [os.path.abspath(matrix.__file__), "--emulate", "avx2", "--cells",
                        "train", "--quick"]
    assert all(env[k] == v for k, v in matrix.EMULATE_ENV["avx2"].items())


def test_cli_forwards_emulate(monkeypatch):
    got = []
    monkeypatch.setattr(matrix, "main", lambda argv: got.append(argv) or 0)
    assert main(["bench", "--matrix", "--emulate", "avx2", "--cells", "eval"]) == 0
    assert got[0][-4:] == ["--cells", "eval", "--emulate", "avx2"]


def test_busy_cells_judge_by_the_mean_and_show_the_medians(monkeypatch):
    """Under load a variant's call times are bimodal: a cell summarised by the mean (--busy's
    default) counts the slow calls the median would hide, and the table gives both ratios.
    (A fake clock: each call advances it by its duration, so the figures are exact.)"""
    clock = [0.0]
    monkeypatch.setattr(matrix.time, "perf_counter", lambda: clock[0])
    calls = {"slimops": 0, "reference": 0}

    def timed(name, fast, slow_every, slow):
        def run():
            calls[name] += 1
            clock[0] += slow if calls[name] % slow_every == 0 else fast
        return run

    # reference: 1 ms, every 4th call 40 ms (median 1 ms, mean 10.75 ms); slimops: 2 ms
    cell = matrix.Cell("busy", {"slimops": timed("slimops", 0.002, 10**9, 0.0),
                                "reference": timed("reference", 0.001, 4, 0.04)}, 0.0,
                       statistic="mean", min_rounds=8, warmups=0)
    matrix.measure(cell)
    assert cell.rows == pytest.approx({"slimops": 0.002, "reference": 0.01075})
    assert matrix.ratio(cell) == pytest.approx(0.002 / 0.01075)
    assert cell.median_runs == [pytest.approx({"slimops": 0.002, "reference": 0.001})]
    lines = matrix.report([cell], "h").splitlines()
    assert "slimops/reference by medians" in lines[2]
    row = next(line for line in lines if line.startswith("| busy "))
    assert "| 0.19 |" in row and "| 2.00 |" in row and "SLOWER" not in row


def test_busy_runs_default_to_the_mean(capsys, monkeypatch):
    cells = [_cell("x", 0.0, 0.0)]
    monkeypatch.setattr(matrix, "build_cells", lambda which, quick: cells)
    monkeypatch.setattr(matrix.subprocess, "Popen", lambda *a, **k: None)  # no spinner
    assert matrix.main(["--quick", "--busy"]) == 0
    assert cells[0].statistic == "mean" and "per variant the mean of its calls" in \
        capsys.readouterr().out
    cells = [_cell("y", 0.0, 0.0)]
    assert matrix.main(["--quick"]) == 0 and cells[0].statistic == "median"
