"""The reference style: a slimmable model run the way the original slimmable-networks code
(github.com/JiahuiYu/slimmable_networks) runs it, on the model's own shared weights.

Every conv / linear slices the *shared* weight (``weight[:out, :in]``) and calls ``F.conv2d``
/ ``F.linear``, every switchable BN calls the active width's own ``nn.BatchNorm2d`` module
(``bn.bn[i]``), then the activation (in place, as the original) and the residual add are
separate ops. ``reference_style(model)`` shares the model's Parameters and buffers (no
copies): the same weights, the same widths. It is the plain-PyTorch path slimops' kernels
replace, and the floor they are measured against: the demo times training through it beside
slimops (``slimops.apps.demo``), and ``bench/`` compares every cell with it.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from slimops.nn import (
    AvgPool2d,
    MaxPool2d,
    SlimConvBNAct,
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
    map_layers,
)

__all__ = ["reference_style", "RefConv2d", "RefBatchNorm2d", "RefLinear", "RefConvBNAct"]


def ref_conv(conv: SlimmableConv2d, x: Tensor) -> Tensor:
    """``F.conv2d`` on the sliced shared weight (a view; F.conv2d may copy it)."""
    cin, cout = conv.active_channels()
    w, b = conv.weight, conv.bias
    if conv.depthwise:
        groups, w, b = cin, w[:cout], None if b is None else b[:cout]
    elif conv.groups == 1:
        groups, w, b = 1, w[:cout, :cin], None if b is None else b[:cout]
    else:
        # Fixed groups, per-group prefixes (the original runs one conv per group and
        # concatenates; one grouped conv on the gathered blocks computes the same).
        groups = conv.groups
        og, ig = cout // groups, cin // groups
        w = w.view(groups, -1, *w.shape[1:])[:, :og, :ig].reshape(cout, ig, *w.shape[2:])
        b = None if b is None else b.view(groups, -1)[:, :og].reshape(cout)
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, groups)


def ref_bn(sbn: SwitchableBatchNorm2d, x: Tensor) -> Tensor:
    """The active width's own ``nn.BatchNorm2d`` module (the shared BN's prefix when
    ``shared``, through ``F.batch_norm``)."""
    if not sbn.shared:
        return sbn.bn[sbn.width_index()](x)
    bn, c = sbn.bn[0], x.shape[1]
    training = sbn.training or bn.running_mean is None
    mean = None if bn.running_mean is None else bn.running_mean[:c]
    var = None if bn.running_var is None else bn.running_var[:c]
    weight = None if bn.weight is None else bn.weight[:c]
    bias = None if bn.bias is None else bn.bias[:c]
    return F.batch_norm(x, mean, var, weight, bias, training,
                        bn.momentum if bn.momentum is not None else 0.1, bn.eps)


def ref_act(x: Tensor, activation: Optional[str]) -> Tensor:
    # In place, as the original's nn.ReLU(inplace=True) / nn.ReLU6(inplace=True).
    if activation == "relu":
        return F.relu_(x)
    if activation == "relu6":
        return F.hardtanh_(x, 0.0, 6.0)
    return x


def ref_linear(linear: SlimmableLinear, x: Tensor) -> Tensor:
    """``F.linear(x, W[:out, :in], b[:out])`` on the shared weight."""
    fin, fout = linear.active_features()
    b = linear.bias
    return F.linear(x, linear.weight[:fout, :fin], None if b is None else b[:fout])


class _RefLayer(nn.Module):
    """A slimmable layer run by ``run`` (``ref_conv``, ``ref_bn``, ``ref_linear``) in the
    original's style. The layer is the model's own (its Parameters, its width), held under
    ``name``: the attribute, and state_dict prefix, each ``Ref*`` wrapper has always had."""

    def __init__(self, name: str, layer: nn.Module,
                 run: Callable[[Any, Tensor], Tensor]) -> None:
        super().__init__()
        self.add_module(name, layer)
        self._layer_name = name
        self._run = run

    def forward(self, x: Tensor) -> Tensor:
        return self._run(getattr(self, self._layer_name), x)


class RefConv2d(_RefLayer):
    """``SlimmableConv2d`` in the original's style; shares the layer (and its weight)."""

    def __init__(self, conv: SlimmableConv2d) -> None:
        super().__init__("conv", conv, ref_conv)


class RefBatchNorm2d(_RefLayer):
    """``SwitchableBatchNorm2d`` in the original's style: ``bn.bn[i](x)``."""

    def __init__(self, bn: SwitchableBatchNorm2d) -> None:
        super().__init__("bn", bn, ref_bn)


class RefLinear(_RefLayer):
    """``SlimmableLinear`` in the original's style: ``F.linear(x, W[:out, :in], b[:out])``."""

    def __init__(self, linear: SlimmableLinear) -> None:
        super().__init__("linear", linear, ref_linear)


class RefConvBNAct(nn.Module):
    """``SlimConvBNAct`` as the original writes it: conv, the width's BN, ``+= residual``,
    activation; three or four separate ops and passes over the output."""

    def __init__(self, block: SlimConvBNAct) -> None:
        super().__init__()
        # The block's own layers: set_width / width(...) on the converted model reach them,
        # and the Parameters are the model's.
        self.conv = block.conv
        self.bn = block.bn
        self.activation = block.activation

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = ref_bn(self.bn, ref_conv(self.conv, x))
        if residual is not None:
            y += residual  # the original's `res += self.shortcut(x)`
        return ref_act(y, self.activation)


def reference_style(model: nn.Module) -> nn.Module:
    """``model`` with every slimmable layer run in the original implementation's style.

    A shallow structural copy: the model's own modules (and ``forward``) are copied, every
    ``SlimConvBNAct`` / ``SlimmableConv2d`` / ``SlimmableLinear`` / ``SwitchableBatchNorm2d``
    is wrapped by its ``Ref*`` counterpart around the *same* layer, every ``slimops.nn`` pool
    is PyTorch's own (``nn.MaxPool2d``, ``nn.AvgPool2d``), and every Parameter and buffer is
    shared with ``model`` (training one trains the other). The width follows
    ``slimops.set_width`` / ``slimops.width`` on either model.
    """
    memo: Dict[int, object] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    memo.update(map_layers(model, {SlimConvBNAct: RefConvBNAct, SlimmableConv2d: RefConv2d,
                                   SlimmableLinear: RefLinear,
                                   SwitchableBatchNorm2d: RefBatchNorm2d,
                                   MaxPool2d: MaxPool2d.plain,
                                   AvgPool2d: AvgPool2d.plain}))
    return copy.deepcopy(model, memo)
