"""The baselines slimops is benchmarked against, at one width of a slimmable model.

* ``reference_style(model)`` (``slimops.baselines``, re-exported here): the slimmable model
  as the original slimmable-networks code
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

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import slimops
from slimops.baselines import (  # noqa: F401  (re-exported: the benchmarks' variants)
    RefBatchNorm2d,
    RefConv2d,
    RefConvBNAct,
    RefLinear,
    ref_act,
    ref_bn,
    ref_conv,
    reference_style,
)

VARIANTS = ("slimops", "reference", "dense-eager", "dense-jit")
OPTIONAL_VARIANTS = ("dense-compile",)


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
