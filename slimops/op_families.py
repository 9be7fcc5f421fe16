"""The op families: each fact about which ops exist, written once.

A family is one file in every layer that implements it: the schemas' C++ kernels
``csrc/cpu/<family>.cpp``, the Triton kernels ``kernels/<family>.py`` (launchers named like
the ops), the Python surface ``slimops/ops/<family>.py`` (fakes, flop formulas, entry
points) and, for the forward ops, ``slimops.reference.<op>``. The CUDA registration
(``slimops.ops.cuda_registration``), the kernel loader (``slimops.kernels``) and the tests
derive their lists from ``OP_FAMILIES``; ``tests/test_op_families.py`` checks it against the
schemas the compiled extension defines (``csrc/ops.cpp``) and the files above.

This module imports nothing: every layer may read it.
"""

from typing import Dict, Tuple

# family -> the ``torch.ops.slimops`` ops it holds (forward first). Order: the Triton
# modules' import order (a module may import the ones before it).
OP_FAMILIES: Dict[str, Tuple[str, ...]] = {
    "epilogue": ("epilogue_backward",),
    "batch_norm_act": ("batch_norm_act", "batch_norm_act_backward", "update_running_stats"),
    "depthwise_conv2d": ("depthwise_conv2d", "depthwise_conv2d_backward_input",
                         "depthwise_conv2d_backward_weight"),
    "conv2d": ("conv2d", "conv2d_backward_input", "conv2d_backward_weight", "conv2d_backward"),
    "linear": ("linear", "linear_backward_input", "linear_backward_weight"),
}

# Ops of csrc/ops.cpp that are queries of the CPU backend, not computations (no family).
BACKEND_QUERIES: Tuple[str, ...] = ("cpu_isa", "conv2d_routes", "load_watch")

# Ops that write their arguments in place and return nothing (schema ``Tensor(a!)``): the
# running statistics' update (one op instead of three to five aten calls per BN layer and
# width of a training step). No gradient, no autocast kernel (the buffers keep their dtype),
# no ``triton_op`` (whose outputs are fresh tensors; while torch.compile traces the op layer
# runs aten's in-place ops instead), no oracle of their own (F.batch_norm's update in
# ``slimops.reference.batch_norm_act`` is it). Every other op of a family is a forward op or a
# ``*_backward*`` op.
IN_PLACE_OPS: Tuple[str, ...] = ("update_running_stats",)

# op -> its family
FAMILY_OF: Dict[str, str] = {op: family for family, ops in OP_FAMILIES.items() for op in ops}

__all__ = ["BACKEND_QUERIES", "FAMILY_OF", "IN_PLACE_OPS", "OP_FAMILIES"]
