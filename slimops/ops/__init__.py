"""The op surface: one module per op family, each dispatching to the compiled kernel
(``torch.ops.slimops.*``, registered by ``slimops._C``) or to ``slimops.reference``.

Every function takes the *full* shared weight and reads the active width's channel prefix
without copying it. Fakes (for ``torch.compile``) are registered here, on import, when the
compiled extension is present; the autograd formulas of ``conv2d``, ``depthwise_conv2d``,
``linear`` and ``batch_norm_act`` are C++ kernels at the Autograd key (``csrc/autograd/``),
those of the CUDA-only fused training ops (``conv2d_bn_act``) are registered here.
"""

from slimops.ops.batch_norm_act import batch_norm_act, update_running_stats
from slimops.ops.conv2d import conv2d
from slimops.ops.conv2d_bn_act import conv2d_bn_act_train
from slimops.ops.depthwise_conv2d import depthwise_conv2d
from slimops.ops.linear import linear
from slimops.ops import cuda_registration

cuda_registration.register()

__all__ = ["conv2d", "depthwise_conv2d", "linear", "batch_norm_act", "conv2d_bn_act_train",
           "update_running_stats"]
