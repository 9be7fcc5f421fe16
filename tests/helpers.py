"""Helpers shared by the op test modules (importable: pytest puts tests/ on sys.path)."""

import torch

# The torch.library.opcheck utilities every op is checked with.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """A new leaf on ``t``'s storage: keeps its strides (clone() would not for a sliced one)."""
    return t.detach().requires_grad_(grad)
