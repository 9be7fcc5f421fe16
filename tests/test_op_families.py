"""slimops.op_families, the one list of op families, against what implements them: the
schemas of csrc/ops.cpp, the C++ kernels, the autograd kernels, the Triton launchers, the op
surface, the reference, and what the CUDA registration and kernel loader derive from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from slimops import kernels, reference
from slimops.op_families import BACKEND_QUERIES, CPU_HELPERS, FAMILY_OF, OP_FAMILIES
from slimops.ops import _backend
from slimops.ops.cuda_registration import OP_FAMILIES as CUDA_OPS

ROOT = Path(__file__).resolve().parent.parent


def _schemas() -> set:
    return set(re.findall(r'm\.def\(\s*"([a-z0-9_]+)\(', (ROOT / "csrc/ops.cpp").read_text()))


def _functions(path: Path) -> set:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def test_every_schema_is_in_one_family_or_a_backend_query():
    ops = list(FAMILY_OF) + list(BACKEND_QUERIES) + list(CPU_HELPERS)
    assert len(ops) == len(set(ops))
    assert set(ops) == _schemas()


def test_cpu_helpers_live_in_their_family_files():
    """A CPU-only op sits beside its family's kernels and Python entry points."""
    for op, family in CPU_HELPERS.items():
        assert family in OP_FAMILIES
        assert f'm.impl("{op}"' in (ROOT / f"csrc/cpu/{family}.cpp").read_text()
        assert f"def {op}(" in (ROOT / f"slimops/ops/{family}.py").read_text()


@pytest.mark.skipif(not _backend.HAS_C, reason="the compiled extension is not built")
def test_the_extension_defines_every_op():
    for op in list(FAMILY_OF) + list(BACKEND_QUERIES) + list(CPU_HELPERS):
        assert hasattr(torch.ops.slimops, op), op


@pytest.mark.parametrize("family", list(OP_FAMILIES))
def test_each_family_has_its_files(family):
    ops = OP_FAMILIES[family]
    assert (ROOT / f"csrc/cpu/{family}.cpp").is_file()
    assert (ROOT / f"slimops/ops/{family}.py").is_file()
    launchers = _functions(ROOT / f"kernels/{family}.py")
    assert set(ops) <= launchers, f"kernels/{family}.py lacks launchers {set(ops) - launchers}"
    forward = [op for op in ops if "backward" not in op]
    for op in forward:  # a forward op has an oracle and a C++ autograd formula
        assert callable(getattr(reference, op)), op
        assert (ROOT / f"csrc/autograd/{family}.cpp").is_file()
    assert (ROOT / f"tests/test_ops_{family}.py").is_file() or family == "epilogue"


def test_loader_and_cuda_registration_derive_from_the_registry():
    assert kernels.KERNEL_MODULE_NAMES == tuple(OP_FAMILIES)
    assert CUDA_OPS == FAMILY_OF
