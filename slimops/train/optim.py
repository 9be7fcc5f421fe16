"""Optimizer parameter groups: the original recipe's weight decay."""

from __future__ import annotations

import math
from typing import Any, Dict, List

from torch import nn




def _is_depthwise(conv: nn.modules.conv._ConvNd) -> bool:
    # One input channel per group and more than one group: depthwise (a slimmable depthwise
    # conv keeps groups == its full channel count, with weight [C, 1, kh, kw]).
    return conv.groups > 1 and conv.weight.shape[1] == 1


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Optimizer parameter groups with the original recipe's weight decay.

    Weight decay ``weight_decay`` on the weights of ordinary (and grouped) convolutions and
    of linear layers; none on depthwise convolution weights, on batch-norm (and other
    normalisation) parameters, and on biases. The original code decides by shape alone
    (4-D with a second dimension != 1, or 2-D); here convolutions are classified by their
    module, so a regular convolution over one input channel (weight ``[C, 1, kh, kw]``, e.g.
    a grayscale stem) keeps its weight decay; parameters of other modules fall back to the
    shape rule. Frozen parameters (``requires_grad=False``) are left out; shared parameters
    appear once.

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...],
        "weight_decay": 0.0}]`` (an empty group is left out), for any ``torch.optim``
        optimizer: ``torch.optim.SGD(param_groups(model, 4e-5), lr=0.1, momentum=0.9)``.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
             nn.modules.instancenorm._InstanceNorm)
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if isinstance(module, norms) or name == "bias":
                decays = False
            elif isinstance(module, nn.modules.conv._ConvNd) and name == "weight":
                decays = not _is_depthwise(module)
            elif isinstance(module, nn.Linear) and name == "weight":
                decays = True
            else:  # the original shape rule
                decays = (p.dim() == 4 and p.shape[1] != 1) or p.dim() == 2
            (decay if decays else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups
