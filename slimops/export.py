"""Export a slimmable model at one width as a plain PyTorch module.

``export(model, width)`` returns a deep copy of ``model`` in which every slimmable layer is
replaced by the stock ``torch.nn`` layer of the active width, holding a *copy* of the active
channel prefix of the shared weights (an export is the one place where copying is the point:
the result is independent of the slimmable model and of slimops):

=========================  ==================================================================
slimmable layer            exported as
=========================  ==================================================================
``SlimmableConv2d``        ``nn.Conv2d`` (depthwise: ``groups`` = active channels; fixed
                           ``G`` groups: each group's prefix block, gathered into one
                           ``[G * og, ig, kh, kw]`` weight)
``SlimmableLinear``        ``nn.Linear``
``SwitchableBatchNorm2d``  ``nn.BatchNorm2d`` of the active width (the shared BN's prefix
                           when ``shared=True``)
``SlimConvBNAct``          ``ConvBNAct``: ``act(bn(conv(x)) + residual)``; with ``fold_bn``
                           the eval-mode BN is folded into the conv's weight and bias
=========================  ==================================================================

Everything else (the model's own ``forward``: residual adds, ShuffleNet's channel shuffle,
pooling, ...) is kept as it is, so the export works for any model built from these layers.
The result calls no ``slimops`` op: it traces, freezes and runs under
``torch.jit.optimize_for_inference`` or ``torch.compile`` like any dense network.
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings
from typing import IO, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init  # no random init of weights about to be replaced

from slimops.nn import (
    AvgPool2d,
    MaxPool2d,
    SlimConvBNAct,
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
    map_layers,
)
from slimops.reference import ACTIVATIONS
from slimops.width import Slimmable, model_widths, width as scoped_width

__all__ = ["ConvBNAct", "WidthSwitch", "export", "export_onnx", "torchscript_widths"]


class ConvBNAct(nn.Module):
    """``act(bn(conv(x)) + residual)`` in plain PyTorch: what ``SlimConvBNAct`` exports to.

    Attributes:
        conv: an ``nn.Conv2d`` (with a bias when the BN was folded into it).
        bn: an ``nn.BatchNorm2d``, or ``None`` when folded into ``conv``.
        act: ``nn.ReLU``, ``nn.ReLU6`` or ``nn.Identity``.
        activation: ``"relu"``, ``"relu6"`` or ``None`` (as ``SlimConvBNAct``).
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d],
                 activation: Optional[str]) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        self.conv = conv
        self.bn = bn
        self.activation = activation
        self.act = {None: nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6}[activation]()

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        if residual is not None:
            y = y + residual
        return self.act(y)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, bn_folded={self.bn is None}"


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    # A fresh contiguous copy: never a view of (or aliased with) the shared weight.
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format),
                        requires_grad=like.requires_grad)


