"""The command line (python -m slimops): profile and info."""

import json

import pytest

from slimops.apps.cli import main


def test_profile_prints_a_row_per_width(capsys):
    assert main(["profile", "slim_cnn", "--input-size", "1", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "slim_cnn, input (1, 3, 32, 32)" in out
    for w in ("0.25x", "0.5x", "0.75x", "1x"):
        assert w in out
    assert "paper MACs" not in out  # no paper figures for the demo model


def test_profile_shows_the_paper_next_to_the_measurement(capsys):
    assert main(["profile", "s_shufflenet"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("2x"))
    assert "5,401,816" in row and "48,960" in row and "524.00M" in row


def test_profile_unknown_model(capsys):
    assert main(["profile", "resnet1000"]) == 2
    assert "unknown model 'resnet1000'" in capsys.readouterr().err


def test_info_is_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"] in ("C++", "reference")


def test_no_command_is_an_error():
    with pytest.raises(SystemExit):
        main([])


# ------------------------------------------------------------- argument validation (exit 2)

BAD_ARGUMENTS = [
    ["demo", "--epochs", "-1"], ["demo", "--epochs", "0"], ["demo", "--batch-size", "0"],
    ["demo", "--lr", "nan"], ["demo", "--lr", "-1"], ["demo", "--repeats", "0"],
    ["demo", "--widths", "0.5", "inf"], ["demo", "--reference-epochs", "-2"],
    ["demo", "--workers", "0"],
    ["train", "--batch-size", "0"], ["train", "--lr", "-1"], ["train", "--lr", "nan"],
    ["train", "--epochs", "-3"], ["train", "--device", "foo"], ["train", "--image-size", "0"],
    ["train", "--workers", "-1"], ["train", "--weight-decay", "inf"], ["train", "--widths", "0"],
    ["train", "--epochs", "two"], ["train", "--sandwich", "-1"], ["train", "--calibrate-bn", "0"],
    ["train", "--threads", "0"], ["train", "--latency-repeats", "-1"],
    ["eval", "run/latest.pt", "--data", "data", "--batch-size", "0"],
    ["eval", "run/latest.pt", "--data", "data", "--widths", "-1"],
    ["eval", "run/latest.pt", "--data", "data", "--json", "no/such/folder/e.json"],
    ["export", "run/latest.pt", "--width", "0", "-o", "net.pt"],
    ["export", "run/latest.pt", "--width", "1", "--format", "tflite", "-o", "net.pt"],
    ["export", "run/latest.pt", "--width", "1", "-o", "no/such/folder/net.pt"],
    ["profile", "slim_cnn", "--repeats", "0"], ["profile", "--input-size", "1", "3", "0", "32"],
    ["pick-width", "slim_cnn", "--budget-ms", "3", "--repeats", "0"],
    ["pick-width", "slim_cnn", "--budget-ms", "-1"],
    ["pick-width", "slim_cnn", "--budget-ms", "nan"],
    ["pick-width", "slim_cnn", "--budget-ms", "3", "--input-size", "0", "3", "32", "32"],
    ["pick-width", "slim_cnn", "--budget-ms", "3", "--input-size", "1", "3", "x", "32"],
    ["pick-width", "slim_cnn", "--budget-ms", "3", "--device", "foo"],
    ["pick-width", "slim_cnn", "--budget-ms", "3", "--save", "no/such/folder/t.json"],
    ["bench", "--threads", "0"],
]


@pytest.mark.parametrize("argv", BAD_ARGUMENTS, ids=[" ".join(a) for a in BAD_ARGUMENTS])
def test_bad_arguments_exit_2_before_any_side_effect(argv, tmp_path, monkeypatch, capsys):
    """Every value is checked while parsing: a one-line error, exit 2, and nothing created
    (no run folder, no file), before any model is built or measured."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    if argv[0] == "train":
        argv = ["train", "--model", "slim_cnn", "--data", str(data), "--out",
                str(tmp_path / "run")] + argv[1:]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_version_is_written_once(capsys):
    """`slimops --version` answers (it was an error), and the installed metadata's version is
    slimops.__version__ (pyproject.toml reads it from there: one place)."""
    import importlib.metadata

    import slimops

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"slimops {slimops.__version__} ")
    assert importlib.metadata.version("slimops") == slimops.__version__


# ------------------------------------------------- optional packages (issue 16, exit 2)

def _without(monkeypatch, *modules):
    """importlib.util.find_spec as if ``modules`` were not installed."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in modules else real(name, *a, **k))


@pytest.mark.parametrize("argv,module,pip,extra", [
    (["demo"], "sklearn", "scikit-learn", "demo"),
    (["train", "--model", "slim_cnn", "--data", "DATA", "--out", "RUN"], "PIL", "Pillow",
     "train"),
])
def test_missing_package_is_one_line_before_any_side_effect(argv, module, pip, extra,
                                                            tmp_path, monkeypatch, capsys):
    """`slimops demo` without scikit-learn exited 1 with a 22-line traceback; `train` without
    Pillow made its output folder, then died. Now: one line naming the package and the
    extra, exit 2, nothing created."""
    (tmp_path / "data").mkdir()
    argv = [str(tmp_path / "data") if a == "DATA" else str(tmp_path / "run") if a == "RUN"
            else a for a in argv]
    _without(monkeypatch, module)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert pip in err and f"slimops[{extra}]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_missing_tqdm_is_a_note_not_an_error(monkeypatch, capsys):
    from slimops.apps.cli import _missing_packages

    _without(monkeypatch, "tqdm", "matplotlib")
    assert _missing_packages("train") is None
    err = capsys.readouterr().err
    assert "no progress bar" in err and "no accuracy-vs-MACs plot" in err


def test_bench_outside_a_source_checkout_is_one_line(monkeypatch, capsys):
    import slimops.apps.benchmark_report as report

    def no_suite():
        raise FileNotFoundError("no benchmark suite at /site-packages/bench: ...")

    monkeypatch.setattr(report, "bench_dir", no_suite)
    assert main(["bench", "--matrix"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slimops bench: no benchmark suite")
