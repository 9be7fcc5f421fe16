"""What ``slimops train`` leaves in its output folder, read back for ``eval`` and ``export``.

A checkpoint (``latest.pt``, ``best.pt``) is a ``Trainer`` checkpoint whose ``meta`` entry
says which model it holds: the registry name, the width switches, the class names and the
image size (``run_meta``). Checkpoints written before ``meta`` existed are read with the
``config.json`` that ``slimops train`` wrote beside them (the same facts). ``metrics.csv``
has one row per epoch and width (``metrics_rows``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

METRICS_COLUMNS = ("epoch", "width", "loss", "top1", "top5", "bn_stats", "weights")

# A history entry's accuracies: (top-1 key, top-5 key, bn_stats, weights) per kind.
ACCURACY_KEYS = (
    ("val_acc", "val_top5", "training", "model"),
    ("calibrated_acc", "calibrated_top5", "calibrated", "model"),
    ("ema_acc", "ema_top5", "training", "ema"),
    ("calibrated_ema_acc", "calibrated_ema_top5", "calibrated", "ema"),
)


class RunError(ValueError):
    """A checkpoint that ``eval``/``export`` cannot use; the message says why."""


def run_meta(model: str, widths: Iterable[float], classes: List[str], image_size: int,
             **extra: Any) -> Dict[str, Any]:
    """The ``meta`` entry ``slimops train`` stores in its checkpoints (primitives only)."""
    return {"model": model, "widths": [float(w) for w in widths], "classes": list(classes),
            "num_classes": len(classes), "image_size": int(image_size), **extra}


def _format_name(w: Any) -> str:
    return f"{w:g}" if isinstance(w, float) else str(w)


def load_run(path: str, ema: bool = False) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """``(model, meta, state)`` of a ``slimops train`` checkpoint: the registered model
    rebuilt from ``meta`` with the checkpoint's weights (``ema=True``: the EMA weights, when
    the run kept them), in eval mode on the CPU. Raises ``RunError`` with a one-line reason."""
    from slimops.models import MODELS
    from slimops.train import CHECKPOINT_FORMAT

    if not os.path.isfile(path):
        raise RunError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (not a torch file, truncated, pickled code)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RunError(f"{path} is not a readable checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise RunError(f"{path} is not a slimops train checkpoint (format {found!r}, expected "
                       f"{CHECKPOINT_FORMAT!r})")
    meta = dict(state.get("meta") or {})
    if "model" not in meta:
        # Written before checkpoints carried meta: the run folder's config.json says it.
        config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if not os.path.isfile(config):
            raise RunError(f"{path} does not say which model it holds (a checkpoint from before "
                           f"slimops 'meta', and no config.json beside it)")
        with open(config) as f:
            cfg = json.load(f)
        try:
            meta = run_meta(cfg["model"], cfg.get("widths", state["widths"]), cfg["classes"],
                            cfg["image_size"])
        except KeyError as e:
            raise RunError(f"{config} lacks {e.args[0]!r}") from None
    if meta["model"] not in MODELS:
        raise RunError(f"{path}: unknown model {meta['model']!r}")
    model = MODELS[meta["model"]](widths=tuple(meta["widths"]), num_classes=len(meta["classes"]))
    weights = state["model"]
    if ema:
        if state.get("ema") is None:
            raise RunError(f"{path} has no EMA weights (train with --ema DECAY)")
        weights = state["ema"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise RunError(f"{path}: the weights do not fit {meta['model']} with widths "
                       f"{tuple(meta['widths'])}: {str(e).splitlines()[0][:200]}") from None
    return model.eval(), meta, state


def metrics_rows(history: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    """``metrics.csv``'s rows from a trainer's history: per epoch, one row per trained width
    (and the sandwich rule's ``random`` widths, whose loss is one mean and which are not
    evaluated), with the loss and top-1 / top-5 in %; then, for an epoch whose model was
    BN-calibrated, its calibrated accuracies (``bn_stats`` ``calibrated``, no loss), and the
    EMA weights' accuracies (``weights`` ``ema``)."""
    rows: List[Dict[str, str]] = []

    def pct(d: Optional[Dict[Any, float]], w: Any) -> str:
        return "" if not d or w not in d else f"{100 * d[w]:.2f}"

    for e in history:
        acc, top5 = e.get("val_acc"), e.get("val_top5")
        names = set(e.get("train_loss", {})) | set(acc or {})
        keys: List[Any] = sorted((w for w in names if not isinstance(w, str)), reverse=True)
        keys += sorted(w for w in names if isinstance(w, str))  # "random": last
        for w in keys:
            loss = e.get("train_loss", {}).get(w)
            rows.append({"epoch": str(e["epoch"]), "width": _format_name(w),
                         "loss": "" if loss is None else f"{loss:.4f}",
                         "top1": pct(acc, w), "top5": pct(top5, w), "bn_stats": "training",
                         "weights": "model"})
        for k1, k5, bn_stats, weights in ACCURACY_KEYS[1:]:
            for w in e.get(k1) or {}:
                rows.append({"epoch": str(e["epoch"]), "width": _format_name(w), "loss": "",
                             "top1": pct(e[k1], w), "top5": pct(e.get(k5), w),
                             "bn_stats": bn_stats, "weights": weights})
    return rows


def metrics_csv(history: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(metrics_rows(history))
    return buf.getvalue()


def final_accuracy(entry: Dict[str, Any]) -> Tuple[Optional[Dict[float, float]],
                                                   Optional[Dict[float, float]]]:
    """An epoch's (top-1, top-5) per width as saved: the calibrated ones when it has them."""
    if entry.get("calibrated_acc"):
        return entry["calibrated_acc"], entry.get("calibrated_top5")
    return entry.get("val_acc"), entry.get("val_top5")


def best_score(entry: Dict[str, Any]) -> Optional[float]:
    """What ``best.pt`` maximises: the mean top-1 over the evaluated widths (every width
    counts alike; the largest alone would let the small widths degrade unseen)."""
    acc, _ = final_accuracy(entry)
    if not acc:
        return None
    return sum(acc.values()) / len(acc)


def plot_accuracy_vs_macs(table: List[Dict[str, Any]], path: str, title: str) -> bool:
    """The summary's best top-1 (%) against MACs, one labelled point per width, to ``path``
    (PNG, matplotlib's Agg backend). False (nothing written) when no width was evaluated."""
    points = [(t["macs"], t["best_top1"], t["width"]) for t in table
              if t.get("best_top1") is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    try:
        xs, ys = [p[0] / 1e6 for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o")
        for x, y, w in zip(xs, ys, (p[2] for p in points)):
            ax.annotate(f"{w:g}x", (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize=8)
        ax.set_xlabel("MACs per image (millions)")
        ax.set_ylabel("best top-1 (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return True
