"""`slimops train`, `slimops eval` and `slimops export` end to end on a tiny image folder
(3 classes of 16x16 images, slim_cnn, 1 epoch): what a run writes, and that eval and export
read it back."""

import csv
import json
import math
import os

import pytest
import torch

from slimops.apps.cli import main

from helpers import image_folder

pytest.importorskip("PIL")

CLASSES = ("cat", "dog", "owl")
SIZE = 16


def _image_folder(root, per_class=4, seed=0):
    return image_folder(root, CLASSES, per_class=per_class, size=SIZE, seed=seed)


def _train_argv(data, out, *extra):
    return ["train", "--model", "slim_cnn", "--data", str(data), "--out", str(out),
            "--epochs", "1", "--batch-size", "4", "--image-size", str(SIZE), "--workers", "0",
            "--no-progress", "--threads", "1", "--latency-repeats", "2", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training run, shared by the tests that read it."""
    root = tmp_path_factory.mktemp("cli")
    data = _image_folder(root / "data")
    out = root / "run"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(_train_argv(data, out, "--sandwich", "1", "--inplace-distillation",
                                "--calibrate-bn", "2", "--ema", "0.5")) == 0
    return data, out, buf.getvalue()


def test_train_writes_checkpoints_with_what_eval_needs(run):
    data, out, printed = run
    assert (out / "latest.pt").is_file() and (out / "best.pt").is_file()
    state = torch.load(out / "latest.pt", weights_only=True)
    assert state["meta"]["model"] == "slim_cnn"
    assert state["meta"]["classes"] == list(CLASSES)
    assert state["meta"]["image_size"] == SIZE
    assert state["meta"]["widths"] == [0.25, 0.5, 0.75, 1.0]


def test_train_metrics_csv_best_and_summary(run):
    """metrics.csv: per epoch a row per width (largest first; the sandwich rule's random
    widths as one 'random' row with its loss and no accuracy), then the BN-calibrated
    accuracies; accuracies in %. The summary table: one row per width."""
    data, out, printed = run
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "width", "loss", "top1", "top5", "bn_stats", "weights"]
    training = [r for r in rows if r["bn_stats"] == "training" and r["weights"] == "model"]
    assert [r["width"] for r in training] == ["1", "0.75", "0.5", "0.25", "random"]
    assert all(r["epoch"] == "1" for r in rows)
    # sandwich=1 on 4 listed widths: the extremes each step, the middle ones at random
    assert training[0]["loss"] and training[3]["loss"] and training[4]["loss"]
    assert training[4]["top1"] == "" and training[4]["top5"] == ""
    state = torch.load(out / "latest.pt", weights_only=True)
    entry = state["history"][-1]
    for r in training[:4]:
        w = float(r["width"])
        assert float(r["top1"]) == pytest.approx(100 * entry["val_acc"][w], abs=0.005)
        assert float(r["top5"]) == 100.0
    calibrated = [r for r in rows if r["bn_stats"] == "calibrated" and r["weights"] == "model"]
    ema = [(r["bn_stats"], r["width"]) for r in rows if r["weights"] == "ema"]
    assert ema == [(b, w) for b in ("training", "calibrated") for w in ("1", "0.75", "0.5", "0.25")]
    assert [r["width"] for r in calibrated] == ["1", "0.75", "0.5", "0.25"]
    assert all(r["loss"] == "" for r in calibrated)
    assert set(entry["calibrated_acc"]) == {0.25, 0.5, 0.75, 1.0}
    # the printed lines: % with two decimals, the calibration, the summary
    assert "top-1 % 1x:" in printed and "top-5 % 1x:100.00" in printed
    assert "BN calibrated on 2 training batches per width" in printed
    assert "EMA top-1 % 1x:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [r["width"] for r in summary["widths"]] == [0.25, 0.5, 0.75, 1.0]
    macs = [r["macs"] for r in summary["widths"]]
    assert macs == sorted(macs) and macs[0] > 0
    # each width has a latency entry (a number; its value is bench/'s business, not a test's)
    assert all(isinstance(r["latency_ms"], float) and math.isfinite(r["latency_ms"])
               and r["epoch"] == 1 for r in summary["widths"])
    assert all(0 <= r["ema_best_top1"] <= 100 for r in summary["widths"])
    table = printed[printed.index("summary ("):].splitlines()
    assert table[1].split()[:3] == ["width", "top-1", "%"]
    assert [ln.split()[0] for ln in table[2:6]] == ["0.25x", "0.5x", "0.75x", "1x"]
    assert "best checkpoint (by the mean top-1 over the widths)" in printed
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional
        png = out / "accuracy_vs_macs.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in printed
    else:
        assert "no accuracy-vs-MACs plot" in printed
    # best.pt holds the state of the highest mean top-1 seen (before or after calibration)
    from slimops.apps.runs import best_score

    def mean(acc):
        return sum(acc.values()) / len(acc)

    seen = [mean(e[k]) for e in state["history"] for k in ("val_acc", "calibrated_acc")
            if k in e]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best_score(best["history"][-1]) == pytest.approx(max(seen))


def test_eval_prints_top1_top5_per_width(run, tmp_path, capsys):
    data, out, _ = run
    capsys.readouterr()
    result = tmp_path / "eval.json"
    assert main(["eval", str(out / "latest.pt"), "--data", str(data), "--workers", "0",
                 "--json", str(result)]) == 0
    printed = capsys.readouterr().out
    assert os.path.join(str(data), "val") in printed
    got = json.loads(result.read_text())
    assert list(got["widths"]) == ["0.25", "0.5", "0.75", "1"] and got["images"] == 6
    for acc in got["widths"].values():
        assert 0 <= acc["top1"] <= 100 and acc["top5"] == 100.0  # 3 classes: top-5 is all
    # The checkpoint's final accuracies are what eval measures (same weights, same data).
    state = torch.load(out / "latest.pt", weights_only=True)
    final = state["history"][-1]
    saved = final.get("calibrated_acc") or final["val_acc"]
    for w, a in saved.items():
        assert got["widths"][f"{w:g}"]["top1"] == pytest.approx(100 * a)
    # a class folder given directly, and a subset of widths
    assert main(["eval", str(out / "latest.pt"), "--data", str(data / "val"), "--workers", "0",
                 "--widths", "1.0", "0.25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[-2:]] == ["0.25x", "1x"]
    # the EMA weights (calibrated after training, like the model)
    assert main(["eval", str(out / "latest.pt"), "--data", str(data), "--workers", "0", "--ema",
                 "--json", str(result)]) == 0
    got = json.loads(result.read_text())
    assert got["ema"] is True
    for w, a in final["calibrated_ema_acc"].items():
        assert got["widths"][f"{w:g}"]["top1"] == pytest.approx(100 * a)
    assert state["ema_n_averaged"] == 3  # 12 images, batch 4: one update per step


def test_eval_of_an_old_checkpoint_reads_config_json(run, tmp_path, capsys):
    """A checkpoint from before 'meta' is read with the config.json beside it; without one,
    a one-line error (exit 2)."""
    data, out, _ = run
    state = torch.load(out / "latest.pt", weights_only=True)
    del state["meta"]
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / "latest.pt")
    assert main(["eval", str(old / "latest.pt"), "--data", str(data), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err
    (old / "config.json").write_text((out / "config.json").read_text())
    assert main(["eval", str(old / "latest.pt"), "--data", str(data), "--workers", "0"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["eval", "NOPE", "--data", "DATA"], "no checkpoint at"),
    (["eval", "NOTCKPT", "--data", "DATA"], "not a readable checkpoint"),
    (["eval", "CKPT", "--data", "DATA", "--widths", "3"], "does not run at width 3"),
    (["eval", "CKPT", "--data", "DATA", "--widths", "0.3"], "no BN statistics"),
    (["eval", "CKPT", "--data", "NODIR"], "no such directory"),
])
def test_eval_errors_are_one_line(run, tmp_path, capsys, argv, message):
    data, out, _ = run
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    subst = {"NOPE": str(tmp_path / "none.pt"), "NOTCKPT": str(tmp_path / "junk.pt"),
             "CKPT": str(out / "latest.pt"), "DATA": str(data), "NODIR": str(tmp_path / "x")}
    capsys.readouterr()
    assert main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


# ------------------------------------------------------------------------------- export

def _reference(out, width):
    """The checkpoint's model at ``width`` (eval mode) and a batch of 2 inputs."""
    from slimops.apps.runs import load_run
    from slimops.width import width as width_scope

    model, meta, _ = load_run(str(out / "latest.pt"))
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), width_scope(model, width):
        return model(x), x


