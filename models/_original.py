"""Loading checkpoints of the original implementation (github.com/JiahuiYu/slimmable_networks).

Its training script saves ``{'model': model_wrapper.state_dict(), ...}`` where the wrapper is
``nn.DataParallel`` (keys prefixed ``module.``), with the key layout of its ``models/``. Each
of our reference models implements ``convert_original_state_dict(sd)``, which maps that
layout (prefix already stripped) onto its own ``state_dict`` keys; this module does the
generic part: reading the file safely, unwrapping, and checking every key and shape.

Per-width tensors of the original (``bn.{i}`` of a switchable BN) are indexed by its
``width_mult_list`` order; its configs list the widths ascending, as ours are.
"""

from __future__ import annotations

import math
import os
from typing import IO, Any, Dict, Mapping, Union

import torch
from torch import Tensor, nn

Checkpoint = Union[str, os.PathLike, IO[bytes], Mapping[str, Any]]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: names the first offending key and the shapes."""


def read_original_state_dict(checkpoint: Checkpoint) -> Dict[str, Tensor]:
    """The flat state_dict of an original checkpoint: a path or file (read with
    ``torch.load(weights_only=True)``, never unpickling code) or an already loaded dict;
    unwraps a ``'model'`` (or ``'state_dict'``) entry and strips a ``module.`` prefix."""
    if isinstance(checkpoint, Mapping):
        data: Any = checkpoint
    elif isinstance(checkpoint, (str, os.PathLike)) or hasattr(checkpoint, "read"):
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    else:
        raise TypeError(
            f"a checkpoint is a path, a file or a state_dict, got {type(checkpoint).__name__}"
        )
    for entry in ("model", "state_dict"):
        if isinstance(data, Mapping) and entry in data and isinstance(data[entry], Mapping):
            data = data[entry]
            break
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise CheckpointMismatchError(
            f"not a state_dict: expected a mapping of parameter names to tensors, got "
            f"{type(data).__name__}"
        )
    out = {}
    for key, value in data.items():
        if not isinstance(value, Tensor):
            raise CheckpointMismatchError(f"checkpoint entry {key!r} is not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def take(sd: Dict[str, Tensor], key: str) -> Tensor:
    """``sd[key]``, or a ``CheckpointMismatchError`` naming the missing original key."""
    try:
        return sd[key]
    except KeyError:
        raise CheckpointMismatchError(f"checkpoint lacks the key {key!r}") from None


def load_original(model: nn.Module, checkpoint: Checkpoint) -> nn.Module:
    """Load an original-implementation checkpoint into ``model`` (in place; returns it).

    Raises ``CheckpointMismatchError`` naming the first key that is missing, unexpected or
    of the wrong shape (with both shapes).
    """
    convert = getattr(model, "convert_original_state_dict", None)
    if convert is None:
        raise TypeError(f"{type(model).__name__} cannot load original checkpoints")
    converted = convert(read_original_state_dict(checkpoint))
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in converted:
            raise CheckpointMismatchError(f"checkpoint has nothing for {key!r} {tuple(tensor.shape)}")
        got = converted[key]
        if tuple(got.shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"shape mismatch for {key!r}: the model has {tuple(tensor.shape)}, the "
                f"checkpoint {tuple(got.shape)}"
            )
    extra = [k for k in converted if k not in expected]
    if extra:
        raise CheckpointMismatchError(f"checkpoint has an unexpected key {extra[0]!r}")
    model.load_state_dict(converted, strict=True)
    return model


def convert_by_prefix(
    model: nn.Module, sd: Mapping[str, Tensor], prefixes: Mapping[str, str]
) -> Dict[str, Tensor]:
    """Map an original state_dict onto ``model``'s keys by module prefix.

    ``prefixes`` maps a module path of ``model`` to the original's module path; each of the
    model's state_dict keys takes the longest matching prefix (several of ours may map to one
    original module, e.g. one shared BN fanned out to every width). Every original key must
    be used, and every shape must fit: errors name the original key, ours and both shapes.
    """
    out: Dict[str, Tensor] = {}
    used = set()
    by_length = sorted(prefixes, key=len, reverse=True)
    for key, expected in model.state_dict().items():
        ours = next((p for p in by_length if key.startswith(p + ".")), None)
        if ours is None:
            raise KeyError(f"{type(model).__name__}: no original prefix maps onto {key!r}")
        theirs = prefixes[ours] + key[len(ours):]
        tensor = take(sd, theirs)  # type: ignore[arg-type]
        if tuple(tensor.shape) != tuple(expected.shape):
            raise CheckpointMismatchError(
                f"shape mismatch for {theirs!r} (loaded into {key!r}): the model has "
                f"{tuple(expected.shape)}, the checkpoint {tuple(tensor.shape)}"
            )
        out[key] = tensor
        used.add(theirs)
    extra = sorted(k for k in sd if k not in used)
    if extra:
        raise CheckpointMismatchError(
            f"checkpoint has an unexpected key {extra[0]!r} ({len(extra)} unused in all); it "
            f"was saved from a different architecture or width list"
        )
    return out


def init_like_original(model: nn.Module) -> None:
    """The original implementation's initialisation (its ``reset_parameters``, on in every
    config): convs ``N(0, sqrt(2 / (kh * kw * out_channels)))`` (He, fan-out), linear layers
    ``N(0, 0.01)``, zero biases, BN γ = 1 and β = 0, so that training from scratch starts
    where the original's did. (Fan-out counts all output channels, depthwise convs
    included: their weights start small, which the training-mode BN after each absorbs.)"""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.01)
                if m.bias is not None:
                    m.bias.zero_()
