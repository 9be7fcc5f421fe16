"""The demo (slimops.apps.demo, ``python -m slimops demo``) in quick mode, and ``python -m slimops
train`` on a tiny generated ImageFolder. The demo's full run (about a minute) is not run here."""

import math
import os
import subprocess
import sys

import pytest
import torch

from slimops.apps.cli import main
from slimops.apps.imagefolder import ImageFolder, TrainTransform, ValTransform
from slimops.apps.demo import (DemoRow, _TrainingJob, _train_all, default_workers, demo_model,
                               format_demo_table, load_digits_split, run_demo)

WIDTHS = (0.25, 0.5, 0.75, 1.0)


# --------------------------------------------------------------------------- demo


def test_the_split_is_the_real_digits_data():
    data = load_digits_split()
    assert data.total == 1797 and data.num_classes == 10
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    # stratified: every digit 35 or 36 times among the 360 test images
    counts = torch.bincount(data.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert set(data.y_train.tolist()) == set(range(10))
    # standardised with the training set's statistics
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3
    # fixed: the same split every time
    again = load_digits_split()
    assert torch.equal(again.x_test, data.x_test) and torch.equal(again.y_train, data.y_train)


def test_run_demo_quick_gives_a_row_per_width_and_three_variants(capsys):
    result = run_demo(quick=True)
    out = capsys.readouterr().out

    assert [r.width for r in result.rows] == list(WIDTHS)
    for r in result.rows:
        for acc in (r.acc_switchable, r.acc_shared_bn, r.acc_individual):
            assert 0.0 <= acc <= 1.0
        assert r.latency_ms is not None and math.isfinite(r.latency_ms)
    params = [r.params for r in result.rows]
    macs = [r.macs for r in result.rows]
    assert params == sorted(params) and len(set(params)) == 4
    assert macs == sorted(macs)
    assert result.n_train == 192 and result.n_test == 360 and result.n_total == 1797
    assert result.num_classes == 10 and result.epochs == 1 and result.seed == 0
    assert set(result.train_seconds) == {"switchable", "reference", "shared", "individual"}
    assert "(a) through plain PyTorch" in out and "slimops takes" in out

    header = next(line for line in out.splitlines() if line.lstrip().startswith("width"))
    for column in ("switchable BN", "shared BN", "individual", "params", "MACs", "latency ms"):
        assert column in header
    rows = [line for line in out.splitlines()
            if line.strip().split(" ")[0] in ("0.25x", "0.5x", "0.75x", "1x")]
    assert len(rows) == 4
    assert "backend: cpu=" in out and "threads=" in out and "allocator" in out
    assert "scikit-learn digits, 1797" in out and "seed 0" in out
    assert "15 conv + BN layers" in out
    assert "total:" in out
    assert result.table in out


def test_individual_networks_have_the_slimmable_widths_architecture():
    """(c) must compare like with like: each single-width model has exactly the slimmable
    model's parameters and MACs at that width."""
    from slimops.profile import profile
    from slimops.width import channels

    base = (16, 32, 64)
    slim = profile(demo_model(WIDTHS, 10, 1, base, extra_blocks=4), (1, 1, 8, 8))
    for i, row in enumerate(slim):
        single = demo_model((1.0,), 10, 1, [channels(b, WIDTHS, divisor=8)[i] for b in base],
                            extra_blocks=4)
        (one,) = profile(single, (1, 1, 8, 8))
        assert (one.params, one.bn_params, one.macs) == (row.params, row.bn_params, row.macs)


def test_demo_model_is_slim_cnn_plus_blocks():
    from slimops.models import slim_cnn
    from slimops.nn import SwitchableBatchNorm2d

    plain = demo_model(WIDTHS, extra_blocks=0)
    torch.manual_seed(0)
    deep = demo_model(WIDTHS, extra_blocks=4, shared_bn=True)
    assert type(plain) is type(slim_cnn())
    assert plain.state_dict().keys() == slim_cnn(WIDTHS, 10, 1, (16, 32, 64)).state_dict().keys()
    assert len(deep.blocks) == 7
    bns = [m for m in deep.modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert len(bns) == 15 and all(m.shared for m in bns)
    assert deep(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_run_demo_knobs_widths_and_silence(capsys):
    result = run_demo(widths=(0.5, 1.0), seed=3, quick=True, verbose=False, reference_epochs=0,
                      workers=1)
    assert capsys.readouterr().out == ""
    assert [r.width for r in result.rows] == [0.5, 1.0] and result.seed == 3
    assert "reference" not in result.train_seconds


def _quick_jobs():
    data = load_digits_split()
    common = dict(epochs=1, num_classes=10, extra_blocks=1, batch_size=32, lr=0.1,
                  weight_decay=5e-4, seed=1, x_train=data.x_train[:96], y_train=data.y_train[:96])
    return [
        _TrainingJob("switchable", (0.5, 1.0), (16, 32, 64), False, False, **common),
        _TrainingJob("shared", (0.5, 1.0), (16, 32, 64), True, False, **common),
        _TrainingJob("reference", (0.5, 1.0), (16, 32, 64), False, True, **common),
        _TrainingJob("individual", (1.0,), (8, 16, 32), False, False, **common),
    ]


def test_trainings_in_worker_processes_equal_the_same_trainings_in_this_process(one_thread):
    """Two spawned workers, one thread each, give every job bit for bit the weights, BN
    statistics and counters the same jobs get run one after the other in this process on
    one thread: the pool changes where a training runs, not what it computes (nor which
    result belongs to which job)."""
    jobs = _quick_jobs()
    here = _train_all(jobs, 1)
    pooled = _train_all(jobs, 2)
    assert len(pooled) == len(jobs)
    for job, (state, seconds), (state_p, seconds_p) in zip(jobs, here, pooled):
        assert seconds > 0 and seconds_p > 0
        assert state.keys() == state_p.keys(), job.key
        for k in state:
            assert torch.equal(state[k], state_p[k]), (job.key, k)
    # the jobs differ from each other (a mix-up of results would be caught above)
    assert not torch.equal(here[0][0]["stem.conv.weight"], here[1][0]["stem.conv.weight"])


def test_demo_workers_are_checked_and_default_to_the_cores():
    with pytest.raises(ValueError, match="workers"):
        run_demo(quick=True, verbose=False, workers=0)
    assert default_workers() == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)


def test_format_demo_table():
    rows = [DemoRow(0.5, 0.9, 0.1, 0.95, 1234, 64, 2_000_000, 0.25),
            DemoRow(1.0, 1.0, 0.5, 0.975, 5678, 128, 8_000_000, None)]
    lines = format_demo_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[2].split() == ["0.5x", "90.0%", "10.0%", "95.0%", "1,234", "64", "2.00M", "0.250"]
    assert lines[3].split()[-1] == "-"


def test_demo_cli(capsys):
    assert main(["demo", "--quick", "--widths", "0.5", "1.0", "--repeats", "1",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "0.5x" in out and "switchable BN" in out


def test_demo_help_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "slimops", "demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--epochs" in proc.stdout and "--seed" in proc.stdout and "--quick" in proc.stdout


# --------------------------------------------------------------------------- train


def _image_folder(root, splits=("train", "val"), classes=("cat", "dog"), n=4, size=32):
    """``n`` RGB PNGs per class and split; the classes differ in colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for k, c in enumerate(classes):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.array([200, 40, 40] if k == 0 else [40, 40, 200])
                pixels = base + rng.integers(0, 50, (size + 2 * i, size, 3))  # some non-square
                Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(folder / f"{i}.png")
    return root


def _train(data, out, *extra):
    return main(["train", "--model", "slim_cnn", "--data", str(data), "--image-size", "32",
                 "--batch-size", "4", "--workers", "0", "--out", str(out), "--no-progress",
                 *extra])


def test_train_cli_on_a_tiny_image_folder(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    assert _train(data, tmp_path / "run", "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "2 classes, 8 train / 8 val images" in out
    assert "epoch 1/1" in out and "top-1" in out and "0.25x:" in out
    state = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    assert state["epoch"] == 1 and state["widths"] == list(WIDTHS)
    assert state["model"]["classifier.weight"].shape[0] == 2  # one output per class
    acc = state["history"][0]["val_acc"]
    assert set(acc) == set(WIDTHS) and all(0 <= a <= 1 for a in acc.values())
    assert (tmp_path / "run" / "config.json").is_file()


def test_train_resume_continues_exactly(tmp_path, capsys, monkeypatch):
    """A run stopped after its first epoch (by a KeyboardInterrupt in the second) and
    resumed with --resume ends with exactly the weights of an uninterrupted run."""
    from slimops.train import Trainer

    data = _image_folder(tmp_path / "data")
    assert _train(data, tmp_path / "straight", "--epochs", "2") == 0

    train_epoch = Trainer.train_epoch

    def interrupted(self, loader):
        if self.epoch >= 1:
            raise KeyboardInterrupt
        return train_epoch(self, loader)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "resumed", "--epochs", "2")
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    torch.manual_seed(1234)  # a fresh process: whatever state torch's RNG is in
    assert _train(data, tmp_path / "resumed", "--epochs", "2", "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "latest.pt", weights_only=True)
    assert b["epoch"] == 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)


def test_train_with_a_worker_process_and_no_val_split(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", splits=("train",))
    assert main(["train", "--model", "slim_cnn", "--data", str(data), "--epochs", "1",
                 "--batch-size", "8", "--workers", "1", "--out", str(tmp_path / "run"),
                 "--no-progress", "--widths", "0.5", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "no validation" in out and "widths 0.5x, 1x" in out and "epoch 1/1" in out


@pytest.mark.parametrize("case", ["missing", "unknown val class", "no checkpoint"])
def test_train_errors(tmp_path, capsys, case):
    if case == "missing":
        assert _train(tmp_path / "nowhere", tmp_path / "run", "--epochs", "1") == 2
        assert "no such directory" in capsys.readouterr().err
    elif case == "unknown val class":
        data = _image_folder(tmp_path / "data")
        (data / "val" / "bird").mkdir()
        assert _train(data, tmp_path / "run", "--epochs", "1") == 2
        assert "'bird' is not among the training classes" in capsys.readouterr().err
    else:
        data = _image_folder(tmp_path / "data")
        assert _train(data, tmp_path / "run", "--epochs", "1", "--resume") == 2
        assert "no checkpoint to resume" in capsys.readouterr().err


def test_image_folder_and_transforms(tmp_path):
    data = _image_folder(tmp_path / "data", splits=("train",))
    ds = ImageFolder(str(data / "train"), TrainTransform(24, crop_scale=0.25))
    assert ds.classes == ["cat", "dog"] and len(ds) == 8
    x, y = ds[7]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 1
    raw = ImageFolder(str(data / "train"))[3][0]  # 38x32 (H x W), uint8
    assert raw.shape == (3, 38, 32) and raw.dtype == torch.uint8
    val = ValTransform(16)(raw)
    assert val.shape == (3, 16, 16)
    # normalised with the ImageNet statistics: a mid-gray image maps near (0.5 - mean) / std
    gray = ValTransform(8)(torch.full((3, 20, 30), 128, dtype=torch.uint8))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (128 / 255 - mean) / std
    torch.testing.assert_close(gray.mean(dim=(1, 2)), expected, rtol=1e-4, atol=1e-4)
    assert not os.path.exists(data / "val")


# ------------------------------------------------------- train: no lost work, clear errors


def test_train_refuses_to_overwrite_a_checkpoint_without_resume_or_overwrite(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    assert _train(data, tmp_path / "run", "--epochs", "1") == 0
    latest = tmp_path / "run" / "latest.pt"
    saved = latest.read_bytes()
    assert _train(data, tmp_path / "run", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--resume" in err and "--overwrite" in err
    assert latest.read_bytes() == saved
    assert _train(data, tmp_path / "run", "--epochs", "1", "--resume", "--overwrite") == 2
    assert "exclude each other" in capsys.readouterr().err
    assert _train(data, tmp_path / "run", "--epochs", "1", "--overwrite") == 0
    assert torch.load(latest, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("content", [b"", b"\x00\x01random bytes" * 50, "pickle"],
                         ids=["empty", "random", "malicious-pickle"])
def test_train_resume_from_a_broken_file_is_a_clean_error(tmp_path, capsys, content):
    import pickle

    data = _image_folder(tmp_path / "data")
    bad = tmp_path / "bad.pt"
    if content == "pickle":
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

        content = pickle.dumps(Evil())
    bad.write_bytes(content)
    assert _train(data, tmp_path / "run", "--epochs", "1", "--resume", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {bad}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "run").exists()  # nothing created before the checks passed


def test_train_removes_temporaries_of_killed_saves(tmp_path):
    data = _image_folder(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("latest.pt.tmp123", "latest.pt.tmpabc_x", "best.pt.tmp9"):
        (run / name).write_bytes(b"partial")
    (run / "other.tmp1").write_bytes(b"not ours")
    assert _train(data, run, "--epochs", "1", "--latency-repeats", "0") == 0
    assert sorted(p.name for p in run.iterdir() if p.suffix != ".png") == [
        "best.pt", "config.json", "latest.pt", "metrics.csv", "other.tmp1", "summary.json"]


def test_train_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys, monkeypatch):
    from slimops.train import Trainer

    data = _image_folder(tmp_path / "data")
    train_epoch = Trainer.train_epoch

    def diverging(self, loader):
        losses = train_epoch(self, loader)
        return {w: (float("nan") if self.epoch >= 2 else v) for w, v in losses.items()}

    monkeypatch.setattr(Trainer, "train_epoch", diverging)
    assert _train(data, tmp_path / "run", "--epochs", "3") == 1
    assert "non-finite training loss" in capsys.readouterr().err
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["epoch"] == 1
