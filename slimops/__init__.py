"""slimops: kernel-accelerated slimmable network ops for PyTorch.

One network, one set of shared weights, several widths (Yu et al., *Slimmable Neural
Networks*, ICLR 2019): every op runs on the channel-prefix view of the shared weight,
without copying it, and switchable batch norm folds into the convolution's epilogue.

    import slimops
    model = slimops.create_model("slim_cnn")   # slimops.list_models(): the registered names
    slimops.set_width(model, 0.5)          # default width, all threads
    with slimops.width(model, 0.25):       # this thread only
        y = model(x)
"""

from slimops._version import __version__
from slimops.ops import backend_info, serial_while_contended
from slimops import ops, reference
from slimops import nn
from slimops import models
from slimops.models import create_model, list_models
from slimops.width import (
    ChannelRule,
    channels,
    get_width,
    make_divisible,
    model_widths,
    set_width,
    width,
    width_range,
)
from slimops.export import export, export_onnx


__all__ = [
    "ChannelRule",
    "backend_info",
    "channels",
    "create_model",
    "export",
    "export_onnx",
    "get_width",
    "list_models",
    "make_divisible",
    "model_widths",
    "models",
    "nn",
    "ops",
    "reference",
    "serial_while_contended",
    "set_width",
    "width",
    "width_range",
]
