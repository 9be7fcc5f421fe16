"""The fused activations are defined once, in slimops.reference.ACTIVATION_CODES (name -> the
integer code the compiled ops take); every other definition is derived from it or checked
against it here: the C++ enum (csrc/cpu/common.h), the CUDA enum (csrc/cuda/epilogue_math.cuh),
the op layer's table and the Triton kernels' constants. A code means the same activation
on every backend: the compiled CPU op run with each code equals reference.activate."""
from __future__ import annotations

import os
import re

import pytest
import torch

import slimops
from slimops import reference
from slimops.ops import _common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENUM_NAMES = {"kNone": None, "kRelu": "relu", "kRelu6": "relu6"}


def _enum(path: str) -> dict:
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    match = re.search(r"enum Activation\s*:\s*\w+\s*\{([^}]*)\}", text)
    assert match, f"no `enum Activation` in {path}"
    codes = {}
    for item in match.group(1).split(","):
        name, value = (part.strip() for part in item.split("="))
        codes[ENUM_NAMES[name]] = int(value)
    return codes


@pytest.mark.parametrize("path", ["csrc/cpu/common.h", "csrc/cuda/epilogue_math.cuh"])
def test_compiled_enums_match_the_table(path):
    assert _enum(path) == reference.ACTIVATION_CODES


def test_python_tables_derive_from_the_table():
    assert reference.ACTIVATIONS == tuple(reference.ACTIVATION_CODES)
    assert _common.ACTIVATION_CODES is reference.ACTIVATION_CODES
    assert {v: k for k, v in _common.ACTIVATION_NAMES.items()} == reference.ACTIVATION_CODES
    kernels_common = pytest.importorskip("slimops.kernels._common")
    assert (kernels_common.ACT_NONE, kernels_common.ACT_RELU, kernels_common.ACT_RELU6) == tuple(
        reference.ACTIVATION_CODES[a] for a in (None, "relu", "relu6"))


@pytest.mark.skipif(slimops.backend_info()["cpu"] != "C++",
                    reason="needs the compiled extension slimops._C")
@pytest.mark.parametrize("name", reference.ACTIVATIONS, ids=str)
def test_each_code_runs_its_activation(name):
    x = torch.randn(2, 3, 5, 5) * 8  # straddles relu6's 0 and 6
    weight = torch.zeros(3, 1, 1, 1)  # a depthwise conv that outputs only the residual
    out = torch.ops.slimops.depthwise_conv2d(x, weight, None, [1, 1], [0, 0], [1, 1], None,
                                             None, x, reference.ACTIVATION_CODES[name])
    torch.testing.assert_close(out, reference.activate(x, name), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="activation must be"):
        torch.ops.slimops.depthwise_conv2d(x, weight, None, [1, 1], [0, 0], [1, 1], None, None,
                                           None, len(reference.ACTIVATION_CODES))