def _conv_prefix(conv: SlimmableConv2d) -> tuple:
    """``(weight, bias, in_channels, out_channels, groups)`` of the active width, as views."""
    cin, cout = conv.active_channels()
    w, b = conv.weight, conv.bias
    if conv.depthwise:
        return w[:cout], None if b is None else b[:cout], cin, cout, cin
    g = conv.groups
    og, ig = cout // g, cin // g
    # Group k of the shared weight is the block of rows [k * Og, (k + 1) * Og); at a width it
    # uses the first og rows of its block and the first ig input channels (per-group
    # prefixes, as slimops.reference.grouped_prefix).
    w = w.view(g, w.shape[0] // g, *w.shape[1:])[:, :og, :ig].reshape(cout, ig, *w.shape[2:])
    if b is not None:
        b = b.view(g, -1)[:, :og].reshape(cout)
    return w, b, cin, cout, g


def _export_conv(conv: SlimmableConv2d, scale: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None) -> nn.Conv2d:
    """The active width of ``conv`` as an ``nn.Conv2d``; ``scale``/``shift`` (a folded BN)
    give ``conv(x) * scale + shift`` with a bias."""
    w, b, cin, cout, groups = _conv_prefix(conv)
    folded = scale is not None
    out = skip_init(nn.Conv2d, cin, cout, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, groups, bias=b is not None or folded, device=w.device,
                    dtype=w.dtype)
    with torch.no_grad():
        if folded:
            bias = shift if b is None else b * scale + shift
            w = w * scale.view(-1, 1, 1, 1)
            out.bias = _param(bias.to(w.dtype), conv.weight)
        elif b is not None:
            out.bias = _param(b, conv.bias)
        out.weight = _param(w, conv.weight)
    return out


def _export_linear(linear: SlimmableLinear) -> nn.Linear:
    fin, fout = linear.active_features()
    w = linear.weight
    out = skip_init(nn.Linear, fin, fout, bias=linear.bias is not None, device=w.device,
                    dtype=w.dtype)
    out.weight = _param(w[:fout, :fin], w)
    if linear.bias is not None:
        out.bias = _param(linear.bias[:fout], linear.bias)
    return out


def _bn_state(sbn: SwitchableBatchNorm2d) -> Tuple[int, nn.BatchNorm2d, nn.BatchNorm2d]:
    """``(channels, BN giving γ/β, BN holding the running stats)`` at the active width.

    γ, β and the statistics are always the first ``channels`` entries of those BNs' tensors
    (the whole tensors at a listed width, a prefix for a shared BN or a width between the
    listed ones).
    """
    affine = sbn.active_bn()
    if hasattr(sbn, "active_features"):  # layers that also run between their listed widths
        c, stats = sbn.active_features(), sbn.stats_bn()
    else:
        c, stats = sbn.num_features_list[sbn.width_index()], affine
    if stats is None:
        raise ValueError(
            f"export: {type(sbn).__name__} has no running statistics at width "
            f"{sbn.active_width()} (calibrate them first: slimops.train.calibrate_bn)")
    return c, affine, stats


def _export_bn(sbn: SwitchableBatchNorm2d) -> nn.BatchNorm2d:
    """The active width's batch norm as an ``nn.BatchNorm2d`` of its channels."""
    c, affine, stats = _bn_state(sbn)
    ref = stats.running_mean if stats.running_mean is not None else affine.weight
    out = nn.BatchNorm2d(c, stats.eps, stats.momentum, affine.affine,
                         stats.running_mean is not None,
                         device=None if ref is None else ref.device,
                         dtype=None if ref is None else ref.dtype)
    with torch.no_grad():
        if affine.weight is not None:
            out.weight = _param(affine.weight[:c], affine.weight)
            out.bias = _param(affine.bias[:c], affine.bias)
        if stats.running_mean is not None:
            out.running_mean.copy_(stats.running_mean[:c])
            out.running_var.copy_(stats.running_var[:c])
            out.num_batches_tracked.copy_(stats.num_batches_tracked)
    return out


def _export_block(block: SlimConvBNAct, fold_bn: bool) -> ConvBNAct:
    c, affine, stats = _bn_state(block.bn)
    # Folding needs eval-mode statistics; a BN without running stats normalises with the
    # batch's statistics even in eval, so it stays a BN.
    if fold_bn and stats.running_mean is not None:
        with torch.no_grad():
            # slimops' eval-mode epilogue: x * scale + shift (SwitchableBatchNorm2d's
            # eval_scale_shift), here multiplied into the weight once.
            scale = torch.rsqrt(stats.running_var[:c] + stats.eps)
            shift = -stats.running_mean[:c] * scale
            if affine.weight is not None:
                scale = scale * affine.weight[:c]
                shift = affine.bias[:c] - stats.running_mean[:c] * scale
        return ConvBNAct(_export_conv(block.conv, scale, shift), None, block.activation)
    return ConvBNAct(_export_conv(block.conv), _export_bn(block.bn), block.activation)


def _replacements(model: nn.Module, fold_bn: bool) -> Dict[int, nn.Module]:
    """``id(slimmable module) -> its plain export`` at the active width, outermost first
    (a fused block's conv and BN are exported as part of the block)."""
    def plain(make):
        def handler(m: nn.Module) -> nn.Module:
            new = make(m)
            new.train(m.training)
            return new
        return handler

    return map_layers(model, {
        SlimConvBNAct: plain(lambda m: _export_block(m, fold_bn)),
        SlimmableConv2d: plain(_export_conv),
        SlimmableLinear: plain(_export_linear),
        SwitchableBatchNorm2d: plain(_export_bn),
        MaxPool2d: plain(MaxPool2d.plain),
        AvgPool2d: plain(AvgPool2d.plain),
    }, unknown="export: no plain PyTorch equivalent is known for the slimmable layer")


def export(model: nn.Module, width: float, fold_bn: bool = True) -> nn.Module:
    """``model`` at ``width`` as a plain PyTorch module (a deep copy; ``model`` is untouched).

    Every ``SlimmableConv2d`` / ``SlimmableLinear`` / ``SwitchableBatchNorm2d`` becomes the
    ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` of its active channels at ``width``,
    every ``SlimConvBNAct`` a ``ConvBNAct`` and every ``slimops.nn`` pool PyTorch's own
    (``nn.MaxPool2d``, ``nn.AvgPool2d``); their parameters and buffers are copies of the
    active prefixes (never views of the shared weights). The rest of the model, its
    ``forward`` included, is deep-copied as is.

    Args:
        model: a module containing slimmable layers (a whole model or a single layer).
        width: one of the model's widths (``slimops.model_widths(model)``), or any width the
            model accepts (a model built from channel rules runs between its switches).
        fold_bn: fold each ``SlimConvBNAct``'s eval-mode batch norm (the width's running
            statistics, γ and β) into its conv's weight and bias, as deployment does. With
            ``False`` the block keeps an ``nn.BatchNorm2d`` (the form to fine-tune, or to let
            ``torch.jit.freeze`` fold). Standalone ``SwitchableBatchNorm2d`` layers are never
            folded (they have no conv to fold into).

    Returns:
        The exported module, in eval mode (call ``.train()`` to fine-tune it; a folded block
        then has no BN to train). Its outputs equal ``model``'s at ``width`` in eval mode, up
        to float round-off from folding.

    Raises:
        ValueError: ``model`` has no slimmable layers, or ``width`` is not one of its widths.
        TypeError: ``width`` is not a number, or a slimmable layer has no known export.
    """
    model_widths(model)  # ValueError naming the model when it has no slimmable layers
    with scoped_width(model, width):  # validates `width`, this thread only
        memo: Dict[int, object] = dict(_replacements(model, fold_bn))
    exported = copy.deepcopy(model, memo)
    leftover = [type(m).__name__ for m in exported.modules() if isinstance(m, Slimmable)]
    if leftover:  # a slimmable layer reachable only outside the module tree
        raise TypeError(f"export: slimmable layers left in the export: {sorted(set(leftover))}")
    return exported.eval()


def export_onnx(
    model: nn.Module,
    width: float,
    f: Union[str, "os.PathLike[str]", IO[bytes]],
    input_size: Sequence[int] = (1, 3, 224, 224),
    fold_bn: bool = True,
    dynamic_batch: bool = True,
    dynamo: bool = True,
    opset_version: Optional[int] = None,
) -> nn.Module:
    """Write ``model`` at ``width`` to ``f`` as an ONNX graph (for onnxruntime and friends).

    The graph is that of ``export(model, width, fold_bn)``: stock convolutions, linear layers
    and (unless folded) batch norms, so no custom op is needed to run it. Input ``"input"``,
    output ``"output"``.

    Args:
        model, width, fold_bn: as ``export``.
        f: a path or a binary file object.
        input_size: the example input's shape used to trace the model.
        dynamic_batch: make the batch dimension symbolic (any batch size at run time).
        dynamo: use ``torch.onnx.export``'s default ``torch.export``-based exporter (needs the
            ``onnx`` and ``onnxscript`` packages); ``False`` selects the legacy TorchScript
            exporter (deprecated by PyTorch, but faster and with no extra package).
        opset_version: the ONNX opset (default: the exporter's).

    Returns:
        The plain module that was exported (``export``'s result), e.g. to compare outputs.

    Raises:
        ValueError / TypeError: as ``export``; ``ValueError`` for a malformed ``input_size``.
        ImportError: ``dynamo=True`` and ``onnxscript`` is not installed.
    """
    shape = tuple(int(d) for d in input_size)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"export_onnx: input_size must be positive dims (N, C, ...), got {input_size!r}")
    plain = export(model, width, fold_bn=fold_bn)
    # The example input takes the model's dtype and device (a float64 model traced with a
    # float32 input failed inside the exporter with a dtype mismatch).
    param = next(plain.parameters(), None)
    example = (torch.randn(shape) if param is None
               else torch.randn(shape, dtype=param.dtype, device=param.device))
    kwargs: Dict[str, object] = dict(input_names=["input"], output_names=["output"])
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    if dynamo:
        try:
            importlib.import_module("onnxscript")  # the dynamo exporter's dependency
        except ImportError as e:
            raise ImportError(
                "export_onnx(dynamo=True) needs the onnx and onnxscript packages "
                "(pip install onnx onnxscript), or pass dynamo=False"
            ) from e
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        program = torch.onnx.export(plain, (example,), dynamo=True, verbose=False, **kwargs)
        program.save(f) if isinstance(f, (str, os.PathLike)) else f.write(
            program.model_proto.SerializeToString())
    else:
        if dynamic_batch:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
        with warnings.catch_warnings():
            # "legacy TorchScript-based ONNX export": chosen explicitly by the caller
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(plain, (example,), f, dynamo=False, **kwargs)
    return plain


