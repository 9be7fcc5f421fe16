"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import os

import torch

# torch dtype -> triton pointer type in AOT signatures.
TRITON_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

# Activation codes, as in csrc/cpu/common.h and slimops/ops/_common.py.
ACT_NONE, ACT_RELU, ACT_RELU6 = 0, 1, 2


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (numpy), for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels launch on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not (interpreting() and t.device.type == "cpu"):
            raise ValueError(
                f"slimops.kernels: tensor on {t.device}; Triton kernels run on CUDA tensors "
                "(or on CPU tensors under TRITON_INTERPRET=1)"
            )
