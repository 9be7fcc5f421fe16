"""slimops.train.trainer: epochs, the sandwich rule between switches, exact checkpoint
resume, progress bar, history and errors."""

from __future__ import annotations

import importlib.util
import random
import sys

import numpy as np
import pytest
import torch

from slimops.train import RANDOM_WIDTHS, Trainer, calibrate_bn, evaluate, param_groups

from train_common import _single_thread  # noqa: F401  (an autouse fixture)
from train_common import batch, tiny


def test_trainer_sandwich_between_two_switches():
    # US-Nets style: only the two extremes are listed (and keep their own BN); random widths
    # in between are trained, then calibrated and evaluated.
    model = tiny((0.25, 1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = Trainer(model, opt, sandwich=2, seed=0, progress=False)
    loader = [batch(seed=s) for s in range(3)]
    losses = trainer.train_epoch(loader)
    assert list(losses) == [1.0, 0.25, RANDOM_WIDTHS]
    calibrate_bn(model, loader, widths=[0.4, 0.8])
    acc = evaluate(model, loader, widths=[0.25, 0.4, 0.8, 1.0])
    assert list(acc) == [1.0, 0.8, 0.4, 0.25]
    from slimops.nn import SlimmableLinear

    listed_only = SlimmableLinear([2, 4], 3, widths=(0.5, 1.0))
    with pytest.raises(ValueError, match="channel rules"):
        Trainer(listed_only, torch.optim.SGD(listed_only.parameters(), lr=0.1), sandwich=1)


# --------------------------------------------------------------------------- weight decay



class NoisyData(torch.utils.data.Dataset):
    """Draws from python's `random` and numpy per sample, so resuming must restore both."""

    def __init__(self, n=12):
        self.x, self.y = batch(n=n, seed=3)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        noise = random.gauss(0.0, 0.1) + float(np.random.normal(0.0, 0.1))
        return self.x[i] + noise, self.y[i]


def make_trainer(init_seed, **kw):
    torch.manual_seed(init_seed)
    model = tiny((0.25, 0.5, 0.75, 1.0))
    opt = torch.optim.SGD(param_groups(model, 1e-3), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    kw = {"sandwich": 1, "inplace_distillation": True, "seed": 123, "progress": False, **kw}
    return Trainer(model, opt, scheduler=sched, **kw)


def _seed_all(s):
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def test_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    loader = torch.utils.data.DataLoader(NoisyData(), batch_size=4, shuffle=True)
    val = [batch(n=4, seed=9)]

    _seed_all(0)
    straight = make_trainer(0)
    straight.fit(loader, 2, val)

    _seed_all(0)
    first = make_trainer(0)
    first.fit(loader, 1, val)
    path = tmp_path / "ckpt.pt"
    first.save_checkpoint(path)
    torch.load(path, weights_only=True)  # only tensors and primitive containers

    _seed_all(999)  # a different process state, and a differently initialised model
    resumed = make_trainer(7, seed=5)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (loads.append(k), real_load(*a, **k))[1])
    assert resumed.load_checkpoint(path) == 1
    assert [k.get("weights_only") for k in loads] == [True]
    resumed.fit(loader, 2, val)

    assert resumed.epoch == straight.epoch == 2
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)
    assert straight.scheduler.state_dict() == resumed.scheduler.state_dict()
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert straight.history == resumed.history
    assert straight.global_step == resumed.global_step == 6


def test_checkpoint_mismatch_errors(tmp_path):
    t = make_trainer(0)
    path = tmp_path / "ckpt.pt"
    t.save_checkpoint(path)
    other = make_trainer(0, widths=[0.25, 1.0], sandwich=None)
    with pytest.raises(ValueError, match="widths"):
        other.load_checkpoint(path)
    no_sched = Trainer(t.model, t.optimizer, progress=False)
    with pytest.raises(ValueError, match="scheduler"):
        no_sched.load_checkpoint(path)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a slimops trainer checkpoint"):
        t.load_checkpoint(tmp_path / "other.pt")


def test_trainer_progress_bar_and_fallback(capsys, monkeypatch):
    x, y = batch(n=8)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    t = make_trainer(0, progress=True, sandwich=None, inplace_distillation=False,
                     scheduler_interval="step")
    if importlib.util.find_spec("tqdm") is not None:
        losses = t.train_epoch(loader)
        err = capsys.readouterr().err
        assert "1x:" in err and "0.25x:" in err
        assert list(losses) == [1.0, 0.75, 0.5, 0.25]
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    t.train_epoch(loader)
    assert "1x:" not in capsys.readouterr().err
    assert t.global_step == t.scheduler.last_epoch  # stepped once per batch


def test_trainer_fit_history_and_errors():
    x, y = batch(n=8)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    t = make_trainer(0)
    new = t.fit(loader, 2, loader)
    assert [e["epoch"] for e in new] == [1, 2] and t.history == new
    # sandwich=1 on a model built from channel rules: the extremes, and the random width
    # drawn between them on each batch, reported together
    assert list(new[0]["train_loss"]) == [1.0, 0.25, RANDOM_WIDTHS]
    assert set(new[0]["val_acc"]) == {1.0, 0.75, 0.5, 0.25}
    assert t.fit(loader, 2) == []  # already there
    assert t.scheduler.last_epoch == 2
    with pytest.raises(ValueError, match="no batch"):
        t.train_epoch([])
    with pytest.raises(ValueError, match="epochs"):
        t.fit(loader, -1)
    with pytest.raises(ValueError, match="unknown width"):
        make_trainer(0, widths=[0.2, 1.0])
    # two widths and the sandwich rule: the model runs at any width in between
    assert make_trainer(0, widths=[0.25, 1.0], sandwich=1).widths == (0.25, 1.0)
    with pytest.raises(ValueError, match="scheduler_interval"):
        make_trainer(0, scheduler_interval="batch")


# --------------------------------------------------------------------------- EMA

def test_trainer_ema_follows_the_weights_and_resumes(tmp_path):
    """ema_decay: after every step ema = decay * ema + (1 - decay) * weights (parameters and
    BN statistics); checkpoints keep it, a resumed trainer continues it exactly, and a
    checkpoint without one cannot resume a trainer that keeps one."""
    loader = [batch(seed=s) for s in range(3)]

    def make(ema_decay=0.5):
        torch.manual_seed(0)
        model = tiny()
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), seed=0,
                       progress=False, ema_decay=ema_decay)

    t = make()
    before = {k: v.clone() for k, v in t.ema.module.state_dict().items()}
    t.train_step(*loader[0])
    # the first update copies the weights
    for k, v in t.module.state_dict().items():
        torch.testing.assert_close(t.ema.module.state_dict()[k], v, rtol=0, atol=0)
    ema1 = {k: v.clone() for k, v in t.ema.module.state_dict().items()}
    t.train_step(*loader[1])
    for k, v in t.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(t.ema.module.state_dict()[k], 0.5 * ema1[k] + 0.5 * v)
    assert any(not torch.equal(before[k], ema1[k]) for k in before)
    acc = t.evaluate_ema(loader, topk=(1, 5))
    assert set(acc) == {0.25, 0.5, 1.0} and all(a[5] == 1.0 for a in acc.values())

    straight = make()
    straight.train_epoch(loader)
    straight.train_epoch(loader)
    half = make()
    half.train_epoch(loader)
    half.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = make()
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert int(resumed.ema.n_averaged) == 3
    resumed.train_epoch(loader)
    for k, v in straight.ema.module.state_dict().items():
        torch.testing.assert_close(resumed.ema.module.state_dict()[k], v, rtol=0, atol=0)

    plain = make(None)
    assert plain.ema is None and plain.state_dict()["ema"] is None
    plain.save_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no EMA weights"):
        make().load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="evaluate_ema"):
        plain.evaluate_ema(loader)
    with pytest.raises(ValueError, match="ema_decay"):
        make(1.5)
