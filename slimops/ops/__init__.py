"""The op surface: one module per op family, each dispatching to the compiled kernel
(``torch.ops.slimops.*``, registered by ``slimops._C``) or to ``slimops.reference``.

Every function takes the *full* shared weight and reads the active width's channel prefix
without copying it. Each family has a checked entry (``conv2d``: every argument validated,
errors naming the op) and an ``_unchecked`` one for callers that have validated their
arguments themselves (the ``slimops.nn`` layers, which check their input against their own
weights and width): both choose the backend here, in the op layer and nowhere else
(``slimops.ops._backend``). Fakes (for ``torch.compile``) are registered here, on import,
when the compiled extension is present; the autograd formulas of ``conv2d``,
``depthwise_conv2d``, ``linear`` and ``batch_norm_act`` are C++ kernels at the Autograd key
(``csrc/autograd/``), those of the CUDA-only fused training ops (``conv2d_bn_act``) are
registered here.
"""

from slimops.ops._backend import backend_info
from slimops.ops.batch_norm_act import (
    batch_norm_act,
    batch_norm_act_unchecked,
    update_running_stats,
)
from slimops.ops.conv2d import conv2d, conv2d_backward, conv2d_cpu_kernel, conv2d_unchecked
from slimops.ops.conv2d_bn_act import (
    conv2d_bn_act_train,
    depthwise_conv2d_bn_act_train,
    fused_train_available,
)
from slimops.ops.depthwise_conv2d import (depthwise_conv2d, depthwise_conv2d_cpu_kernel,
                                          depthwise_conv2d_unchecked)
from slimops.ops.linear import linear, linear_unchecked
from slimops.ops.state_stamp import state_stamp
from slimops.ops.eval_plan import STALE_PLAN, eval_chain_call, eval_plan, eval_plan_call
from slimops.ops.load_watch import (load_watch, machine_contended, serial_while_contended,
                                    set_load_policy)
from slimops.ops.max_pool import max_pool2d_inference
from slimops.ops import cuda_registration
from slimops.ops.cuda_registration import use_cuda_cpp_kernels

cuda_registration.register()  # the ops' CUDA kernels (Triton by default) and CUDA autocast

__all__ = ["backend_info", "conv2d", "conv2d_backward", "conv2d_cpu_kernel", "conv2d_unchecked",
           "depthwise_conv2d", "depthwise_conv2d_cpu_kernel", "depthwise_conv2d_unchecked",
           "STALE_PLAN", "eval_chain_call", "eval_plan", "eval_plan_call",
           "linear", "linear_unchecked", "batch_norm_act",
           "batch_norm_act_unchecked", "conv2d_bn_act_train", "depthwise_conv2d_bn_act_train",
           "fused_train_available", "load_watch", "machine_contended", "max_pool2d_inference",
           "serial_while_contended", "set_load_policy", "state_stamp", "update_running_stats",
           "use_cuda_cpp_kernels"]
