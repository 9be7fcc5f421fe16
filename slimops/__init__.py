"""slimops: kernel-accelerated slimmable network ops for PyTorch.

One network, one set of shared weights, several widths (Yu et al., *Slimmable Neural
Networks*, ICLR 2019): every op runs on the channel-prefix view of the shared weight,
without copying it, and switchable batch norm folds into the convolution's epilogue.

    import slimops
    model = slimops.models.slim_cnn()
    slimops.set_width(model, 0.5)          # default width, all threads
    with slimops.width(model, 0.25):       # this thread only
        y = model(x)
"""

from slimops._backend import backend_info
from slimops import ops, reference
from slimops import nn
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

__version__ = "0.1.0"

__all__ = [
    "ChannelRule",
    "backend_info",
    "channels",
    "export",
    "export_onnx",
    "get_width",
    "make_divisible",
    "model_widths",
    "nn",
    "ops",
    "reference",
    "set_width",
    "width",
    "width_range",
]
