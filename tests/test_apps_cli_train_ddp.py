"""`slimops train` under torchrun: 2 CPU processes (gloo), 1 epoch of slim_cnn on a tiny
image folder. Rank 0 alone prints and writes; the checkpoint evaluates as it reported."""

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from slimops.apps.cli import main

from test_apps_cli_train import SIZE, _image_folder

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_train_under_torchrun_two_cpu_processes(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "slimops", "train", "--model", "slim_cnn", "--data", str(data), "--out", str(out),
         "--epochs", "1", "--batch-size", "4", "--image-size", str(SIZE), "--workers", "0",
         "--no-progress", "--threads", "1", "--latency-repeats", "0", "--sandwich", "1",
         "--calibrate-bn", "2", "--ema", "0.5"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # rank 0 alone prints: one epoch line, one summary
    assert proc.stdout.count("epoch 1/1") == 1 and proc.stdout.count("summary (") == 1
    assert "2 processes (DDP), batch 2 each" in proc.stdout
    state = torch.load(out / "latest.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 3  # 12 images, 2 ranks x 2
    assert state["meta"]["model"] == "slim_cnn" and state["ema"] is not None
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["bn_stats"] for r in rows} == {"training", "calibrated"}
    assert (out / "best.pt").is_file() and (out / "summary.json").is_file()
    # The saved model, evaluated in one process on the same 6 val images (the 2 shards of 3
    # need no padding), scores what the ranks together reported after calibration.
    result = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", str(out / "latest.pt"), "--data", str(data), "--workers", "0",
                 "--json", str(result)]) == 0
    import json

    got = json.loads(result.read_text())["widths"]
    for w, a in state["history"][-1]["calibrated_acc"].items():
        assert got[f"{w:g}"]["top1"] == pytest.approx(100 * a)
