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
from slimops.op_families import BACKEND_QUERIES, FAMILY_OF, IN_PLACE_OPS, OP_FAMILIES
from slimops.ops import _backend
from slimops.ops.cuda_registration import OP_FAMILIES as CUDA_OPS

ROOT = Path(__file__).resolve().parent.parent


def _schemas() -> set:
    return set(re.findall(r'm\.def\(\s*"([a-z0-9_]+)\(', (ROOT / "csrc/ops.cpp").read_text()))


def _functions(path: Path) -> set:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def test_every_schema_is_in_one_family_or_a_backend_query():
    ops = list(FAMILY_OF) + list(BACKEND_QUERIES)
    assert len(ops) == len(set(ops))
    assert set(ops) == _schemas()
    assert set(IN_PLACE_OPS) <= set(FAMILY_OF)


@pytest.mark.skipif(not _backend.HAS_C, reason="the compiled extension is not built")
def test_the_extension_defines_every_op():
    for op in list(FAMILY_OF) + list(BACKEND_QUERIES):
        assert hasattr(torch.ops.slimops, op), op


@pytest.mark.skipif(not _backend.HAS_C, reason="the compiled extension is not built")
def test_in_place_ops_are_the_mutable_schemas():
    """IN_PLACE_OPS is what the schemas say: those ops write arguments and return nothing;
    every other op of a family is functional (the triton_ops, autocast and oracle lists
    derived from the families rely on it)."""
    for op in FAMILY_OF:
        schema = getattr(torch.ops.slimops, op).default._schema
        assert schema.is_mutable == (op in IN_PLACE_OPS), op
        if op in IN_PLACE_OPS:
            assert not schema.returns, op


@pytest.mark.parametrize("family", list(OP_FAMILIES))
def test_each_family_has_its_files(family):
    ops = OP_FAMILIES[family]
    assert (ROOT / f"csrc/cpu/{family}.cpp").is_file()
    assert (ROOT / f"slimops/ops/{family}.py").is_file()
    launchers = _functions(ROOT / f"kernels/{family}.py")
    assert set(ops) <= launchers, f"kernels/{family}.py lacks launchers {set(ops) - launchers}"
    forward = [op for op in ops if "backward" not in op and op not in IN_PLACE_OPS]
    for op in forward:  # a forward op has an oracle and a C++ autograd formula
        assert callable(getattr(reference, op)), op
        assert (ROOT / f"csrc/autograd/{family}.cpp").is_file()
    assert (ROOT / f"tests/test_ops_{family}.py").is_file() or family == "epilogue"


def test_loader_and_cuda_registration_derive_from_the_registry():
    assert kernels.KERNEL_MODULE_NAMES == tuple(OP_FAMILIES)
    assert CUDA_OPS == FAMILY_OF
