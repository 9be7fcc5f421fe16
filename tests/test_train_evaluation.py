"""slimops.train.evaluation: per-width accuracy."""

from __future__ import annotations

import pytest
import torch

from slimops.train import evaluate
from slimops.width import width as width_scope

from train_common import _single_thread  # noqa: F401  (an autouse fixture)
from train_common import WIDTHS, batch, tiny


def test_evaluate_per_width_accuracy_counts_samples():
    model = tiny()
    x, _ = batch(n=8)
    model.eval()
    with torch.no_grad():
        preds = {}
        for w in WIDTHS:
            with width_scope(model, w):
                preds[w] = model(x).argmax(-1)
    # Right on the full width's first 5 samples, wrong on the last 3.
    y = preds[1.0].clone()
    y[5:] = (y[5:] + 1) % 4
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]  # uneven batches: accuracy counts samples
    model.train()
    acc = evaluate(model, loader)
    assert model.training
    assert list(acc) == [1.0, 0.5, 0.25]
    assert acc[1.0] == 5 / 8
    for w in (0.5, 0.25):
        assert acc[w] == (preds[w] == y).sum().item() / 8
    assert list(evaluate(model, loader, widths=[0.5])) == [0.5]
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, [])
    with pytest.raises(TypeError, match="inputs, targets"):
        evaluate(model, [x])


# --------------------------------------------------------------------------- trainer


def test_evaluate_topk_counts_the_k_largest_logits():
    """topk=(1, k): per width {k: accuracy}; the default topk=(1,) keeps the old
    {width: top-1}; a k at or above the number of classes counts every sample."""
    model = tiny()
    x, _ = batch(n=8)
    model.eval()
    with torch.no_grad():
        logits = {w: None for w in WIDTHS}
        for w in WIDTHS:
            with width_scope(model, w):
                logits[w] = model(x)
    y = logits[1.0].argsort(dim=-1, descending=True)[:, 1]  # every target is the 2nd guess
    y[:3] = logits[1.0].argmax(-1)[:3]                        # the first 3: the top guess
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    acc = evaluate(model, loader, topk=(1, 2, 10))
    assert list(acc) == [1.0, 0.5, 0.25]
    assert acc[1.0] == {1: 3 / 8, 2: 1.0, 10: 1.0}
    top1 = evaluate(model, loader)
    for w in WIDTHS:
        assert acc[w][1] == top1[w]
        ranks = logits[w].argsort(dim=-1, descending=True)
        assert acc[w][2] == (ranks[:, :2] == y[:, None]).any(-1).sum().item() / 8
    assert evaluate(model, loader, topk=[1]) == top1
    with pytest.raises(ValueError, match="positive"):
        evaluate(model, loader, topk=(0, 5))
    with pytest.raises(ValueError, match="repeats"):
        evaluate(model, loader, topk=(1, 1))
