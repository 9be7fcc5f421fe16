"""Every Triton kernel, in every configuration of its tuning list and every dtype, compiles
ahead of time for sm_80 (A100) and sm_90 (H100) with no register spills.

No GPU is needed: ``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline
down to a cubin with the ptxas bundled with triton, and the cubin's resource usage is read
back with the bundled cuobjdump (``slimops.kernels._aot``). The compiles run in two
subprocesses (one per arch, in parallel) without ``TRITON_INTERPRET``, which this test
session sets for the interpreter tests.
"""

import pytest

pytest.importorskip("triton")

from slimops import kernels  # noqa: E402
from slimops.kernels import _aot  # noqa: E402

# Per-SM limits: 64K 32-bit registers; shared memory per block (opt-in maximum).
REGISTERS_PER_SM = 65536
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def results():
    by_key = {}
    for r in _aot.results_in_subprocesses():
        by_key[(r.name, r.arch)] = r
    return by_key


@pytest.fixture(scope="module")
def cases():
    import importlib

    return {family: importlib.import_module(f"slimops.kernels.{family}").aot_cases()
            for family in kernels.KERNEL_MODULE_NAMES}


@pytest.mark.parametrize("arch", _aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("family", kernels.KERNEL_MODULE_NAMES)
def test_every_case_compiles_without_spills(family, arch, results, cases):
    assert cases[family], f"{family}: no AOT cases"
    problems = []
    for case in cases[family]:
        r = results[(case.name, arch)]
        assert r.registers > 0, f"{case.name}: no register count read from the cubin"
        if r.spill_bytes or r.stack_bytes:
            problems.append(f"{case.name}: {r.spill_bytes} B local (spills), "
                            f"{r.stack_bytes} B stack, {r.registers} registers")
        assert r.registers * 32 * case.num_warps <= REGISTERS_PER_SM, case.name
        assert r.shared_bytes <= MAX_SHARED[arch], case.name
    assert not problems, "\n".join(problems)


def test_cases_have_distinct_names(cases):
    names = [c.name for family_cases in cases.values() for c in family_cases]
    assert len(names) == len(set(names))


def test_resource_usage_reader_sees_a_spill_free_kernel(results):
    """The reader parses real cuobjdump output: registers are read, and a trivially small
    kernel (the epilogue apply) uses few of them."""
    regs = [r.registers for (name, _), r in results.items() if name.startswith("epilogue")]
    assert regs and 8 <= min(regs) <= 64
