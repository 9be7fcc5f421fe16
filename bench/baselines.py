"""The baselines slimops is benchmarked against, at one width of a slimmable model.

* ``reference_style(model)``: the slimmable model as the original slimmable-networks code
  (github.com/JiahuiYu/slimmable_networks) runs it: every conv / linear slices the *shared*
  weight (``weight[:out, :in]``) and calls ``F.conv2d`` / ``F.linear``, every switchable BN
  calls the active width's own ``nn.BatchNorm2d`` module (``bn.bn[i]``), then the activation
  (in place, as the original) and the residual add are separate ops. It shares the model's
  Parameters and buffers (no copies): the same weights, the same widths.
* ``dense_eager(model, width)``: the network built densely at that width in plain eager
  PyTorch (``nn.Conv2d`` + ``nn.BatchNorm2d`` + activation): ``slimops.export(model,
  width, fold_bn=False)``.
* ``dense_jit(model, width, example)``: the best PyTorch offers for that dense network on
  CPU without a compiler toolchain: ``torch.jit.trace`` -> ``torch.jit.freeze`` (folds BN
  into the conv, constant-propagates) -> ``torch.jit.optimize_for_inference`` (oneDNN
  layouts and fusions where it applies).

``VARIANTS`` names them, with ``"slimops"`` (the slimmable model itself) first.
``"dense-compile"`` (opt-in: ``SLIMOPS_BENCH_COMPILE=1`` or ``python -m slimops bench
--compile``) adds ``torch.compile`` (inductor, ``freezing=True``) of the dense network: it
compiles for tens of seconds per model, width and batch on 2 cores, too long for the
default suite.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import slimops
from slimops.nn import SlimConvBNAct, SlimmableConv2d, SlimmableLinear, SwitchableBatchNorm2d

VARIANTS = ("slimops", "reference", "dense-eager", "dense-jit")
OPTIONAL_VARIANTS = ("dense-compile",)


# -- the original implementation's style, on the shared weights --------------------------

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


class RefConv2d(nn.Module):
    """``SlimmableConv2d`` in the original's style; shares the layer (and its weight)."""

    def __init__(self, conv: SlimmableConv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return ref_conv(self.conv, x)


class RefBatchNorm2d(nn.Module):
    """``SwitchableBatchNorm2d`` in the original's style: ``bn.bn[i](x)``."""

    def __init__(self, bn: SwitchableBatchNorm2d) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return ref_bn(self.bn, x)


class RefLinear(nn.Module):
    """``SlimmableLinear`` in the original's style: ``F.linear(x, W[:out, :in], b[:out])``."""

    def __init__(self, linear: SlimmableLinear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        fin, fout = self.linear.active_features()
        b = self.linear.bias
        return F.linear(x, self.linear.weight[:fout, :fin], None if b is None else b[:fout])


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
    is wrapped by its ``Ref*`` counterpart around the *same* layer, and every Parameter and
    buffer is shared with ``model`` (training one trains the other). The width follows
    ``slimops.set_width`` / ``slimops.width`` on either model.
    """
    memo: Dict[int, object] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    inside = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        wrapper: Optional[nn.Module] = None
        if isinstance(m, SlimConvBNAct):
            wrapper = RefConvBNAct(m)
        elif isinstance(m, SlimmableConv2d):
            wrapper = RefConv2d(m)
        elif isinstance(m, SlimmableLinear):
            wrapper = RefLinear(m)
        elif isinstance(m, SwitchableBatchNorm2d):
            wrapper = RefBatchNorm2d(m)
        if wrapper is not None:
            inside.update(id(s) for s in m.modules())
            memo[id(m)] = wrapper
    return copy.deepcopy(model, memo)


# -- dense networks at one width -----------------------------------------------------------

def dense_eager(model: nn.Module, width: float) -> nn.Module:
    """The dense network at ``width`` in plain eager PyTorch, eval mode (BN not folded)."""
    return slimops.export(model, width, fold_bn=False).eval()


def dense_jit(model: nn.Module, width: float, example: Tensor) -> torch.jit.ScriptModule:
    """``optimize_for_inference(freeze(trace(dense_eager(model, width))))``, warmed up on
    ``example`` (the profiling executor specialises on the first calls)."""
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 marks TorchScript deprecated; it is still the frozen CPU baseline.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(dense_eager(model, width), example, check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        for _ in range(2):
            frozen(example)
    return frozen


def dense_compiled(model: nn.Module, width: float, example: Tensor) -> Callable[[Tensor], Tensor]:
    """``torch.compile`` (inductor, weights frozen into the graph) of the dense network,
    compiled on ``example`` before it is returned."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    # Every width and batch is a new module running the same forward code: without a reset
    # dynamo's per-code recompile limit (8) is soon reached and it silently runs eager.
    torch._dynamo.reset()
    compiled = torch.compile(dense_eager(model, width))
    with torch.no_grad(), inductor_config.patch(freezing=True):
        for _ in range(2):
            compiled(example)
    return compiled


def runner(variant: str, model: nn.Module, width: float, example: Tensor,
           reference: Optional[nn.Module] = None) -> Callable[[Tensor], Tensor]:
    """A callable ``x -> output`` running ``model`` at ``width`` the ``variant`` way, under
    ``torch.inference_mode`` (``reference``: a prebuilt ``reference_style(model)``).

    The slimmable variants get their width from ``slimops.set_width`` here, once (an
    attribute write per layer), so that the timed call is the forward pass alone: a runner
    is valid until the next runner of the same model is made.
    """
    if variant in ("slimops", "reference"):
        net = model if variant == "slimops" else (reference or reference_style(model))
        slimops.set_width(net, width)
    if variant == "dense-eager":
        net = dense_eager(model, width)
    elif variant == "dense-jit":
        net = dense_jit(model, width, example)
    elif variant == "dense-compile":
        net = dense_compiled(model, width, example)
    elif variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of "
                         f"{VARIANTS + OPTIONAL_VARIANTS}")

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return net(x)
    return run
