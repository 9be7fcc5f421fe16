"""Drop-in slimmable layers. Each runs at the width set by ``slimops.set_width`` (or, for
the current thread, ``slimops.width``) on the channel prefix of its shared weight."""

from slimops.nn.batchnorm import ChecksBNWidthsOnLoad, SwitchableBatchNorm2d, missing_bn_widths
from slimops.nn.conv import SlimmableConv2d
from slimops.nn.fused import (
    EvalChain,
    SlimConvBNAct,
    block_chains,
    bypassable,
    chains_can_run,
    run_eval_chains,
    runs_eval_chain,
)
from slimops.nn.linear import SlimmableLinear
from slimops.nn.pool import AvgPool2d, MaxPool2d
from slimops.nn.walk import map_layers

__all__ = [
    "AvgPool2d",
    "ChecksBNWidthsOnLoad",
    "EvalChain",
    "MaxPool2d",
    "SlimConvBNAct",
    "SlimmableConv2d",
    "SlimmableLinear",
    "SwitchableBatchNorm2d",
    "block_chains",
    "bypassable",
    "chains_can_run",
    "map_layers",
    "missing_bn_widths",
    "run_eval_chains",
    "runs_eval_chain",
]