@pytest.mark.parametrize("fmt", ["pt", "torchscript", "onnx"])
def test_export_one_width_in_each_format(run, tmp_path, capsys, fmt):
    data, out, _ = run
    target = tmp_path / f"net.{fmt}"
    assert main(["export", str(out / "latest.pt"), "--width", "0.5", "--format", fmt,
                 "-o", str(target)]) == 0
    assert f"-> {target} ({fmt}," in capsys.readouterr().out
    expected, x = _reference(out, 0.5)
    if fmt == "pt":
        net = torch.load(target, weights_only=False)
        assert not any("Slimmable" in type(m).__name__ for m in net.modules())
        with torch.no_grad():
            got = net(x)
    elif fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(target))(x)
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["output"], {"input": x.numpy()})[0])
    assert got.shape == (2, len(CLASSES))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_export_errors_are_one_line(run, tmp_path, capsys, monkeypatch):
    data, out, _ = run
    ckpt = str(out / "latest.pt")
    assert main(["export", ckpt, "--width", "3", "-o", str(tmp_path / "a.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("export: ")
    assert main(["export", str(tmp_path / "none.pt"), "--width", "1", "-o",
                 str(tmp_path / "a.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    # onnx without the onnx extra: one line naming it, nothing written
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "onnx" else real(name, *a, **k))
    assert main(["export", ckpt, "--width", "1", "--format", "onnx", "-o",
                 str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnx" in err and "slimops[onnx]" in err
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "a.pt").exists()
    # pt and torchscript need no onnx
    assert main(["export", ckpt, "--width", "1", "-o", str(tmp_path / "a.pt")]) == 0


def test_train_amp_on_cpu(tmp_path, capsys):
    """--amp on CPU: bf16 autocast (a note says slimops' ops stay float32); fp16 needs CUDA."""
    data = _image_folder(tmp_path / "data", per_class=2)
    assert main(_train_argv(data, tmp_path / "run", "--amp", "--widths", "0.5", "1.0",
                            "--latency-repeats", "0")) == 0
    printed = capsys.readouterr().out
    assert "mixed precision: autocast bfloat16 on cpu" in printed and "epoch 1/1" in printed
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["scaler"] is None
    if not torch.cuda.is_available():
        assert main(_train_argv(data, tmp_path / "run2", "--amp", "fp16")) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
