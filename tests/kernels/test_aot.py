"""Every Triton kernel, in every configuration of its tuning list and every dtype, compiles
ahead of time for sm_80 (A100) and sm_90 (H100) with no register spills.

No GPU is needed: ``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline
down to a cubin with the ptxas bundled with triton, and the cubin's resource usage is read
back with the bundled cuobjdump (``slimops.kernels._aot``).
"""

import pytest

pytest.importorskip("triton")

from slimops import kernels  # noqa: E402
from slimops.kernels import _aot  # noqa: E402


@pytest.mark.parametrize("arch", _aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("family", kernels.KERNEL_MODULE_NAMES)
def test_every_case_compiles_without_spills(family, arch):
    import importlib

    module = importlib.import_module(f"slimops.kernels.{family}")
    cases = module.aot_cases()
    assert cases, f"{family}: no AOT cases"
    problems = []
    for case in cases:
        r = _aot.compile_case(case, arch)
        assert r.registers > 0, f"{case.name}: no register count read from the cubin"
        if r.spill_bytes or r.stack_bytes:
            problems.append(f"{case.name}: {r.spill_bytes} B local (spills), "
                            f"{r.stack_bytes} B stack, {r.registers} registers")
        # registers per thread must allow the launch: 64K registers per SM
        assert r.registers * 32 * case.num_warps <= 65536, case.name
        assert r.shared_bytes <= (166 if arch == 80 else 227) * 1024, case.name
    assert not problems, "\n".join(problems)


def test_cases_have_distinct_names():
    names = [c.name for c in _aot.all_cases()]
    assert len(names) == len(set(names))