class WidthSwitch(nn.Module):
    """``forward(x, width)``: runs the branch traced at ``width`` (TorchScript-friendly).

    Built by ``torchscript_widths``; ``branches[i]`` is the model traced at ``widths[i]``.
    """

    def __init__(self, branches: Sequence[nn.Module], widths: Sequence[float]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.widths: List[float] = [float(w) for w in widths]

    def forward(self, x: Tensor, width: float) -> Tensor:
        for i, branch in enumerate(self.branches):
            if self.widths[i] == width:
                return branch(x)
        raise ValueError("WidthSwitch: unknown width " + str(width) + "; it runs at "
                         + str(self.widths))


def torchscript_widths(
    model: nn.Module, example_input: Tensor, widths: Optional[Sequence[float]] = None,
    freeze: bool = False,
) -> torch.jit.ScriptModule:
    """``model`` at several widths as one TorchScript module that keeps the slimops ops.

    Unlike ``export`` (one width, stock layers, copies), the result calls
    ``torch.ops.slimops.*`` on the *full* shared weights, so every width is in one file with
    the weights stored once (``torch.jit.save``), and C++ programs run it through libtorch
    with libslimops linked (see ``csrc/tools/run_widths.cpp``). ``forward(x, width)``
    picks the width per call; each branch is ``model`` traced at that width (eval mode) on
    ``example_input``, so input shapes that change the control flow need their own trace.

    ``freeze=True`` is the fastest way to run a trained model for inference on CPU: the
    module is frozen (``torch.jit.freeze``), which folds each width's batch-norm arithmetic
    into two constant vectors per layer (the eval scale/shift) and leaves a graph of slimops
    ops with no Python between them. The conv and linear weights stay the model's own
    tensors (constants that share their storage: nothing is copied, per width or at all).
    Measured on a 2-vCPU AMD EPYC (Zen 3, AVX2), batch 1, four interleaved runs
    (``bench/matrix.py --cells eval``, docs/BENCHMARKS.md): against the dense network of the
    same width traced, frozen and ``optimize_for_inference``-d, S-MobileNet v1/v2 at 224x224
    took 0.59-0.98x its time at widths 0.25-0.5 and 0.85-1.08x at 0.75-1 (parity), the
    8x8 digits CNN 0.21-0.24x; the eager model takes 1.0-1.45x. The BN statistics are read
    once, when freezing: after training or re-calibrating the model, build the module
    again. Without ``freeze`` the branches compute scale/shift from the BN tensors on every
    call, so they follow later changes to the model.

    Args:
        model: a slimmable model (put in eval mode for the trace and left so).
        example_input: an input to trace with.
        widths: the widths to include (default: all of ``slimops.model_widths(model)``).
        freeze: freeze the result (see above); its ``widths`` attribute is kept.

    Raises:
        ValueError: ``model`` has no slimmable layers, or a width is not one of its widths.
    """
    ws = list(model_widths(model) if widths is None else widths)
    if not ws:
        raise ValueError("torchscript_widths: no widths given")
    model.eval()
    branches = []
    for w in ws:
        with torch.no_grad(), scoped_width(model, w), warnings.catch_warnings():
            # TorchScript is deprecated in torch 2.13 (still what libtorch programs load);
            # the tracer's warnings are about the ops' Python-side shape checks, which a
            # trace need not (and does not) replay
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            branches.append(torch.jit.trace(model, example_input, check_trace=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(WidthSwitch(branches, ws)).eval()
        if not freeze:
            return scripted
        return torch.jit.freeze(scripted, preserved_attrs=["widths"])
